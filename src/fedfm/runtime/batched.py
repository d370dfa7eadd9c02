"""The ``batched`` runtime: a round's clients train in lockstep through the one shared base.

At every local step the batch is the concatenation of each still-active client's own mini-batch. Every trainable
parameter is stacked along a new client axis (``[K, *shape]``), and the layers that own them apply client k's
slice to client k's rows only (a batched matmul when every client brings the same number of rows, a loop over
the segments otherwise). The loss is the sum of the clients' own mean losses, so one backward pass leaves client
k's own gradient in slice k. Each client keeps its own data order (its seeded generator, as in the ``local``
runtime), its own gradient clipping (per-slice norms), its own number of steps (a client whose data is used up
leaves the batch and its state is taken at that moment), and its own optimizer state: AdamW and SGD act entry by
entry, so one optimizer over the stacked tensors is K independent optimizers.

The frozen base runs once per step for all K clients instead of K times: one large matmul in place of K small ones
and one pass of Python and framework overhead in place of K. What cannot be stacked (prompt tuning, full
fine-tuning, gradient accumulation, an algorithm that replaced local training) runs one client after another,
and the runtime says so once.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..client import ClientResult, ClientTask, LocalTraining, batch_stream, make_optimizer
from ..privacy import disclose
from . import RUNTIMES, Progress
from .local import LocalRuntime

# ---------------------------------------------------------------------------------------------- segmented layers


class Segments:
    """The row layout of the current concatenated batch: which clients (slices) are active, how many rows each."""

    def __init__(self) -> None:
        self.active: torch.Tensor | None = None  # slice indices of the active clients, in row order
        self.sizes: list[int] = []
        self.all_active = True

    def set(self, active: list[int], sizes: list[int], k_total: int, device) -> None:
        self.active = torch.tensor(active, dtype=torch.long, device=device)
        self.sizes = sizes
        self.all_active = active == list(range(k_total))

    def take(self, stacked: torch.Tensor) -> torch.Tensor:
        """The active clients' slices, in row order (no copy when every client is active)."""
        return stacked if self.all_active else stacked.index_select(0, self.active)

    @property
    def equal(self) -> bool:
        return len(set(self.sizes)) == 1


def segmented_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seg: Segments) -> torch.Tensor:
    """Rows of client i times its own weight: ``y[rows_i] = x[rows_i] @ weight[i]^T + bias[i]``.

    ``weight``: [K_active, out, in], already taken for the active clients. Equal segments go through one ``bmm``
    over the client axis; unequal ones through one ``bmm`` over rows, each row with its client's weight gathered
    (rows x out x in: small for adapters and heads).
    """
    lead, d_in = x.shape[:-1], x.shape[-1]
    if seg.equal:
        xs = x.reshape(len(seg.sizes), -1, d_in)
        w = weight.transpose(1, 2).to(xs.dtype)
        y = torch.bmm(xs, w) if bias is None else torch.baddbmm(bias.to(xs.dtype).unsqueeze(1), xs, w)
        return y.reshape(*lead, weight.shape[1])
    sizes = torch.tensor(seg.sizes, device=x.device)
    xs = x.reshape(x.shape[0], -1, d_in)
    w = weight.repeat_interleave(sizes, dim=0).transpose(1, 2).to(xs.dtype)
    if bias is None:
        y = torch.bmm(xs, w)
    else:
        y = torch.baddbmm(bias.repeat_interleave(sizes, dim=0).to(xs.dtype).unsqueeze(1), xs, w)
    return y.reshape(*lead, weight.shape[1])


def per_row(values: torch.Tensor, seg: Segments, ndim: int) -> torch.Tensor:
    """Client i's vector repeated for each of its rows, shaped to broadcast over ``ndim``-dimensional activations."""
    rows = values.repeat_interleave(torch.tensor(seg.sizes, device=values.device), dim=0)
    return rows.view(rows.shape[0], *([1] * (ndim - 2)), rows.shape[-1])


class _Stacker:
    """How one kind of module is run with stacked parameters: ``names`` (parameter attribute paths) and a forward."""

    def __init__(self, module: torch.nn.Module, names: dict[str, str]):
        self.module = module
        self.names = names  # role -> parameter name relative to the module

    def forward(self, stacked: dict[str, torch.Tensor], seg: Segments) -> Callable:
        raise NotImplementedError


