"""The stages of the aggregation chain and ``build_chain``, which composes them from a run's config (the interface:
``Stage`` and ``Updates`` in ``aggregation/__init__.py``).

    plain                 ServerStep(Validate(MinClients(aggregator)))     aggregator: AGGREGATORS[server.aggregator]
    fedbuff               ServerStep(Validate(MinClients(FedBuffMean(aggregator))))
    privacy.mode: client  ServerStep(DPFedAvg(Validate(ClippedSum())))
    secagg.enabled        ServerStep(SecureSum())          with DP: ServerStep(DPFedAvg(SecureSum()))

Under secure aggregation each client checks and (under DP) clips its own update before masking it; ``SecureSum``
runs the same ``UpdateCheck`` on the client's side. Combinations that are unsound are refused by ``config.py``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from ..errors import UpdateRejected
from ..models.ranks import lora_rank
from ..privacy.dp import DPFedAvg, clipped_sum
from ..registries import capability
from . import Stage, make_aggregator
from .server_opt import make_server_optimizer


class UpdateCheck:
    """One result's update decoded with the client's view and checked (raises UpdateRejected): the codec's own checks
    (names, shapes, dtypes, finite values), a positive example count, the L2 norm within ``server.max_update_norm``,
    the client algorithm's extras present and decodable. Returns (flat update [D], decoded extras)."""

    def __init__(self, codec, spec, view: Callable[[int], Any], max_update_norm: Optional[float],
                 extra_names: tuple[str, ...] = (), algorithm: str = "local"):
        self.codec, self.spec, self.view = codec, spec, view
        self.max_update_norm, self.extra_names, self.algorithm = max_update_norm, extra_names, algorithm
        self.full_rank = lora_rank(spec)

    def __call__(self, res) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        view = self.view(res.client_id)
        delta = view.expand(self.codec.decode(res.update, view))
        if res.num_examples <= 0:
            raise UpdateRejected(f"num_examples must be positive, got {res.num_examples}")
        bound = self.max_update_norm
        if bound is not None:
            norm = float(torch.sqrt(sum(t.double().pow(2).sum() for t in delta.values())))
            if norm > bound:
                raise UpdateRejected(f"L2 norm {norm:.4g} above server.max_update_norm={bound:g}")
        extras = {}
        for name in self.extra_names:
            if name not in res.extras:
                raise UpdateRejected(f"missing {name!r} (client.algorithm {self.algorithm!r} sends it)")
            extras[name] = self.codec.decode(res.extras[name], self.spec)
        return self.spec.flatten(delta), extras

    def rank(self, client_id: int) -> Optional[int]:
        """The client's LoRA rank (adapter.rank_per_client), else the shared one."""
        return getattr(self.view(client_id), "rank", self.full_rank)


class Validate(Stage):
    """A client's error or a result the check rejects is dropped (measurements' ``dropped``: id and error); the inner
    stage gets the accepted updates stacked [K, D] with their weights (example counts, or the schedule's)."""

    def __init__(self, check: UpdateCheck, inner: Stage):
        self.check, self.inner = check, inner

    def __call__(self, state, u, weights):
        accepted, flats, w, dropped = [], [], [], []
        for i, res in enumerate(u.results):
            if res.error is not None:
                dropped.append({"id": res.client_id, "error": res.error})
                continue
            try:
                flat, extras = self.check(res)
            except UpdateRejected as e:
                dropped.append({"id": res.client_id, "error": f"rejected: {e}"})
                continue
            accepted.append((res, extras))
            flats.append(flat)
            w.append(float(res.num_examples) if weights is None else float(weights[i]))
        u = replace(u, accepted=accepted, ranks=[self.check.rank(r.client_id) for r, _ in accepted],
                    flat=torch.stack(flats) if flats else torch.zeros(0, u.spec.numel))
        inner, result, measurements = self.inner(state["inner"], u, torch.tensor(w, dtype=torch.float64))
        return {"inner": inner}, result, {**measurements, "dropped": dropped, "accepted": accepted}


