"""FedMD (Li & Wang 2019, "FedMD: Heterogenous Federated Learning via Model Distillation"), with FedDF's server-side
ensemble distillation into a model of the server's own (Lin et al. 2020): clients that run different models exchange
only their logits on a public set, never weights.

One round, in the paper's words (Alg. 1) with the server's foundation model as FedDF's student::

    client k  Digest:    distil toward what the server sent, L_KD(f_k(x_p), z̃) on the public set (after round 1)
              Revisit:   train on its own data (client.steps / client.epochs of local SGD)
              Communicate: send f_k(x_p), its [P, C] logits on the public set (codec cast: fp32, fp16, bf16)
    server    Aggregate: z̄ = (1/K) Σ_k f_k(x_p)                                (the consensus)
              distil z̄ into the foundation model F, L_KD(F(x_p), z̄), transfer.server_distill_steps steps
              send back z̃ = F(x_p) (transfer.send: foundation) or z̄ (consensus)

L_KD is ``ownership.transfer.kd_loss`` at temperature T (``transfer.temperature``). The server sends F's logits by
default: that is the direction foundation model → clients of the field's taxonomy, and F has been distilled toward
z̄ in the same round, so what goes back is the ensemble's knowledge as the foundation model holds it, not the
clients' own average handed back. Each client keeps its whole trainable state (LoRA and head, or the head alone) in
the client state store, since no global state is shared. It runs in ``fedfm.hetero.HeteroSimulation``, which
loads each architecture's base once and gives each client the context of its own architecture.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, UpdateRejected
from ..ownership.transfer import DTYPES, consensus, distill, kd_loss, kl_to, pack, public_logits, unpack
from ..randomness import Randomness
from . import CLIENT_ALGORITHMS, ClientResult, ClientTask, ServerSide, local_sgd

CASTS = tuple(DTYPES)  # the codecs logits travel in
ADAPTERS = ("lora", "head")  # what a party may tune of its model


@dataclass
class PublicSet:
    """The public set as one party encoded it (its own tokenizer): rows without labels, in the order every party
    uses, so row p of every party's logits is the same example."""

    encoded: dict[str, torch.Tensor]
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Foundation:
    """The server's foundation model F: its base (possibly shared with a group of clients in the same process, so its
    own trainable state is kept apart and loaded in place), its task and the public set as F reads it."""

    model: torch.nn.Module
    spec: Any  # StateSpec of what the server tunes of F
    task: Any
    public: PublicSet
    state: torch.Tensor  # F's own trainable values (flat)

    def load(self) -> None:
        self.spec.load_flat(self.state)

    def save(self) -> None:
        self.state = self.spec.flat()


def check_transfer(cfg) -> None:
    """What client.algorithm fedmd cannot do, refused at config time naming the key (before any model loads)."""
    t, name = cfg.transfer, "client.algorithm 'fedmd'"
    if t.public_fraction <= 0:
        raise ValueError(f"{name} exchanges predictions on a public set, and transfer.public_fraction is 0: set it "
                         f"(e.g. transfer.public_fraction=0.1, carved from the data before partitioning)")
    if t.public_fraction + cfg.data.test_fraction >= 1:
        raise ValueError(f"transfer.public_fraction ({t.public_fraction:g}) + data.test_fraction "
                         f"({cfg.data.test_fraction:g}) leave no data for the clients")
    if cfg.task.name != "classification":
        raise ValueError(f"{name} distils class logits on the public set: task.name must be classification, got "
                         f"{cfg.task.name!r}")
    refused = {
        "server.aggregator": (cfg.server.aggregator, "fedavg", "the server averages logits (the consensus), not "
                                                               "weight updates"),
        "server.optimizer": (cfg.server.optimizer, "fedavg", "no global weights are stepped"),
        "federation.schedule": (cfg.federation.schedule, "sync", "the consensus is of one round's logits"),
        "privacy.mode": (cfg.privacy.mode, "none", "the logits on the public set are not clipped or noised, so no "
                                                   "ε would cover them"),
        "secagg.enabled": (cfg.secagg.enabled, False, "the server distils each round's mean of logits, not a masked "
                                                      "sum of updates"),
        "runtime.name": (cfg.runtime.name, "local", "each architecture's base is loaded once in this process"),
        "attack.kind": (cfg.attack.kind, "none", "the simulated attacks change weight updates or labels the "
                                                 "partition knows"),
    }
    for key, (value, ok, why) in refused.items():
        if value != ok:
            raise ValueError(f"{name} with {key} {value!r}: {why}; use {key}={str(ok).lower()}")
    if cfg.federation.byte_budget is not None:
        raise ValueError(f"{name} with federation.byte_budget {cfg.federation.byte_budget}: fedfm.hetero's rounds do "
                         f"not stop on a byte budget; leave it unset (federation.rounds bounds the run)")
    for key, codec in (("codec.name", cfg.codec.name), ("codec.downlink", cfg.codec.downlink)):
        if codec is not None and codec not in CASTS:
            raise ValueError(f"{name} sends logits cast to {', '.join(CASTS)}; {key} {codec!r} is not one "
                             f"(a few kilobytes of logits need no quantizer)")
    if cfg.codec.error_feedback:
        raise ValueError(f"{name}: codec.error_feedback is for sparse codecs; logits travel as casts")
    adapters = [("adapter", cfg.adapter), ("transfer.server_adapter", t.server_adapter)]
    adapters += [(f"transfer.groups[{i}].adapter", g.adapter) for i, g in enumerate(t.groups)]
    for key, a in adapters:
        if a is None:
            continue
        if a.method not in ADAPTERS:
            raise ValueError(f"{name}: {key}.method {a.method!r} is not supported (each party tunes "
                             f"{' or '.join(ADAPTERS)}: a LoRA adapter with its head, or the head alone)")
        if a.rank_per_client is not None or a.personal:
            raise ValueError(f"{name}: {key}.rank_per_client and {key}.personal are for a shared state; with fedmd "
                             f"every client's whole trainable state is its own")
    _check_groups(cfg)
    if cfg.model.quantization is not None or any(g.model.quantization for g in t.groups):
        raise ValueError(f"{name}: model.quantization is not supported (the CPU runs here)")


