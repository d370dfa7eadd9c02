"""Split one dataset into per-client index sets (the simulated federation).

Every partitioner has the signature

    fn(labels, groups, spec, rng, *, n=None) -> list[np.ndarray]

``labels`` are int class ids per example (or None), ``groups`` the values of
``data.client_column`` per example (or None), ``n`` the number of examples (only
needed when both are None). It returns one sorted int64 index array per client;
together the arrays are a partition of ``range(n)``: every example exactly once.
Use :func:`partition`, which validates the spec and checks the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import ConfigError, DataError
from ..randomness import Randomness
from ..registry import Registry

Partitioner = Callable[..., list]
PARTITIONERS: Registry[Partitioner] = Registry("partitioner")

DIRICHLET_TRIES = 100
# Methods whose number of clients comes from the data, not from partition.num_clients.
_DATA_DEFINED_CLIENTS = {"by_column", "by_file"}


@dataclass
class PartitionSpec:
    """Plain values taken from the run config section ``partition``."""

    num_clients: int = 10
    alpha: float = 0.5          # dirichlet concentration
    shards_per_client: int = 2  # `shards`: k labels per client
    power: float = 1.5          # `quantity`: exponent of the power law on client sizes
    min_size: int = 2           # every client gets at least this many examples (where possible)


# ---------------------------------------------------------------------------- helpers


def _num_examples(labels: Optional[np.ndarray], groups: Optional[np.ndarray], n: Optional[int]) -> Optional[int]:
    """The dataset size implied by labels / groups / n (they must agree); None if nothing says."""
    sizes = {name: len(a) for name, a in (("labels", labels), ("groups", groups)) if a is not None}
    if n is not None:
        sizes["n"] = int(n)
    if len(set(sizes.values())) > 1:
        raise DataError(f"partition: inconsistent dataset sizes {sizes}")
    return next(iter(sizes.values()), None)


def _require_n(labels, groups, n) -> int:
    size = _num_examples(labels, groups, n)
    if size is None:
        raise DataError("partition: cannot tell the number of examples (no labels, no groups, no n)")
    return size


def _require_labels(method: str, labels: Optional[np.ndarray]) -> np.ndarray:
    if labels is None:
        raise ConfigError(
            f"partition.method {method!r} needs labels (task has none); use iid, quantity or by_column"
        )
    return labels


def _as_labels(labels) -> Optional[np.ndarray]:
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"partition: labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.number) and np.all(arr == np.round(arr))):
            raise DataError(f"partition: labels must be integer class ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise DataError(f"partition: labels must be >= 0, got {arr.min()}")
    return arr


def _as_groups(groups) -> Optional[np.ndarray]:
    if groups is None:
        return None
    arr = np.asarray(groups)
    if arr.ndim != 1:
        raise DataError(f"data.client_column must give one value per example, got shape {arr.shape}")
    return arr


def _sorted_parts(parts) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _split_by_sizes(indices: np.ndarray, sizes) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(sizes)[:-1]) if len(sizes) else []


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random examples from the currently largest client to each client below min_size."""
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = int(np.argmax([len(p) for p in parts]))
            if donor == i or len(parts[donor]) <= min_size:
                break  # not enough examples to go round (the caller validated n, so unreachable)
            j = int(rng.integers(len(parts[donor])))
            parts[i] = np.append(parts[i], parts[donor][j])
            parts[donor] = np.delete(parts[donor], j)
    return parts


def check_partition(parts: list[np.ndarray], n: int) -> None:
    """Raise AssertionError unless ``parts`` are sorted int64 arrays covering range(n) exactly once."""
    for i, p in enumerate(parts):
        if not isinstance(p, np.ndarray) or p.dtype != np.int64 or p.ndim != 1:
            raise AssertionError(f"partition: client {i} is not a 1-D int64 array")
        if p.size > 1 and np.any(np.diff(p) <= 0):
            raise AssertionError(f"partition: client {i} indices are not sorted and unique")
    allidx = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if allidx.size != n or not np.array_equal(np.sort(allidx), np.arange(n)):
        raise AssertionError(f"partition: the client index sets are not a partition of range({n})")


# ------------------------------------------------------------------------ partitioners


@PARTITIONERS.register("iid")
def iid(labels, groups, spec: PartitionSpec, rng: np.random.Generator, *, n=None) -> list[np.ndarray]:
    """Uniform random split into nearly equal parts (the IID baseline of McMahan et al. 2017)."""
    size = _require_n(labels, groups, n)
    return _sorted_parts(np.array_split(rng.permutation(size), spec.num_clients))


@PARTITIONERS.register("dirichlet")
def dirichlet(labels, groups, spec: PartitionSpec, rng: np.random.Generator, *, n=None) -> list[np.ndarray]:
    """Label skew: per class, client shares ~ Dir(alpha) (Hsu et al. 2019, arXiv:1909.06335)."""
    labels = _require_labels("dirichlet", labels)
    k = spec.num_clients
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(k, spec.alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]
        if min(len(p) for p in merged) >= spec.min_size:
            return _sorted_parts(merged)
    return _sorted_parts(_top_up(merged, spec.min_size, rng))