class MinClients(Stage):
    """No update from fewer than ``n`` accepted results (``federation.min_clients``; DP-FedAvg instead releases a
    noised update every round)."""

    def __init__(self, n: int, inner: Stage):
        self.n, self.inner = n, inner

    def __call__(self, state, u, weights):
        if len(u.accepted) < self.n:
            return state, None, {"unchanged": f"only {len(u.accepted)} client(s) returned a usable update "
                                              f"(federation.min_clients={self.n})"}
        inner, result, measurements = self.inner(state["inner"], u, weights)
        return {"inner": inner}, result, measurements


class FedBuffMean(Stage):
    """FedBuff (Nguyen et al. 2022): Δ̄ = (1/K) Σ_k s(τ_k) Δ_k over the K buffered results, the weights s(τ_k) the
    schedule's: the inner weighted mean × Σ_k w_k / K. K counts every result that arrived: one that validation
    rejected counts as zero, it does not shrink K."""

    def __init__(self, inner: Stage):
        self.inner = inner

    def __call__(self, state, u, weights):
        inner, mean, measurements = self.inner(state["inner"], u, weights)
        K = sum(r.error is None for r in u.results)
        return {"inner": inner}, mean * float(weights.sum() / K), measurements


class ClippedSum(Stage):
    """The plain linear sum under DP-FedAvg: Σ_k Δ_k · min(1, C / ‖Δ_k‖), C = ``updates.clip``, every client alike
    (float64); reports how many of the K it summed were unclipped (``unclipped``: exact, so the wrapper releases it
    only noised)."""

    def __call__(self, state, u, weights):
        total, unclipped = clipped_sum(u.flat, u.clip)
        return state, total, {"unclipped": (unclipped, len(u.flat))}


class ServerStep(Stage):
    """The last stage: x_{t+1} from the inner stages' Δ_t by the server optimizer (``server_opt.py``); its state is
    the optimizer's (FedAvgM's momentum, FedAdam's moments); its result the new global flat state."""

    def __init__(self, optimizer, inner: Stage):
        self.optimizer, self.inner = optimizer, inner

    def init(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.init(), "inner": self.inner.init()}

    def __call__(self, state, u, weights):
        inner, delta, measurements = self.inner(state["inner"], u, weights)
        if delta is None:
            return {**state, "inner": inner}, None, measurements
        opt, x = self.optimizer.step(state["optimizer"], u.x, delta)
        return {"optimizer": opt, "inner": inner}, x, measurements


def build_chain(cfg, check: UpdateCheck, mechanism=None, max_examples: int = 1, secret: bool = False,
                step: Callable[[Any], Any] = lambda optimizer: optimizer) -> Stage:
    """The run's chain (module docstring). ``mechanism``: client-level DP's sampling, noise multiplier and
    accountant (privacy.mode: client); ``max_examples``: the largest client's example count (secure FedAvg's
    public weight scale); ``secret``: DP noise from the OS; ``step(optimizer)``: the last stage's step (a client
    algorithm's server half may replace the server optimizer: FedKSeed replays seeds)."""
    fed, sa = cfg.federation, cfg.secagg
    if sa.enabled:
        from ..privacy.secure import SecureSum

        total = SecureSum(cfg, check, max_examples, fed.seed, mechanism)
    elif mechanism is not None:
        total = Validate(check, ClippedSum())
    else:
        total = make_aggregator(cfg)
        if capability("federation.schedule", fed.schedule, "buffered"):
            total = FedBuffMean(total)
        total = Validate(check, MinClients(fed.min_clients, total))
    if mechanism is not None:
        shares = fed.min_clients if sa.enabled and sa.dp_noise == "distributed" else None
        total = DPFedAvg(cfg.privacy, mechanism.noise_multiplier, mechanism.per_round, fed.seed, secret=secret,
                         inner=total, accountant=mechanism, noise_shares=shares)
    return ServerStep(step(make_server_optimizer(cfg)), total)