def _check_groups(cfg) -> None:
    groups = cfg.transfer.groups
    n = cfg.partition.num_clients
    by_column = cfg.partition.method in ("by_column", "by_file")
    seen: set[int] = set()
    total = 0
    for i, g in enumerate(groups):
        key = f"transfer.groups[{i}]"
        if g.model.name_or_path is None and g.model.from_config is None:
            raise ValueError(f"{key}.model: give model.name_or_path or model.from_config")
        if g.model.name_or_path is not None and g.model.from_config is None:
            _check_model_name(g.model.name_or_path, f"{key}.model.name_or_path")
        ids = list(range(g.clients)) if isinstance(g.clients, int) else list(g.clients)
        if not ids:
            raise ValueError(f"{key}.clients: a group without clients ({g.clients!r}); give a count >= 1 or a list "
                             f"of client ids")
        if isinstance(g.clients, list):
            bad = [c for c in ids if c < 0 or (not by_column and c >= n)]
            if bad:
                raise ValueError(f"{key}.clients: ids {bad} are not clients (0..{n - 1}, partition.num_clients)")
            dup = seen.intersection(ids)
            if dup:
                raise ValueError(f"{key}.clients: clients {sorted(dup)} are already in another group")
            seen.update(ids)
        total += len(ids)
    server = cfg.transfer.server_model
    if server is not None and server.name_or_path is not None and server.from_config is None:
        _check_model_name(server.name_or_path, "transfer.server_model.name_or_path")
    if groups and not by_column and total != n:
        raise ValueError(f"transfer.groups give {total} clients a model; partition.num_clients is {n}: every client "
                         f"needs exactly one group")


def _check_model_name(name: str, key: str) -> None:
    from ..models.loader import ALIASES, resolve_name_or_path

    try:
        resolve_name_or_path(name)
    except ConfigError as e:
        raise ValueError(f"{key}: {str(e).replace('model.name_or_path: ', '')}") from None
    from pathlib import Path

    if name not in ALIASES and not Path(name).expanduser().is_dir():  # a Hub id: nothing may be fetched at run time
        from ..models.loader import peek_config

        class _M:
            name_or_path, gguf_file, revision, from_config = name, None, None, None

        if peek_config(_M) is None:
            raise ValueError(f"{key}: {name!r} is not a model at hand (an alias: {', '.join(ALIASES)}, a local "
                             f"directory, or a Hugging Face id already in the local cache)")


