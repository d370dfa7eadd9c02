"""FedKSeed (Qin et al. 2024, "Federated Full-Parameter Tuning of Billion-Sized Language Models with Communication
Cost under 18 Kilobytes"): zeroth-order steps along directions drawn from K shared candidate seeds; only
(seed index, scalar) pairs travel, up and down.

A client step (the paper's Eq. 2, MeZO's in-place perturbation, Malladi et al. 2023), with z_j ~ N(0, I_d) regenerated
from candidate seed s_j in chunks of ``CHUNK`` values (one 4 MB buffer)::

    ĝ = [L(w + ε z_j; B) − L(w − ε z_j; B)] / (2ε);   w ← w − η ĝ z_j;   keep (j, ĝ)

two forward passes under ``torch.no_grad()``, no backward pass, no stored activations, no copy of w. The update that
travels is the list of (j, ĝ) as raw bytes (int32 index, float32 scalar: 8 bytes a pair, no header). The server sums
each seed's scalars over the round's clients, weighted by their example counts as FedAvg weighs deltas, and steps
the global model by replaying the accumulated pairs (at most K)::

    w_{t+1} = w_t − η Σ_j ḡ_j z_j,    ḡ_j = Σ_k (n_k / n) Σ_{steps of k that drew j} ĝ

It broadcasts the round's pairs instead of tensors: a client (here: a client process, which serves every virtual
client of a simulation on one shared base) replays the blocks of the rounds it has not seen with the same function
on the same starting tensors in the same order (``replay``), so its model equals the server's bit for bit. The
process keeps the global model it rebuilt in a file of its own (``Snapshot``: raw fp32 bytes), the way a device keeps
its model on disk; the in-place perturbation does not restore w exactly in floating point, so after its local steps
a client reloads that file instead of keeping a copy of w in memory.

FedKSeed-Pro (``fedkseed.pro``): seed j is drawn with probability p_j = softmax(ψ̃)_j, ψ̃ the min-max normalised
mean amplitude ψ_j of the scalars seed j received so far (the paper's Eq. 7 and 8, an initial 0 in each history).
"""
from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import numpy as np
import torch

from ..errors import UpdateRejected
from ..privacy import disclose
from ..randomness import Randomness
from . import CLIENT_ALGORITHMS, ClientResult, ClientTask, LocalTraining, ServerSide, batch_stream

PAIR = np.dtype([("j", "<i4"), ("g", "<f4")])  # one (seed index, scalar) pair on the wire: 8 bytes
BLOCK = np.dtype([("version", "<i4"), ("count", "<i4")])  # before each round's pairs in a broadcast


# ---------------------------------------------------------------------------------------------- the shared math

def candidate_seeds(cfg) -> np.ndarray:
    """The K candidate seeds s_1..s_K, the same on every party (derived from ``federation.seed``)."""
    rng = Randomness(cfg.federation.seed).rng("fedkseed_candidates")
    return rng.integers(0, 2**63 - 1, size=cfg.fedkseed.num_seeds, dtype=np.int64)


CHUNK = 1 << 20  # values of z drawn at a time (4 MB): a client holds this buffer, not one as large as a tensor


def scratch_for(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The one CPU buffer z is drawn into, a chunk at a time (reused: no allocation per tensor or chunk)."""
    return torch.empty(min(CHUNK, max((t.numel() for t in tensors), default=0)), dtype=torch.float32)


@torch.no_grad()
def move(tensors: list[torch.Tensor], seed: int, scale: float, scratch: torch.Tensor | None = None) -> None:
    """w ← w + scale · z(seed), in place, z drawn on the CPU from ``seed`` in chunks of ``CHUNK`` values, tensor by
    tensor in the given order (the draws of every party follow the same chunks, so they are the same z).

    ``mul`` then ``add`` (two correctly rounded operations, never a fused multiply-add), so the result does not
    depend on the device's vector width or thread count: the server and any client get the same bits."""
    gen = torch.Generator().manual_seed(int(seed))
    scale = float(np.float32(scale))
    scratch = scratch_for(tensors) if scratch is None else scratch
    for t in tensors:
        flat = t.view(-1)
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start:start + CHUNK]
            z = scratch[:part.numel()]
            torch.randn(part.numel(), generator=gen, out=z)
            part.add_(z.mul_(scale).to(device=t.device, dtype=t.dtype))


