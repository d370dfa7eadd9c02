"""Aggregation: a chain of small stages over the stacked client updates, ending in a reducer.

Each stage maps ``(updates [K, D], weights [K]) -> (updates, weights)``; the reducer maps them to one delta [D].
Stages that keep state (adaptive clipping, error feedback, ...) expose ``state_dict``/``load_state_dict``
so the whole chain is checkpointed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..registry import Registry
from ..stateful import Stateful

AGGREGATORS: Registry[Callable[..., "Aggregator"]] = Registry("aggregator")


@dataclass
class RoundInfo:
    """What a reducer may need beyond the updates: the global flat state x, each client's LoRA rank, the spec."""

    x: torch.Tensor
    ranks: list[int]
    spec: Any


class Stage(Stateful):
    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class WeightedMean(Stateful):
    """FedAvg's reducer (McMahan et al. 2017): sum_k n_k Δ_k / sum_k n_k."""

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, info=None) -> torch.Tensor:
        w = weights.to(updates.dtype)
        return (w / w.sum()) @ updates


class Aggregator(Stateful):
    """``stages`` in order, then ``reduce``."""

    def __init__(self, stages: Sequence[Stage], reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.stages = list(stages)
        self.reduce = reduce

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, info: "RoundInfo | None" = None) -> torch.Tensor:
        if updates.ndim != 2 or updates.shape[0] != weights.shape[0] or updates.shape[0] == 0:
            raise ValueError(f"aggregator: expected updates [K, D] and weights [K], got {tuple(updates.shape)}, {tuple(weights.shape)}")
        for stage in self.stages:
            updates, weights = stage(updates, weights)
        return self.reduce(updates, weights, info)

    def state_dict(self) -> dict[str, Any]:
        parts = [*self.stages, self.reduce]
        return {str(i): getattr(s, "state_dict", dict)() for i, s in enumerate(parts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, s in enumerate([*self.stages, self.reduce]):
            if hasattr(s, "load_state_dict"):
                s.load_state_dict(state.get(str(i), {}))


@AGGREGATORS.register("fedavg")
def fedavg(cfg=None) -> Aggregator:
    """FedAvg (McMahan et al. 2017): example-weighted mean of the client deltas."""
    return Aggregator([], WeightedMean())


fedavg.linear_sum = True  # a (weighted) sum of the updates: what DP-FedAvg's noise and a secure sum need


def make_aggregator(cfg) -> Aggregator:
    return AGGREGATORS.get(cfg.server.aggregator)(cfg)


from . import lora, robust  # noqa: E402,F401  (register hetlora, flexlora; the robust reducers)