class _LoraLinear(_Stacker):
    """peft LoRA on a linear layer (Hu et al. 2021): base(x) + B_i A_i x · α/r for client i's rows."""

    def forward(self, stacked, seg):
        m, adapter = self.module, self.module.active_adapters[0]
        scale = m.scaling[adapter]
        dropout = m.lora_dropout[adapter]

        def own(role: str, layer) -> torch.Tensor:  # client slices, or the one frozen matrix shared by all
            if role in stacked:
                return seg.take(stacked[role])
            return layer[adapter].weight.unsqueeze(0).expand(len(seg.sizes), -1, -1)

        def fwd(x, *args, **kwargs):
            result = m.base_layer(x, *args, **kwargs)
            a, b = own("A", m.lora_A), own("B", m.lora_B)
            lora = segmented_linear(segmented_linear(dropout(x), a, None, seg), b, None, seg)
            return result + (lora * scale).to(result.dtype)

        return fwd


class _Linear(_Stacker):
    """A fully trained linear layer (a classification head): y = W_i x + b_i for client i's rows."""

    def forward(self, stacked, seg):
        m = self.module

        def fwd(x):
            weight = seg.take(stacked["weight"]) if "weight" in stacked else \
                m.weight.unsqueeze(0).expand(len(seg.sizes), -1, -1)
            bias = seg.take(stacked["bias"]) if "bias" in stacked else \
                (None if m.bias is None else m.bias.unsqueeze(0).expand(len(seg.sizes), -1))
            return segmented_linear(x, weight, bias, seg)

        return fwd


class _IA3Linear(_Stacker):
    """peft IA3 (Liu et al. 2022) on a linear layer: client i's learned vector rescales its rows' activations."""

    def forward(self, stacked, seg):
        m = self.module

        def fwd(x, *args, **kwargs):
            scale = seg.take(stacked["l"]).flatten(1)  # [K, features]
            if m.is_feedforward:
                x = x * per_row(scale, seg, x.dim()).to(x.dtype)
                return m.base_layer(x, *args, **kwargs)
            result = m.base_layer(x, *args, **kwargs)
            return result * per_row(scale, seg, result.dim()).to(result.dtype)

        return fwd


def find_stackers(model: torch.nn.Module, trainable: list[str]) -> tuple[list[tuple[_Stacker, dict[str, str]]], list[str]]:
    """The stackable modules owning the trainable parameters, each with role -> full parameter name; and the
    trainable parameters no stacker covers (then the model cannot run batched)."""
    from peft.tuners.ia3.layer import Linear as IA3Linear
    from peft.tuners.lora.layer import Linear as LoraLinear

    wanted = set(trainable)
    found: list[tuple[_Stacker, dict[str, str]]] = []
    covered: set[str] = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, LoraLinear) and len(m.active_adapters) == 1:
            a = m.active_adapters[0]
            if getattr(m, "use_dora", {}).get(a, False) or getattr(m, "lora_bias", {}).get(a, False):
                continue
            roles = {"A": f"{prefix}lora_A.{a}.weight", "B": f"{prefix}lora_B.{a}.weight"}
            stacker: _Stacker = _LoraLinear(m, roles)
        elif isinstance(m, IA3Linear) and len(m.active_adapters) == 1:
            roles = {"l": f"{prefix}ia3_l.{m.active_adapters[0]}"}
            stacker = _IA3Linear(m, roles)
        elif type(m) is torch.nn.Linear and m.weight.requires_grad:
            roles = {"weight": f"{prefix}weight"}
            if m.bias is not None:
                roles["bias"] = f"{prefix}bias"
            stacker = _Linear(m, roles)
        else:
            continue
        roles = {r: n for r, n in roles.items() if n in wanted}  # a frozen role (FFA-LoRA's A) stays the module's
        if roles and not any(n in covered for n in roles.values()):
            found.append((stacker, roles))
            covered.update(roles.values())
    return found, [n for n in trainable if n not in covered]


@contextmanager
def stacked_forward(stackers, stacked: dict[str, torch.Tensor], seg: Segments):
    """Route the stackable modules through the stacked parameters while the block runs; restore them after."""
    saved = []
    try:
        for st, roles in stackers:
            saved.append((st.module, st.module.__dict__.get("forward")))
            st.module.forward = st.forward({role: stacked[name] for role, name in roles.items()}, seg)
        yield
    finally:
        for module, fwd in saved:
            if fwd is None:
                del module.forward
            else:
                module.forward = fwd