def replay(tensors: list[torch.Tensor], seeds: np.ndarray, pairs: np.ndarray, lr: float,
           scratch: torch.Tensor | None = None) -> None:
    """w ← w − η Σ g z_j over ``pairs`` (a PAIR array), in order: the one function by which the server steps the
    global model and a client rebuilds it."""
    scratch = scratch_for(tensors) if scratch is None else scratch
    for j, g in zip(pairs["j"].tolist(), pairs["g"].tolist()):
        move(tensors, int(seeds[j]), -lr * g, scratch)


@torch.no_grad()
def zo_step(tensors: list[torch.Tensor], loss, seed: int, eps: float, lr: float,
            scratch: torch.Tensor | None = None) -> tuple[float, float]:
    """One FedKSeed step along z(seed): two forward passes at w ± εz, then w ← w − η ĝ z (in place; the last move
    also undoes the perturbation, up to rounding). Returns (ĝ as sent, float32; the mean of the two losses)."""
    scratch = scratch_for(tensors) if scratch is None else scratch
    move(tensors, seed, eps, scratch)
    f_plus = float(loss())
    move(tensors, seed, -2 * eps, scratch)
    f_minus = float(loss())
    g = float(np.float32((f_plus - f_minus) / (2 * eps)))
    move(tensors, seed, eps - lr * g, scratch)
    return g, (f_plus + f_minus) / 2


def pack(pairs: list[tuple[int, float]]) -> bytes:
    """The update that travels: the pairs as raw bytes, 8 a pair, no header."""
    return np.array(pairs, dtype=PAIR).tobytes()


def unpack(data: bytes, num_seeds: int, max_pairs: int) -> np.ndarray:
    """A client's pairs, checked: whole pairs, at most ``max_pairs``, indices in [0, K), finite scalars."""
    if len(data) % PAIR.itemsize:
        raise UpdateRejected(f"fedkseed: {len(data)} bytes is not a whole number of {PAIR.itemsize}-byte "
                             f"(seed index, scalar) pairs")
    pairs = np.frombuffer(bytes(data), dtype=PAIR)
    if len(pairs) > max_pairs:
        raise UpdateRejected(f"fedkseed: {len(pairs)} pairs, more than the {max_pairs} steps the client can take")
    if len(pairs) and (pairs["j"].min() < 0 or pairs["j"].max() >= num_seeds):
        raise UpdateRejected(f"fedkseed: a seed index outside [0, {num_seeds}) (fedkseed.num_seeds)")
    if not np.isfinite(pairs["g"]).all():
        raise UpdateRejected("fedkseed: non-finite scalars")
    return pairs


def encode_blocks(blocks: list[tuple[int, np.ndarray]]) -> bytes:
    """A broadcast: for each server step (version v) not yet sent to the client, (v, count) then its pairs."""
    return b"".join(np.array([(v, len(p))], dtype=BLOCK).tobytes() + p.tobytes() for v, p in blocks)


def decode_blocks(data: bytes) -> list[tuple[int, np.ndarray]]:
    out, pos, data = [], 0, bytes(data)
    while pos < len(data):
        head = np.frombuffer(data, dtype=BLOCK, count=1, offset=pos)[0]
        pos += BLOCK.itemsize
        n = int(head["count"])
        out.append((int(head["version"]), np.frombuffer(data, dtype=PAIR, count=n, offset=pos)))
        pos += n * PAIR.itemsize
    return out


def accumulate(pairs: np.ndarray, num_seeds: int) -> torch.Tensor:
    """The per-seed sums Σ ĝ of one client's pairs: a [K] vector, what the FedAvg reducer averages."""
    acc = np.zeros(num_seeds, dtype=np.float64)
    np.add.at(acc, pairs["j"], pairs["g"].astype(np.float64))
    return torch.from_numpy(acc)


