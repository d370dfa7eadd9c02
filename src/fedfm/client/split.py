"""Split learning, SplitFed V1 (Thapa et al. 2022, "SplitFed: When Federated Learning Meets Split Learning").

The model W is cut after block L (``split.layer``): the client-side part W^C (the embeddings and blocks 0..L-1, with
its adapter) stays with the client, the server-side part W^S (blocks L.. and the head) with the server. Per batch the
client computes the cut-layer activations A = W^C(x), adds N(0, σ²) when ``split.noise_std`` = σ > 0, and sends
A with the labels (label sharing: the server computes the loss) and the attention mask; the server runs W^S on them,
takes the loss and its step on W^S, and sends back ∇_A ℓ; the client backpropagates it through W^C and takes its
step. Activations and gradients are the codec's bytes, counted (``split_bytes_up`` / ``split_bytes_down``).

At the round's end both halves are averaged as in FedAvg: the client's update is ΔW^C (the only part it receives and
knows); the server half keeps ΔW^S of each client's session and joins it to that client's ΔW^C before the aggregation
chain (``SplitServer.complete``), so the whole global state steps as one, by the same weights and server optimizer.
The U-shaped variant (labels kept on the client) is out of scope.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load as st_load, save as st_save

from ..errors import ConfigError, FedfmError, UpdateRejected
from ..models.blocks import find_blocks as _find_blocks
from ..privacy import disclose
from ..randomness import Randomness
from . import CLIENT_ALGORITHMS, ClientResult, ClientTask, LocalTraining, ServerSide, batch_stream, make_optimizer

CLIENT_INPUTS = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds", "pixel_values")  # never sent


def find_blocks(model) -> tuple[str, torch.nn.ModuleList]:
    """The model's transformer blocks and their name (``models.blocks.find_blocks``)."""
    return _find_blocks(model, "client.algorithm 'split': cannot cut")


def find_embeddings(model, blocks_name: str) -> str:
    """The module whose output enters block 0: the input embeddings, or the outermost module around them that does
    not hold the blocks (BERT's ``embeddings`` with positions and LayerNorm; Llama's ``embed_tokens``)."""
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    while "." in name and not blocks_name.startswith(name.rsplit(".", 1)[0] + "."):
        name = name.rsplit(".", 1)[0]
    return name


class _Cut(Exception):
    """Raised at block L's input: the client half stops there."""


class _Given(torch.nn.Module):
    """Stands in for the embeddings on the server: returns the activations the client sent."""

    def __init__(self, activations: torch.Tensor):
        super().__init__()
        self.activations = activations

    def forward(self, *args, **kwargs):
        return self.activations


def _parent(model, name: str) -> tuple[torch.nn.Module, str]:
    head, _, attr = name.rpartition(".")
    return model.get_submodule(head), attr


