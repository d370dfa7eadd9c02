"""Heterogeneous LoRA ranks: each client trains the leading ``r_k`` components of the rank-``r`` LoRA modules.

The shared model holds every LoRA module at the largest rank r (``adapter.r``). A client of rank r_k receives only
A[:r_k] and B[:, :r_k] (so its download and upload are r_k/r of a full-rank client's), trains them with the rest held
at zero (a zero row of A and the matching zero column of B get zero gradients, so they stay zero under SGD and
AdamW), and sends back its delta in the same truncated shapes. The LoRA scaling alpha/r is the same for every client,
so B_k A_k means the same ΔW at every rank. A ``RankView`` gives the names and shapes of one client's state, so the
codec validates a truncated update exactly like a full one.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ..randomness import Randomness

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def lora_rank(spec) -> int | None:
    """The rank of the shared LoRA modules (None when the state has none)."""
    for n in spec.names:
        if LORA_A in n:
            return int(spec.shapes[n][0])
    return None


def lora_pairs(spec) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA module in the shared state."""
    pairs = []
    names = set(spec.names)
    for n in spec.names:
        if LORA_A in n:
            b = n.replace(LORA_A, LORA_B)
            if b in names:
                pairs.append((n, b))
    return pairs


class RankView:
    """One client's view of the shared state: LoRA tensors cut to rank ``rank``, everything else whole."""

    def __init__(self, spec, rank: int):
        self.spec, self.rank = spec, rank
        self.names = spec.names
        self.shapes = {}
        self.index = {}
        for n in spec.names:
            shape = spec.shapes[n]
            if LORA_A in n:
                self.index[n] = (slice(0, rank),)
                self.shapes[n] = (rank, *shape[1:])
            elif LORA_B in n:
                self.index[n] = (slice(None), slice(0, rank))
                self.shapes[n] = (shape[0], rank, *shape[2:])
            else:
                self.index[n] = None
                self.shapes[n] = shape

    def restrict(self, state) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((n, state[n] if self.index[n] is None else state[n][self.index[n]].contiguous())
                           for n in self.names)

    def expand(self, state) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict()
        for n in self.names:
            if self.index[n] is None:
                out[n] = state[n]
            else:
                full = torch.zeros(self.spec.shapes[n], dtype=state[n].dtype)
                full[self.index[n]] = state[n]
                out[n] = full
        return out


class FullView:
    """The identity view (every client at the full rank)."""

    def __init__(self, spec):
        self.spec, self.names, self.shapes = spec, spec.names, spec.shapes

    def restrict(self, state):
        return state

    def expand(self, state):
        return state


def client_ranks(cfg, num_clients: int) -> np.ndarray | None:
    """The LoRA rank the server assigns each client (``adapter.rank_per_client``, seeded and public), or None when
    every client trains at ``adapter.r``."""
    if cfg.adapter.rank_per_client is None:
        return None
    return assign_ranks(cfg.adapter.rank_per_client, num_clients, cfg.federation.seed)


def assign_ranks(rank_per_client, num_clients: int, seed: int) -> np.ndarray:
    """Per-client ranks from a list (one per client) or tiers ``{rank: fraction}`` (seeded, largest remainder)."""
    if isinstance(rank_per_client, (list, tuple)):
        if len(rank_per_client) != num_clients:
            raise ValueError(f"adapter.rank_per_client lists {len(rank_per_client)} ranks, expected one per client "
                             f"({num_clients})")
        return np.asarray(rank_per_client, dtype=np.int64)
    tiers = sorted((int(r), float(f)) for r, f in rank_per_client.items())
    exact = np.array([f * num_clients for _, f in tiers])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[i] += 1
    ranks = np.repeat([r for r, _ in tiers], counts)
    return Randomness(seed).rng("ranks").permutation(ranks).astype(np.int64)


def view_of(layout, ranks, client_id: int):
    """What client ``client_id`` receives and sends: the whole state, or its LoRA tensors cut to its rank."""
    return FullView(layout) if ranks is None else RankView(layout, int(ranks[client_id]))