class Amplitudes:
    """FedKSeed-Pro's seed probabilities from the history of each seed's scalars: ψ_j the mean |ḡ| (an initial 0
    in each history), min-max normalised, softmax."""

    def __init__(self, num_seeds: int):
        self.total, self.count = np.zeros(num_seeds), np.ones(num_seeds)

    def add(self, pairs: np.ndarray) -> None:
        np.add.at(self.total, pairs["j"], np.abs(pairs["g"].astype(np.float64)))
        np.add.at(self.count, pairs["j"], 1.0)

    def probabilities(self) -> torch.Tensor:
        psi = self.total / self.count
        psi = (psi - psi.min()) / (psi.max() - psi.min() + 1e-10)
        return torch.softmax(torch.from_numpy(psi), 0)


class Snapshot:
    """The global model this process rebuilt, on its own disk (an anonymous temporary file): raw fp32 bytes of the
    shared parameters in spec order, written and read one tensor at a time straight from and into the parameters."""

    def __init__(self, params: list[torch.Tensor]):
        self.file = tempfile.TemporaryFile(prefix="fedkseed-")
        self.save(params)

    @staticmethod
    def _bytes(t: torch.Tensor) -> np.ndarray:
        return t.detach().reshape(-1).numpy().view(np.uint8)

    @torch.no_grad()
    def save(self, params: list[torch.Tensor]) -> None:
        self.file.seek(0)
        for p in params:
            self.file.write(self._bytes(p.detach().cpu().float()))
        self.file.flush()

    @torch.no_grad()
    def load(self, params: list[torch.Tensor]) -> None:
        self.file.seek(0)
        for p in params:
            direct = p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
            buf = p.detach() if direct else torch.empty(p.shape, dtype=torch.float32)
            if self.file.readinto(self._bytes(buf)) != buf.numel() * 4:
                raise RuntimeError("fedkseed: the process's model file is shorter than the model")
            if not direct:
                p.copy_(buf)


# ---------------------------------------------------------------------------------------------- the server's half

def _max_pairs(cfg, num_examples: int) -> int:
    """The most steps a client with ``num_examples`` training rows takes in a round (client.steps, or its epochs)."""
    c = cfg.client
    return c.steps if c.steps is not None else math.ceil(num_examples / c.batch_size) * c.epochs


class PairCheck:
    """The server's check of one result (in place of the codec's ``UpdateCheck``): its pairs (``unpack``), a positive
    example count; returns the per-seed sums [K] (the chain averages them as it averages deltas) and no extras."""

    def __init__(self, cfg, fallback):
        self.cfg, self.fallback = cfg, fallback

    def __call__(self, res) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if res.num_examples <= 0:
            raise UpdateRejected(f"num_examples must be positive, got {res.num_examples}")
        K = self.cfg.fedkseed.num_seeds
        return accumulate(unpack(res.update, K, _max_pairs(self.cfg, res.num_examples)), K), {}

    def rank(self, client_id: int):
        return self.fallback.rank(client_id)


class SeedReplay:
    """The last stage's step for FedKSeed (in place of a server optimizer): w_{t+1} = replay of the round's pairs
    (ḡ_j ≠ 0, by j) on w_t; the pairs become version t+1 of the history the server half broadcasts."""

    def __init__(self, half: "FedKSeedServer"):
        self.half = half

    def init(self) -> dict[str, Any]:
        return {}

    def step(self, state, x: torch.Tensor, g_bar: torch.Tensor) -> tuple[dict, torch.Tensor]:
        nz = torch.nonzero(g_bar).flatten().numpy()
        pairs = np.empty(len(nz), dtype=PAIR)
        pairs["j"], pairs["g"] = nz, g_bar.numpy()[nz]
        x = x.clone()
        replay(list(self.half.layout.unflatten(x).values()), self.half.seeds, pairs, self.half.cfg.client.lr)
        self.half.history.append(pairs)
        return state, x