@CLIENT_ALGORITHMS.register("fedmd")
class FedMD:
    """A FedMD client (Li & Wang 2019, Alg. 1): Digest (distil toward the server's logits on the public set), Revisit
    (train on its own data), Communicate (its logits on the public set, the only thing it sends)."""

    extra_names: tuple[str, ...] = ()
    tensor_updates = False  # what it sends is logits, not a weight update
    driver = "fedfm.hetero.HeteroSimulation"  # what runs it (each client its group's model), not Simulation
    KEY = "fedmd.state"

    def __init__(self, ctx, public: PublicSet | None = None, num_classes: int | None = None):
        if public is None:
            raise ConfigError("client.algorithm 'fedmd' runs in fedfm.hetero.HeteroSimulation (each client runs its "
                              "group's model, transfer.groups), not in a simulation of one shared model")
        self.ctx, self.public, self.num_classes = ctx, public, num_classes

    server_side: type  # set below

    @staticmethod
    def check_config(cfg) -> None:
        check_transfer(cfg)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.public), int(self.num_classes)

    def load(self, cid: int) -> None:
        """The client's own trainable state (LoRA and head, or the head), or its group's initial values."""
        stored = self.ctx.store.get(cid)
        self.ctx.spec.load_flat(stored[self.KEY] if stored and self.KEY in stored else self.ctx.personal_init)

    def save(self, cid: int) -> None:
        stored = dict(self.ctx.store.get(cid) or {})
        stored[self.KEY] = self.ctx.spec.flat()
        self.ctx.store.put(cid, stored)

    def __call__(self, task: ClientTask) -> ClientResult:
        ctx, cid, cfg = self.ctx, task.client_id, self.ctx.cfg
        t0 = time.perf_counter()
        own = ctx.local[cid]
        self.load(cid)
        torch.manual_seed(task.seed)  # dropout
        digest = float("nan")
        if task.payload:  # Digest: toward what the server sent (nothing in round 1)
            down = cfg.codec.downlink or cfg.codec.name
            try:
                teacher = unpack(task.payload, self.shape, down)
            except UpdateRejected as e:
                return ClientResult(client_id=cid, error=f"fedmd: the server's logits: {e}")
            gen = Randomness.from_config(cfg).torch("transfer_distill", 1, base=task.seed)
            digest = distill(ctx.model, ctx.train_params(), ctx.task, self.public.encoded, self.public.rows, teacher,
                             cfg.transfer.temperature, cfg.transfer.client_distill_steps, cfg.client.lr,
                             cfg.client.batch_size, gen, cfg.client.grad_clip)
        gen = torch.Generator().manual_seed(task.seed)
        loss, steps = local_sgd(ctx, own, own.train, gen)  # Revisit
        z = public_logits(ctx.model, ctx.task, self.public.encoded, self.public.rows, cfg.eval.batch_size)
        self.save(cid)
        return ClientResult(client_id=cid, update=pack(z, cfg.codec.name), num_examples=own.train_rows(ctx.task),
                            metrics={"train_loss": loss, "distill_loss": digest, "steps": steps,
                                     "seconds": time.perf_counter() - t0})


class FedMDServer(ServerSide):
    """The server's half: Aggregate the clients' logits into the consensus z̄, distil it into the foundation model F
    (FedDF, Lin et al. 2020), and send back F's logits (or z̄). It holds F and the public set, never client data."""

    def __init__(self, layout, codec, num_clients: int, cfg=None):
        super().__init__(layout, codec, num_clients, cfg)
        self.fm: Foundation | None = None
        self.back: bytes = b""  # what every client is sent this round (empty in round 1)
        self.num_classes: int | None = None

    def attach(self, fm: Foundation, num_classes: int) -> None:
        self.fm, self.num_classes = fm, num_classes

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.fm.public), int(self.num_classes)

    def payload(self, rnd: int, cid: int) -> bytes:
        return self.back

    def complete(self, rnd: int, results: list[ClientResult]) -> tuple[list[ClientResult], dict[str, Any]]:
        cfg, fm = self.cfg, self.fm
        t = cfg.transfer
        accepted, dropped, logits = [], [], []
        for r in results:
            if r.error is not None:
                dropped.append({"client": r.client_id, "error": r.error})
                continue
            try:
                logits.append(unpack(r.update, self.shape, cfg.codec.name))
                accepted.append(r)
            except UpdateRejected as e:
                dropped.append({"client": r.client_id, "error": str(e)})
        out: dict[str, Any] = {"dropped": dropped} if dropped else {}
        if not logits:
            return accepted, {**out, "unchanged": "no client's logits"}
        z_bar = consensus(logits)
        fm.load()
        bs = cfg.eval.batch_size
        kl_before = kl_to(fm.model, fm.task, fm.public.encoded, fm.public.rows, z_bar, t.temperature, bs)
        gen = Randomness.from_config(cfg).torch("transfer_distill", 0, rnd)
        distill(fm.model, list(fm.spec.params.values()), fm.task, fm.public.encoded, fm.public.rows, z_bar,
                t.temperature, t.server_distill_steps, t.server_lr, cfg.client.batch_size, gen, cfg.client.grad_clip)
        z_fm = public_logits(fm.model, fm.task, fm.public.encoded, fm.public.rows, bs)
        fm.save()
        kl_after = float(kd_loss(z_fm, z_bar, t.temperature))
        down = cfg.codec.downlink or cfg.codec.name
        self.back = pack(z_fm if t.send == "foundation" else z_bar, down)
        return accepted, {**out, "server_kl_before": kl_before, "server_kl_after": kl_after,
                          "consensus_clients": len(logits)}

    def state_dict(self) -> dict[str, Any]:
        return {"back": torch.frombuffer(bytearray(self.back), dtype=torch.uint8).clone() if self.back
                else torch.zeros(0, dtype=torch.uint8),
                "fm": self.fm.state.clone() if self.fm is not None else torch.zeros(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.back = bytes(state["back"].numpy().tobytes()) if "back" in state else b""
        if self.fm is not None and "fm" in state and state["fm"].numel():
            self.fm.state = state["fm"].clone()


FedMD.server_side = FedMDServer
