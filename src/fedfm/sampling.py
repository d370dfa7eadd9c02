"""Client samplers, keyed by ``federation.sampling``: which k of the candidate clients take part.

``sample(rng, k, candidates, sizes)`` draws without replacement from ``candidates`` (client ids); ``sizes`` are all
clients' training-set sizes. Whether candidates are all clients or only those online at the simulated time is the
sampler's ``online_only`` flag.
"""
from __future__ import annotations

import math

import numpy as np

from .registry import Registry

SAMPLERS: Registry["Sampler"] = Registry("client sampler")


def num_sampled(fed, num_clients: int) -> int:
    """Clients per round: ``clients_per_round`` or ``max(min_clients, ceil(fraction·N))``, at most N."""
    if fed.fraction is not None:
        k = max(fed.min_clients, int(math.ceil(fed.fraction * num_clients)))
    else:
        k = fed.clients_per_round
    return min(k, num_clients)


class Sampler:
    online_only = False

    def __call__(self, rng: np.random.Generator, k: int, candidates: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@SAMPLERS.register("uniform")
class Uniform(Sampler):
    """Uniform without replacement (McMahan et al. 2017); offline clients may be drawn and then do not answer."""

    def __call__(self, rng, k, candidates, sizes):
        return np.sort(rng.choice(candidates, size=min(k, len(candidates)), replace=False))


@SAMPLERS.register("size")
class ProportionalToSize(Sampler):
    """Without replacement, each draw with probability proportional to the client's number of training examples
    (the sampling scheme of Li et al. 2020, "On the convergence of FedAvg on non-IID data", minus replacement)."""

    def __call__(self, rng, k, candidates, sizes):
        w = np.asarray(sizes, dtype=np.float64)[candidates]
        if w.sum() <= 0:
            w = np.ones_like(w)
        k = min(k, int((w > 0).sum()) or len(candidates))
        return np.sort(rng.choice(candidates, size=k, replace=False, p=w / w.sum()))


@SAMPLERS.register("poisson")
class Poisson(Sampler):
    """Poisson sampling: each candidate takes part independently with probability q = k / N (the sampling that
    DP-FedAvg's privacy amplification assumes); the round's size varies and may be 0."""

    def __call__(self, rng, k, candidates, sizes):
        q = min(k / len(candidates), 1.0)
        return np.sort(candidates[rng.random(len(candidates)) < q])


@SAMPLERS.register("available")
class Available(Uniform):
    """Availability-aware: uniform among the clients online at the current simulated time."""

    online_only = True


def make_sampler(name: str) -> Sampler:
    return SAMPLERS.get(name)()