class FedKSeedServer(ServerSide):
    """FedKSeed's server half: the history of accumulated pairs (one block per server step, checkpointed) and what
    each client was last sent. A client is sent the blocks after the version it was last sent (all of them the first
    time it is sampled, and after a resume, when every client process starts again from the initial model)."""

    def __init__(self, layout, codec, num_clients: int, cfg=None):
        super().__init__(layout, codec, num_clients, cfg)
        self.seeds = candidate_seeds(cfg)
        self.history: list[np.ndarray] = []  # history[v − 1]: the pairs of server step v
        self.sent: dict[int, int] = {}  # client id -> the version it was last sent (not checkpointed: see above)
        self._blocks: dict[int, bytes] = {}
        if cfg is not None and cfg.client.grad_clip is not None:  # said at the start rather than silently ignored
            self.notes = [f"fedkseed: client.grad_clip={cfg.client.grad_clip:g} is not used (a zeroth-order step "
                          f"has no gradient to clip; the step is η ĝ z as the paper takes it)"]

    def payload(self, rnd: int, cid: int) -> bytes:
        start, now = self.sent.get(cid, 0), len(self.history)
        self.sent[cid] = now
        for v in range(start + 1, now + 1):
            if v not in self._blocks:
                self._blocks[v] = encode_blocks([(v, self.history[v - 1])])
        return b"".join(self._blocks[v] for v in range(start + 1, now + 1))

    def update_check(self, check):
        return PairCheck(self.cfg, check)

    def server_optimizer(self, optimizer):
        return SeedReplay(self)

    def state_dict(self) -> dict[str, Any]:
        flat = np.concatenate(self.history) if self.history else np.zeros(0, dtype=PAIR)
        return {"counts": torch.tensor([len(p) for p in self.history], dtype=torch.int64),
                "j": torch.from_numpy(flat["j"].copy()), "g": torch.from_numpy(flat["g"].copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "counts" not in state:
            return
        flat = np.empty(int(state["counts"].sum()), dtype=PAIR)
        flat["j"], flat["g"] = state["j"].numpy(), state["g"].numpy()
        bounds = np.cumsum([0] + state["counts"].tolist())
        self.history = [flat[a:b].copy() for a, b in zip(bounds[:-1], bounds[1:])]
        self.sent, self._blocks = {}, {}


# ---------------------------------------------------------------------------------------------- the client

@CLIENT_ALGORITHMS.register("fedkseed")
class FedKSeed(LocalTraining):
    """FedKSeed's client, one per process: the process's global model (its version, its file), the candidate seeds,
    FedKSeed-Pro's amplitudes; each task replays the blocks the process has not seen, then takes ``client.steps``
    (or ``client.epochs`` of) zeroth-order steps from the global model, sends the pairs and reloads the global."""

    server_side = FedKSeedServer
    tensor_updates = False  # the update is (seed, scalar) pairs: nothing a codec, DP clip or attack on tensors reads
    # what a runtime must keep for it between tasks (ray workers and Flower ClientApps do not)
    process_state = "client.algorithm 'fedkseed' keeps the global model each client process rebuilt from the seeds"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.fcfg = ctx.cfg.fedkseed
        self.seeds = candidate_seeds(ctx.cfg)
        self.params = list(ctx.spec.params.values())
        self.scratch = scratch_for(self.params)  # where z is drawn, a chunk at a time
        self.version = 0  # server steps replayed into this process's model
        self.amplitudes = Amplitudes(self.fcfg.num_seeds)
        self.snapshot = Snapshot(self.params)  # the initial global model (built before any checkpoint loads)

    @staticmethod
    def check_config(cfg) -> None:
        from ..models import personal_patterns

        c, s = cfg.client, cfg.server
        why = [
            (s.aggregator != "fedavg", f"server.aggregator {s.aggregator!r} needs each client's update as a tensor; "
                                       f"the server sees only (seed, scalar) pairs, averaged by fedavg"),
            (s.optimizer != "fedavg" or s.lr != 1.0, f"server.optimizer {s.optimizer!r} with server.lr {s.lr:g}: "
                                                     f"the server steps by replaying the pairs (use fedavg, lr 1)"),
            (cfg.secagg.enabled, "secagg.enabled: the server must read each client's pairs to replay them"),
            (cfg.privacy.mode != "none", f"privacy.mode {cfg.privacy.mode!r}: neither DP-FedAvg's clip nor DP-SGD's "
                                         f"per-example gradients are defined for the pairs"),
            (cfg.adapter.rank_per_client is not None, "adapter.rank_per_client: every client perturbs the same "
                                                      "parameters"),
            (bool(personal_patterns(cfg.adapter)), f"personal parameters (adapter.personal, or adapter.method "
                                                   f"{cfg.adapter.method!r}): every trainable parameter is shared"),
            (cfg.codec.name != "fp32", f"codec.name {cfg.codec.name!r}: no tensor travels to encode (keep fp32)"),
            (s.max_update_norm is not None, "server.max_update_norm: an update is pairs, not a tensor whose L2 norm "
                                            "the server computes"),
            (c.optimizer != "sgd" or c.momentum or c.weight_decay or c.grad_accum != 1,
             "client.optimizer must be sgd with client.momentum 0, client.weight_decay 0 and client.grad_accum 1: "
             "a step is the paper's zeroth-order SGD step w ← w − η ĝ z (η = client.lr)"),
        ]
        for refused, reason in why:
            if refused:
                raise ValueError(f"client.algorithm 'fedkseed': {reason}")

    def _catch_up(self, payload: bytes) -> None:
        """Replay the broadcast blocks this process has not seen into its global model (from its file), then keep
        the result as its file: the model is now the server's global, bit for bit."""
        new = [(v, p) for v, p in decode_blocks(payload) if v > self.version]
        if new and new[0][0] != self.version + 1:
            raise ValueError(f"fedkseed: this process holds the global model of version {self.version}, and the "
                             f"broadcast starts at version {new[0][0]}")
        self.snapshot.load(self.params)
        for v, pairs in new:
            replay(self.params, self.seeds, pairs, self.ctx.cfg.client.lr, self.scratch)
            self.amplitudes.add(pairs)
            self.version = v
        if new:
            self.snapshot.save(self.params)

    def __call__(self, task: ClientTask) -> ClientResult:
        ctx, cfg = self.ctx, self.ctx.cfg
        t0 = time.perf_counter()
        self._catch_up(task.payload)
        own = ctx.local[task.client_id]
        scores = self.evaluate(task, own)
        order = torch.Generator().manual_seed(task.seed)  # the batch order, as local training draws it
        choice = Randomness.from_config(cfg).torch("fedkseed_choice", base=task.seed)
        p = self.amplitudes.probabilities() if self.fcfg.pro else None
        pairs, losses = [], []
        ctx.model.eval()  # the same function at w + εz and w − εz: no dropout
        try:
            for batch in batch_stream(ctx.task, own.encoded, own.train, cfg.client.batch_size, order,
                                      cfg.client.steps, cfg.client.epochs):
                j = int(torch.multinomial(p, 1, generator=choice)) if p is not None else \
                    int(torch.randint(self.fcfg.num_seeds, (1,), generator=choice))
                g, loss = zo_step(self.params, lambda: ctx.task.loss(ctx.model, batch), int(self.seeds[j]),
                                  self.fcfg.eps, cfg.client.lr, self.scratch)
                pairs.append((j, g))
                losses.append(loss)
        finally:
            self.snapshot.load(self.params)  # the local model is discarded: back to the global
            ctx.model.train()
        told = {"train_loss": float(np.mean(losses))} if losses else {}  # the mean of L(w ± εz) over the steps
        return disclose(cfg, ClientResult(
            client_id=task.client_id, update=pack(pairs), num_examples=own.train_rows(ctx.task),
            metrics={**told, "steps": len(pairs), "seconds": time.perf_counter() - t0, **scores}))