# ---------------------------------------------------------------------------------------------- the runtime


class _Slice:
    """Client k's view of a stacked parameter, shaped like the parameter, for the algorithms' gradient hooks
    (FedProx's μ(w − w^t), SCAFFOLD's c − c_i): ``.grad`` is a view into the stacked gradient."""

    __slots__ = ("data", "grad")

    def __init__(self, data: torch.Tensor, grad: torch.Tensor | None):
        self.data, self.grad = data, grad

    def detach(self) -> torch.Tensor:
        return self.data


def why_not_batched(cfg, algo) -> str | None:
    """None when this run's clients can train batched; else the reason they run one after another."""
    if type(algo).__call__ is not LocalTraining.__call__:
        return f"client.algorithm {cfg.client.algorithm!r} replaces local training"
    if cfg.privacy.mode == "sample":
        return "privacy.mode 'sample' (DP-SGD needs each client's per-example gradients)"
    if cfg.client.grad_accum != 1:
        return "client.grad_accum > 1 (clients would step at different micro-batches)"
    ctx = algo.ctx
    names = ctx.spec.names + (ctx.personal.names if ctx.personal is not None else [])
    _, missing = find_stackers(ctx.model, names)
    if missing:
        return (f"adapter.method {cfg.adapter.method!r} trains parameters no batched layer stacks "
                f"(e.g. {missing[0]})")
    return None


class BatchedRuntime(LocalRuntime):
    """Clients of a round train together, ``runtime.max_clients_per_batch`` at a time (all when unset)."""

    def __init__(self, cfg, client_fn: Callable[[ClientTask], ClientResult]):
        super().__init__(cfg, client_fn)
        self.cfg = cfg
        self.max_k = cfg.runtime.max_clients_per_batch
        self.reason = why_not_batched(cfg, client_fn) if isinstance(client_fn, LocalTraining) else \
            "the client function is not a local-training algorithm"
        self.notes = [f"runtime batched: {self.reason}; clients run one after another"] if self.reason else []
        self.last_batched = 0  # clients trained together in the last group (for tests and benchmarks)

    def run(self, tasks: list[ClientTask], on_result: Progress = None) -> list[ClientResult]:
        algo = self.client_fn
        if self.reason or not isinstance(algo, LocalTraining) or len(tasks) < 2:
            return super().run(tasks, on_result)
        k = self.max_k or len(tasks)
        results: list[ClientResult] = []
        for i in range(0, len(tasks), k):
            group = tasks[i:i + k]
            try:
                out = train_together(algo, group)
                self.last_batched = len(group)
            except Exception:  # one client's failure must not take the others down: redo the group one by one
                out = super().run(group)
            for r in out:
                if on_result is not None:
                    on_result(r)
            results.extend(out)
        return results


