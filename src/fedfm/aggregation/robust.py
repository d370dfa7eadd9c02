"""Robust aggregation: reducers that bound what a minority of malicious clients can do to the global update.

Each works on the flat stacked updates ``[K, D]``. ``f``, the number of clients assumed Byzantine, is
``floor(server.byzantine_fraction * K)`` for the round's K results.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from . import AGGREGATORS, Reduce, Stage, WeightedMean


class CoordinateMedian:
    """Coordinate-wise median (Yin et al. 2018): each coordinate of the update is the median of the clients' values."""

    def __call__(self, updates, weights, info=None):
        k = updates.shape[0]
        s = updates.sort(dim=0).values
        if k % 2:
            return s[k // 2]
        return 0.5 * (s[k // 2 - 1] + s[k // 2])  # the mean of the two middle values, as numpy's median


class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the b = floor(βK) largest and b smallest values of each
    coordinate and average the rest."""

    def __init__(self, beta: float):
        self.beta = beta

    def __call__(self, updates, weights, info=None):
        k = updates.shape[0]
        b = int(math.floor(self.beta * k))
        if k - 2 * b < 1:
            b = (k - 1) // 2
        s = updates.sort(dim=0).values
        return s[b:k - b].mean(0)


def krum_scores(updates: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each update (Blanchard et al. 2017): the sum of squared distances to its K − f − 2 nearest
    other updates."""
    k = updates.shape[0]
    d2 = torch.cdist(updates.double(), updates.double()).pow(2)
    n = max(k - f - 2, 1)
    d2.fill_diagonal_(float("inf"))
    nearest = d2.sort(dim=1).values[:, :min(n, k - 1)]
    return nearest.sum(1)


class Krum:
    """Krum (Blanchard et al. 2017): the one update with the smallest score; Multi-Krum: the example-weighted mean
    of the m = K − f updates with the smallest scores."""

    def __init__(self, byzantine_fraction: float, multi: bool):
        self.fraction = byzantine_fraction
        self.multi = multi
        self.last_selected: list[int] = []

    def __call__(self, updates, weights, info=None):
        k = updates.shape[0]
        f = int(math.floor(self.fraction * k))
        scores = krum_scores(updates, f)
        order = torch.argsort(scores, stable=True)
        m = max(k - f, 1) if self.multi else 1
        chosen = order[:m]
        self.last_selected = sorted(int(i) for i in chosen)
        w = weights[chosen].to(updates.dtype)
        return (w / w.sum()) @ updates[chosen]


class GeometricMedian:
    """RFA (Pillutla et al. 2022): the weighted geometric median of the updates by the smoothed Weiszfeld algorithm,
    v ← Σ β_k Δ_k / Σ β_k with β_k = α_k / max(ν, ‖v − Δ_k‖), starting from the weighted mean."""

    def __init__(self, iters: int, nu: float = 1e-6):
        self.iters = iters
        self.nu = nu

    def __call__(self, updates, weights, info=None):
        u = updates.double()
        alpha = weights.double() / weights.double().sum()
        v = alpha @ u
        for _ in range(self.iters):
            beta = alpha / (u - v).norm(dim=1).clamp_min(self.nu)
            v = (beta / beta.sum()) @ u
        return v.to(updates.dtype)


class NormBound(Stage):
    """Norm bounding (Sun et al. 2019): scale each update to L2 norm at most M before the inner reducer."""

    def __init__(self, bound: float, inner: Stage):
        self.bound, self.inner = bound, inner

    def __call__(self, state, u, weights):
        norms = u.flat.norm(dim=1, keepdim=True)
        flat = u.flat * (self.bound / norms.clamp_min(1e-12)).clamp(max=1.0)
        inner, result, measurements = self.inner(state["inner"], replace(u, flat=flat), weights)
        return {"inner": inner}, result, measurements


@AGGREGATORS.register("median")
def median(cfg=None) -> Stage:
    return Reduce(CoordinateMedian())


@AGGREGATORS.register("trimmed-mean")
def trimmed_mean(cfg=None) -> Stage:
    return Reduce(TrimmedMean(cfg.server.trim_fraction if cfg is not None else 0.1))


@AGGREGATORS.register("krum")
def krum(cfg=None) -> Stage:
    return Reduce(Krum(cfg.server.byzantine_fraction if cfg is not None else 0.2, multi=False))


@AGGREGATORS.register("multi-krum")
def multi_krum(cfg=None) -> Stage:
    return Reduce(Krum(cfg.server.byzantine_fraction if cfg is not None else 0.2, multi=True))


@AGGREGATORS.register("geometric-median")
def geometric_median(cfg=None) -> Stage:
    return Reduce(GeometricMedian(cfg.server.geomed_iters if cfg is not None else 4))


@AGGREGATORS.register("norm-bound")
def norm_bound(cfg=None) -> Stage:
    if cfg is None or cfg.server.norm_bound is None:
        from ..errors import ConfigError

        raise ConfigError("server.aggregator 'norm-bound' needs server.norm_bound (the largest L2 norm an update keeps)")
    return NormBound(cfg.server.norm_bound, Reduce(WeightedMean()))