@PARTITIONERS.register("shards")
def shards(labels, groups, spec: PartitionSpec, rng: np.random.Generator, *, n=None) -> list[np.ndarray]:
    """Sort by label, cut into shards, deal k random shards per client (McMahan et al. 2017, FedAvg)."""
    labels = _require_labels("shards", labels)
    k, s = spec.num_clients, spec.shards_per_client
    if len(labels) < k * s:
        raise ConfigError(
            f"partition.shards_per_client: {k} clients x {s} shards need at least {k * s} examples, "
            f"got {len(labels)}"
        )
    shuffled = rng.permutation(len(labels))  # random order within each label
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(order, k * s)
    deal = rng.permutation(k * s).reshape(k, s)
    return _sorted_parts(np.concatenate([pieces[j] for j in row]) for row in deal)


@PARTITIONERS.register("by_column")
def by_column(labels, groups, spec: PartitionSpec, rng: np.random.Generator, *, n=None) -> list[np.ndarray]:
    """Natural partition: one client per distinct value of data.client_column (in sorted order)."""
    if groups is None:
        raise ConfigError("partition.method 'by_column' needs data.client_column (a column naming each example's client)")
    try:
        _, inverse = np.unique(groups, return_inverse=True)
    except TypeError as e:
        raise DataError(f"data.client_column values cannot be sorted (mixed types or missing values?): {e}") from e
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    return _sorted_parts(_split_by_sizes(order, np.bincount(inverse)))


@PARTITIONERS.register("by_file")
def by_file(labels, groups, spec: PartitionSpec, rng: np.random.Generator, *, n=None) -> list[np.ndarray]:
    """Natural partition: one client per source file (``by_column`` on the ``file`` column that file sources carry)."""
    if groups is None:
        raise ConfigError("partition.method 'by_file' needs the 'file' column (data.client_column: file), which a .txt "
                          "file or a folder of data files provides")
    return by_column(labels, groups, spec, rng, n=n)


@PARTITIONERS.register("quantity")
def quantity(labels, groups, spec: PartitionSpec, rng: np.random.Generator, *, n=None) -> list[np.ndarray]:
    """Quantity skew: client sizes ~ Pareto(power) draws, examples iid (Li et al. 2022, NIID-Bench)."""
    size = _require_n(labels, groups, n)
    k, floor = spec.num_clients, min(spec.min_size, size // spec.num_clients)
    weights = rng.pareto(spec.power, k) + 1.0
    spare = size - k * floor
    share = weights / weights.sum() * spare
    sizes = np.floor(share).astype(np.int64)
    # largest-remainder rounding so the sizes add up to exactly `size`
    sizes[np.argsort(sizes - share)[: spare - sizes.sum()]] += 1
    sizes += floor
    return _sorted_parts(_split_by_sizes(rng.permutation(size), sizes))


# ---------------------------------------------------------------------------- public API


def _validate(spec: PartitionSpec) -> None:
    if spec.num_clients < 1:
        raise ConfigError(f"partition.num_clients must be >= 1, got {spec.num_clients}")
    if not spec.alpha > 0:
        raise ConfigError(f"partition.alpha must be > 0, got {spec.alpha}")
    if spec.shards_per_client < 1:
        raise ConfigError(f"partition.shards_per_client must be >= 1, got {spec.shards_per_client}")
    if not spec.power > 0:
        raise ConfigError(f"partition.power must be > 0, got {spec.power}")
    if spec.min_size < 0:
        raise ConfigError(f"partition.min_size must be >= 0, got {spec.min_size}")


def partition(
    method: str,
    labels,
    groups,
    spec: PartitionSpec,
    seed: int,
    *,
    n: Optional[int] = None,
) -> list[np.ndarray]:
    """Validate the spec, run partitioner ``method`` seeded by ``seed``, and check the result is a partition.

    ``n`` (the number of examples) is only needed when both ``labels`` and ``groups`` are None.
    """
    if method not in PARTITIONERS:
        raise ConfigError(f"partition.method: {PARTITIONERS.unknown_message(method)}")
    _validate(spec)
    labels, groups = _as_labels(labels), _as_groups(groups)
    size = _num_examples(labels, groups, n)
    if size is not None and method not in _DATA_DEFINED_CLIENTS:
        need = spec.num_clients * max(spec.min_size, 1)
        if size < need:
            raise ConfigError(
                f"partition.num_clients ({spec.num_clients}) x partition.min_size ({spec.min_size}) "
                f"needs at least {need} examples, got {size}"
            )
    parts = PARTITIONERS.get(method)(labels, groups, spec, Randomness(seed).rng("partition"), n=size)
    parts = [np.asarray(p) for p in parts]
    check_partition(parts, size if size is not None else sum(len(p) for p in parts))
    return parts


def label_counts(parts: list[np.ndarray], labels, num_classes: int) -> list[list[int]]:
    """Per client, the number of its examples in each class 0..num_classes-1."""
    labels = _as_labels(labels)
    if labels is None:
        raise DataError("label_counts needs labels")
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"label_counts: label {labels.max()} is out of range for {num_classes} classes")
    return [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]