class Cut:
    """A model cut after block ``layer``: the names of the trainable parameters on each side, the client half's
    forward (the model's own, stopped at block L's input) and the server half's (the model's own, with the client's
    activations in place of the embeddings and blocks L.. only), so masks and positions are computed as the model
    computes them."""

    def __init__(self, model, layer: int, names: list[str]):
        self.model, self.layer = model, layer
        self.blocks_name, self.blocks = find_blocks(model)
        if layer >= len(self.blocks):
            raise ConfigError(f"split.layer: {layer} is not below the model's depth ({len(self.blocks)} blocks); "
                              f"the server side runs blocks split.layer.. and the head")
        self.embeddings_name = find_embeddings(model, self.blocks_name)
        mine = (self.embeddings_name + ".", *(f"{self.blocks_name}.{i}." for i in range(layer)))
        self.client_names = [n for n in names if n.startswith(mine)]
        self.server_names = [n for n in names if not n.startswith(mine)]
        sides: dict[int, set[bool]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                sides.setdefault(id(p), set()).add(n.startswith(mine))
        if any(len(s) == 2 for s in sides.values()):
            raise ConfigError("client.algorithm 'split': a trained parameter is on both sides (input embeddings tied "
                              "to the output head, tie_word_embeddings, with adapter.method full); train an adapter "
                              "such as lora, or untie them")

    def client_forward(self, task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A = W^C(x): the input of block L."""
        cut: dict[str, torch.Tensor] = {}

        def stop(module, args, kwargs):
            cut["A"] = args[0] if args else kwargs["hidden_states"]
            raise _Cut

        hook = self.blocks[self.layer].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with task.autocast():
                self.model(**{k: v for k, v in batch.items() if k != "labels"})
        except _Cut:
            pass
        finally:
            hook.remove()
        return cut["A"]

    def server_loss(self, task, activations: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """ℓ(W^S(A), y): the task's loss through the model's own forward, the embeddings replaced by A and the blocks
        by blocks L... The token ids it is given are placeholders of A's shape (pad where the mask is 0), which is
        all that is read of them past the embeddings (a decoder classifier's last non-pad position)."""
        emb_parent, emb_attr = _parent(self.model, self.embeddings_name)
        blk_parent, blk_attr = _parent(self.model, self.blocks_name)
        embeddings = getattr(emb_parent, emb_attr)
        config = getattr(self.model, "config", None)
        pad = int(getattr(config, "pad_token_id", None) or 0)
        token = (pad + 1) % int(getattr(config, "vocab_size", None) or pad + 2)  # any id but the pad's
        shape = activations.shape[:2]
        mask = targets.get("attention_mask", torch.ones(shape, dtype=torch.long, device=activations.device))
        ids = torch.where(mask.bool(), torch.full(shape, token, device=activations.device), pad)
        setattr(emb_parent, emb_attr, _Given(activations))
        setattr(blk_parent, blk_attr, torch.nn.ModuleList(list(self.blocks)[self.layer:]))
        try:
            return task.loss(self.model, {"input_ids": ids, **targets})
        finally:
            setattr(emb_parent, emb_attr, embeddings)
            setattr(blk_parent, blk_attr, self.blocks)


class PartView:
    """A client's part of the shared state (split learning's client side): the names it receives and sends."""

    def __init__(self, layout, names: list[str]):
        self.spec = layout
        self.names = [n for n in layout.names if n in set(names)]
        self.shapes = {n: layout.shapes[n] for n in self.names}

    def restrict(self, state) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((n, state[n]) for n in self.names)


def pack_targets(batch: dict[str, torch.Tensor]) -> bytes:
    """What the server needs besides A, sent exactly (not through a lossy codec): the labels and the mask."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in batch.items() if k not in CLIENT_INPUTS})


def _load_into(params, state) -> None:
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


@dataclass
class Session:
    """One client's session with the server half: W^S's values at its start, the optimizer, bytes and losses."""

    start: dict[str, torch.Tensor]
    optimizer: Any
    bytes_up: int = 0
    bytes_down: int = 0
    losses: list[float] = field(default_factory=list)


class SplitServer(ServerSide):
    """The server half: runs W^S for one client at a time, keeps ΔW^S of each session until that client's result
    arrives, then joins it to the client's ΔW^C (``complete``)."""

    def __init__(self, layout, codec, num_clients: int, cfg=None):
        super().__init__(layout, codec, num_clients, cfg)
        self.sessions: dict[int, Session] = {}
        self.pending: dict[int, dict[str, Any]] = {}  # client id -> ΔW^S (flat over server_names) and bytes

    def bind(self, cfg, model, global_state) -> None:
        if model is None:
            raise FedfmError("client.algorithm 'split': the server side needs a model of its own to run W^S")
        self.cfg, self.task, self.global_state = cfg, model.task, global_state
        self.model, self.params = model.model, model.spec.params
        self.cut = Cut(self.model, cfg.split.layer, self.layout.names)
        self.part = PartView(self.layout, self.cut.client_names)
        self.notes = [f"split learning (SplitFed V1): clients run the embeddings and blocks 0..{cfg.split.layer - 1} "
                      f"({len(self.cut.client_names)} trainable tensors), the server blocks {cfg.split.layer}.. and "
                      f"the head ({len(self.cut.server_names)}); activations travel with the labels, noise "
                      f"σ={cfg.split.noise_std:g} (split.noise_std)"]

    def view(self, view):
        return self.part

    # ---------------------------------------------------------------- one client's session
    def begin(self, client_id: int) -> None:
        """W^S at the current global values; a fresh optimizer (as the client's)."""
        state = self.layout.unflatten(self.global_state())
        start = {n: state[n].clone() for n in self.cut.server_names}
        _load_into(self.params, start)
        self.model.train()
        params = [self.params[n] for n in self.cut.server_names]
        self.sessions[client_id] = Session(start, make_optimizer(params, self.cfg.client) if params else None)

    def exchange(self, client_id: int, activations: bytes, targets: bytes) -> bytes:
        """One batch: A and the targets in, W^S's step, ∇_A ℓ (and ℓ) out, as bytes."""
        s = self.sessions[client_id]
        grad, loss = self.backward(activations, targets)
        if s.optimizer is not None:
            params = [self.params[n] for n in self.cut.server_names]
            if self.cfg.client.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.client.grad_clip)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        down = self.codec.encode({"gradients": grad.cpu(), "loss": loss.detach().float().reshape(1).cpu()})
        s.bytes_up += len(activations) + len(targets)
        s.bytes_down += len(down)
        s.losses.append(float(loss.detach()))
        return down

    def backward(self, activations: bytes, targets: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """ℓ(W^S(A), y) and its backward pass: W^S's gradients accumulated, (∇_A ℓ, ℓ) returned."""
        device = next(self.model.parameters()).device
        A = self.codec.decode(activations)["activations"].to(device).requires_grad_(True)
        y = {k: v.to(device) for k, v in st_load(bytes(targets)).items()}
        loss = self.cut.server_loss(self.task, A, y)
        loss.backward()
        return A.grad, loss

    def end(self, client_id: int) -> None:
        """ΔW^S = W^S − W^S_start of the session, kept until the client's result arrives."""
        s = self.sessions.pop(client_id)
        delta = [self.params[n].detach().cpu() - s.start[n].cpu() for n in self.cut.server_names]
        flat = torch.cat([d.reshape(-1).float() for d in delta]) if delta else torch.zeros(0)
        self.pending[client_id] = {"delta": flat, "bytes_up": s.bytes_up, "bytes_down": s.bytes_down}

    # ---------------------------------------------------------------- the round
    def complete(self, rnd: int, results: list[ClientResult]) -> tuple[list[ClientResult], dict[str, Any]]:
        """Each result's ΔW^C joined with its session's ΔW^S (encoded again with the codec); the split bytes of the
        round's sessions."""
        out, up, down = [], 0, 0
        for r in results:
            self.sessions.pop(r.client_id, None)  # a client that failed mid-session
            kept = self.pending.pop(r.client_id, None)
            if kept is not None:
                up, down = up + kept["bytes_up"], down + kept["bytes_down"]
            if r.error is None and kept is None:
                r = replace(r, error="rejected: no server-side session of split learning for this update")
            elif r.error is None:
                try:
                    client = self.codec.decode(r.update, self.part)
                except UpdateRejected as e:
                    out.append(replace(r, error=f"rejected: {e}"))
                    continue
                sizes = [self.layout.shapes[n] for n in self.cut.server_names]
                parts = torch.split(kept["delta"], [int(torch.Size(z).numel()) for z in sizes])
                server = {n: t.view(z) for n, t, z in zip(self.cut.server_names, parts, sizes)}
                r = replace(r, update=self.codec.encode(OrderedDict(
                    (n, client[n] if n in client else server[n]) for n in self.layout.names)))
            out.append(r)
        return out, {"split_bytes_up": up, "split_bytes_down": down, "split_noise_std": self.cfg.split.noise_std}

    def state_dict(self) -> dict[str, Any]:
        """The sessions that ended but whose result is not aggregated yet (fedbuff keeps results across steps)."""
        return {"pending": {str(c): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in p.items()}
                            for c, p in self.pending.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = {int(c): dict(p) for c, p in state.get("pending", {}).items()}


def check_config(cfg) -> None:
    """What split learning cannot do, refused before anything loads (each message names its key)."""
    from ..models import personal_patterns
    from ..models.adapters import METHODS
    from ..models.blocks import peek_depth

    refusals = [
        (getattr(METHODS.get(cfg.adapter.method), "virtual_tokens", False),
         f"adapter.method {cfg.adapter.method!r} trains virtual tokens outside the model's blocks, so there is no "
         f"client-side part to cut; use lora, ia3, bitfit, head or full"),
        (bool(personal_patterns(cfg.adapter)),
         "personal parameters (adapter.personal, adapter.method fedsa-lora) are not supported: a client holds only "
         "the client-side part"),
        (cfg.adapter.rank_per_client is not None, "adapter.rank_per_client (heterogeneous LoRA ranks) is not supported"),
        (cfg.secagg.enabled, "secagg.enabled: the server half computes each client's server-side delta from the "
                             "activations it sees and joins it to the client's update, so there is no sum to mask"),
        (cfg.privacy.mode == "sample", "privacy.mode 'sample': DP-SGD clips each example's whole gradient, which "
                                       "lives on two sides here; use privacy.mode client"),
        (cfg.runtime.name != "local", f"runtime.name {cfg.runtime.name!r}: the client talks to the server half "
                                      f"batch by batch, which only runtime.name local carries"),
        (cfg.eval.federated, "eval.federated: a client holds only the client-side part and cannot score the model"),
        (cfg.client.grad_accum != 1, "client.grad_accum: each batch is one exchange and one step of each side"),
        (cfg.codec.name not in ("fp32", "fp16", "bf16") or cfg.codec.downlink not in (None, cfg.codec.name),
         f"codec.name {cfg.codec.name!r} (codec.downlink {cfg.codec.downlink!r}): the activations and their "
         f"gradients change shape with every batch and travel both ways through one codec, while int8, int4, topk "
         f"and randk lay out a state of known shape; use codec.name fp32, fp16 or bf16, with no other "
         f"codec.downlink"),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"client.algorithm 'split': {why}")
    depth = peek_depth(cfg.model)
    if depth is not None and cfg.split.layer >= depth:
        raise ValueError(f"split.layer: {cfg.split.layer} is not below the model's depth ({depth} blocks, "
                         f"num_hidden_layers); the server side runs blocks split.layer.. and the head")


@CLIENT_ALGORITHMS.register("split")
class Split(LocalTraining):
    """SplitFed V1's client (Thapa et al. 2022): W^C's forward to the cut, A (+ noise) and the labels sent as bytes,
    ∇_A ℓ received as bytes and backpropagated through W^C; sends ΔW^C."""

    server_side = SplitServer
    interactive = True  # talks to its server half while it trains (a deployment cannot carry that yet)
    check_config = staticmethod(check_config)

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.peer is None:
            raise ConfigError("client.algorithm 'split': the client needs its server half in this process "
                              "(a simulation with runtime.name local)")
        self.cut = Cut(ctx.model, ctx.cfg.split.layer, ctx.spec.names)
        self.part = PartView(ctx.spec, self.cut.client_names)

    def __call__(self, task: ClientTask) -> ClientResult:
        ctx, cfg, peer = self.ctx, self.ctx.cfg, self.ctx.peer
        t0 = time.perf_counter()
        start = ctx.codec.decode(task.payload, self.part)  # W^C only
        _load_into(ctx.spec.params, start)
        own = ctx.local[task.client_id]
        torch.manual_seed(task.seed)  # dropout
        gen = torch.Generator().manual_seed(task.seed)
        sigma = cfg.split.noise_std
        noise = Randomness.from_config(cfg).torch("split_noise", base=task.seed) if sigma > 0 else None
        params = [ctx.spec.params[n] for n in self.part.names]
        opt = make_optimizer(params, cfg.client) if params else None
        ctx.model.train()
        up = down = steps = 0
        total = 0.0
        peer.begin(task.client_id)
        for batch in batch_stream(ctx.task, own.encoded, own.train, cfg.client.batch_size, gen, cfg.client.steps,
                                  cfg.client.epochs):
            A = self.cut.client_forward(ctx.task, batch)
            sent = A.detach().float().cpu()  # bytes are written from host memory
            if noise is not None:
                sent = sent + sigma * torch.randn(sent.shape, generator=noise)
            activations, targets = ctx.codec.encode({"activations": sent}), pack_targets(batch)
            reply = peer.exchange(task.client_id, activations, targets)
            back = ctx.codec.decode(reply)
            up, down = up + len(activations) + len(targets), down + len(reply)
            total += float(back["loss"][0])
            steps += 1
            if opt is not None:
                A.backward(back["gradients"].to(A.device, A.dtype))
                if cfg.client.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.client.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        peer.end(task.client_id)
        local = ctx.spec.get()
        update = ctx.codec.encode(OrderedDict((n, local[n] - start[n]) for n in self.part.names))
        return disclose(cfg, ClientResult(
            client_id=task.client_id, update=update, num_examples=own.train_rows(ctx.task),
            metrics={"train_loss": total / max(steps, 1), "steps": steps, "seconds": time.perf_counter() - t0,
                     "split_bytes_up": up, "split_bytes_down": down, "split_noise_std": sigma}))
