"""Aggregation: one chain of nested stages per run, one interface for all (TFF's aggregation processes, Optax's
transformations)::

    state = chain.init()                                            # nested dict of tensors and builtins
    state, result, measurements = chain(state, updates, weights)

A stage holds its configuration only; its state passes explicitly, so the whole chain's state is one nested dict the
server checkpoints under one key. An outer stage wraps an ``inner`` one (``DPFedAvg(inner=SecureSum())``) and calls
it once. The stages are in ``chain.py`` (and ``privacy/dp.py``, ``privacy/secure.py``); this module holds the
interface, the reducers' stage and FedAvg's reducer; the registry ``AGGREGATORS`` (``server.aggregator``) gives the
plain sum's stage of a config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..registry import Registry

AGGREGATORS: Registry[Callable[..., "Stage"]] = Registry("aggregator")


@dataclass(frozen=True)
class Updates:
    """One round's input to the chain: what the clients sent and the round's context.

    Validation fills ``accepted``, ``flat`` and ``ranks``; DP-FedAvg sets ``clip`` (and ``noise_share``) for its inner
    sum. Stages pass it on changed with ``dataclasses.replace``."""

    rnd: int
    results: list  # the round's ClientResults as received, errors included
    x: torch.Tensor  # the global flat state the round started from
    spec: Any
    accepted: list = ()  # (ClientResult, decoded extras) of each result that passed validation, in order
    flat: Optional[torch.Tensor] = None  # their decoded updates, stacked [K, D]
    ranks: list = ()  # their LoRA ranks
    clip: Optional[float] = None  # DP-FedAvg: each update is clipped to this L2 norm before it is summed
    noise_share: Optional[float] = None  # DP-FedAvg, distributed noise: each client adds N(0, noise_share² I)


class Stage:
    """One stage: ``init() -> state``; ``stage(state, updates, weights) -> (state, result, measurements)``.

    ``weights`` [K]: one per result (None: the example counts). ``result`` None: the round changes nothing.
    ``measurements`` go into the round's metrics row, except the keys the server reads (``dropped``, ``accepted``,
    ``unchanged``: why the result is None) and those an outer stage consumes (``unclipped``, ``noise_shares``)."""

    inner: Optional["Stage"] = None

    def init(self) -> dict[str, Any]:
        return {} if self.inner is None else {"inner": self.inner.init()}

    def __call__(self, state: dict, updates: Updates, weights) -> tuple[dict, Any, dict[str, Any]]:
        raise NotImplementedError


@dataclass
class RoundInfo:
    """What a reducer may need beyond the updates: the global flat state x, each client's LoRA rank, the spec."""

    x: torch.Tensor
    ranks: list[int]
    spec: Any


class Reduce(Stage):
    """A reducer over the accepted updates stacked [K, D]: ``reducer(updates, weights, RoundInfo) -> Δ [D]``."""

    def __init__(self, reducer):
        self.reducer = reducer

    def __call__(self, state, u, weights):
        return state, self.reducer(u.flat, weights.float(), RoundInfo(x=u.x, ranks=list(u.ranks), spec=u.spec)), {}


class WeightedMean:
    """FedAvg's reducer (McMahan et al. 2017): sum_k n_k Δ_k / sum_k n_k."""

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, info=None) -> torch.Tensor:
        w = weights.to(updates.dtype)
        return (w / w.sum()) @ updates


@AGGREGATORS.register("fedavg")
def fedavg(cfg=None) -> Stage:
    """FedAvg (McMahan et al. 2017): example-weighted mean of the client deltas."""
    return Reduce(WeightedMean())


fedavg.linear_sum = True  # a (weighted) sum of the updates: what DP-FedAvg's noise and a secure sum need


def make_aggregator(cfg) -> Stage:
    return AGGREGATORS.get(cfg.server.aggregator)(cfg)


from . import lora, robust  # noqa: E402,F401  (register hetlora, flexlora; the robust reducers)