def train_together(algo: LocalTraining, tasks: list[ClientTask]) -> list[ClientResult]:
    """One round of local training for ``tasks`` in lockstep; the same results as ``algo(task)`` for each task."""
    ctx = algo.ctx
    cfg, model, task_def = ctx.cfg, ctx.model, ctx.task
    ccfg = cfg.client
    t0 = time.perf_counter()
    K = len(tasks)
    device = next(model.parameters()).device
    shared, personal = ctx.spec.names, (ctx.personal.names if ctx.personal is not None else [])
    names = shared + personal

    # every client's starting point: the global state (cut to its rank view) and its own personal parameters
    views, globals_, hooks, streams = [], [], [], []
    scores: dict[int, dict] = {}
    starts: list[dict[str, torch.Tensor]] = []
    for t in tasks:
        view = ctx.view(t.client_id)
        g = view.expand(ctx.down.decode(t.payload, view))
        views.append(view)
        globals_.append(g)
        start = {n: g[n] for n in shared}
        if personal:
            start.update(ctx.personal.unflatten(ctx.personal_flat(t.client_id)))
        starts.append(start)
        own = ctx.local[t.client_id]
        if t.evaluate:  # federated evaluation of the model as received, before any training
            ctx.spec.load(g)
            ctx.load_personal(t.client_id)
            scores[t.client_id] = algo.evaluate(t, own)
        gen = torch.Generator().manual_seed(t.seed)
        streams.append(batch_stream(task_def, own.encoded, own.train, ccfg.batch_size, gen,
                                    ccfg.steps, ccfg.epochs))
    torch.manual_seed(tasks[0].seed)
    dtypes = {n: p.dtype for n, p in list(ctx.spec.params.items()) + (list(ctx.personal.params.items()) if personal else [])}
    stacked: "OrderedDict[str, torch.nn.Parameter]" = OrderedDict(
        (n, torch.nn.Parameter(torch.stack([s[n] for s in starts]).to(device=device, dtype=dtypes[n])))
        for n in names)
    for t, g in zip(tasks, globals_):
        hooks.append(algo.grad_hook(t, g))
    opt = make_optimizer(list(stacked.values()), ccfg)
    stackers, missing = find_stackers(model, names)
    assert not missing, missing
    seg = Segments()
    model.train()

    active = list(range(K))
    losses: list[list[float]] = [[] for _ in range(K)]
    finals: list[dict[str, torch.Tensor] | None] = [None] * K
    pending = {i: next(streams[i], None) for i in active}
    while True:
        active = [i for i in active if pending[i] is not None]
        for i in range(K):
            if finals[i] is None and pending[i] is None:  # no (more) data: the client leaves with its state now
                finals[i] = {n: stacked[n].detach()[i].to("cpu", copy=True) for n in names}
        if not active:
            break
        batches = [pending[i] for i in active]
        batch = concat_batches(batches, task_def)
        seg.set(active, [len(b["input_ids"] if "input_ids" in b else next(iter(b.values()))) for b in batches],
                K, device)
        with stacked_forward(stackers, stacked, seg):
            per_client = task_def.segment_losses(model, batch, seg.sizes)
        per_client.sum().backward()
        for j, i in enumerate(active):
            losses[i].append(float(per_client[j].detach()))
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in stacked.items()}
        for i in active:
            if hooks[i] is not None:
                hooks[i]([_Slice(stacked[n].detach()[i], grads[n][i]) for n in names])
        if ccfg.grad_clip is not None:
            clip_per_client(list(grads.values()), ccfg.grad_clip)
        for n, p in stacked.items():
            p.grad = grads[n]
        opt.step()
        opt.zero_grad(set_to_none=True)
        pending = {i: next(streams[i], None) for i in active}

    seconds = time.perf_counter() - t0
    results = []
    for i, t in enumerate(tasks):
        final = finals[i]
        local = OrderedDict((n, final[n]) for n in shared)
        delta = views[i].restrict({n: local[n] - globals_[i][n] for n in shared})
        if personal:
            ctx.store_personal(t.client_id, ctx.personal.flatten({n: final[n] for n in personal}))
        extras = algo.finish(t, globals_[i], local, len(losses[i]))
        results.append(disclose(ctx.cfg, ClientResult(
            client_id=t.client_id, update=ctx.encode_update(t, delta, views[i]),
            num_examples=ctx.local[t.client_id].train_rows(task_def),
            metrics={"train_loss": sum(losses[i]) / max(len(losses[i]), 1), "steps": len(losses[i]),
                     "seconds": seconds, "batched_with": K, **scores.get(t.client_id, {})},
            extras=extras)))
    return results


def clip_per_client(grads: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` for each client slice separately: slice i scaled by min(1, C / (‖g_i‖ + 1e-6))."""
    sq = torch.stack([g.detach().flatten(1).float().pow(2).sum(1) for g in grads]).sum(0)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))


def concat_batches(batches: list[dict[str, torch.Tensor]], task_def: Any) -> dict[str, torch.Tensor]:
    """Rows of every client's batch in one batch; token columns right-padded to the widest (pad id, mask 0,
    label -100), which changes no real token's result."""
    if len(batches) == 1:
        return batches[0]
    out = {}
    pad_id = getattr(getattr(task_def, "tokenizer", None), "pad_token_id", None) or 0
    for key in batches[0]:
        vals = [b[key] for b in batches]
        if vals[0].dim() == 2 and key in ("input_ids", "attention_mask", "labels", "token_type_ids"):
            width = max(v.shape[1] for v in vals)
            fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
            vals = [F.pad(v, (0, width - v.shape[1]), value=fill) if v.shape[1] < width else v for v in vals]
        out[key] = torch.cat(vals)
    return out


@RUNTIMES.register("batched")
def _batched(cfg, client_fn) -> BatchedRuntime:
    return BatchedRuntime(cfg, client_fn)
