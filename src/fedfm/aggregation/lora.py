"""LoRA-aware reducers for clients of different ranks: HetLoRA and FlexLoRA.

Both see the zero-padded client deltas [K, D], the weights, and ``info`` (the global flat state x, each client's
rank, the state spec). Each client's own LoRA factors are its truncated start plus its delta:
A_k = A[:r_k] + δA_k, B_k = B[:, :r_k] + δB_k. Parameters that are not LoRA factors (a classifier head) are
averaged as in FedAvg. Both return Δ = x_new − x, so any server optimizer can follow (fedavg with lr 1 gives x_new).
"""
from __future__ import annotations


import torch

from ..models.ranks import lora_pairs
from . import AGGREGATORS, Reduce, Stage


def _slices(spec) -> dict[str, slice]:
    out, o = {}, 0
    for n, k in zip(spec.names, spec.numels):
        out[n] = slice(o, o + k)
        o += k
    return out


def _client_factors(info, updates, name_a, name_b, sl):
    """Per client: (A_k [r, in], B_k [out, r]) zero-padded to the full rank r, from x truncated to r_k plus δ_k."""
    spec = info.spec
    A = info.x[sl[name_a]].view(spec.shapes[name_a])
    B = info.x[sl[name_b]].view(spec.shapes[name_b])
    out = []
    for k, r_k in enumerate(info.ranks):
        a = A.clone()
        b = B.clone()
        a[r_k:] = 0
        b[:, r_k:] = 0
        a += updates[k, sl[name_a]].view(spec.shapes[name_a])
        b += updates[k, sl[name_b]].view(spec.shapes[name_b])
        out.append((a, b))
    return out


class _LoRAReducer:
    def fedavg(self, updates, weights, x):
        w = weights.to(updates.dtype)
        return x + (w / w.sum()) @ updates


class HetLoRA(_LoRAReducer):
    """HetLoRA (Cho et al. 2024): zero-pad every client's A_k, B_k to the largest rank and average them, each
    weighted by p_k ∝ ‖B_k A_k‖_F per module ("sparsity-weighted"; ``examples`` weights by n_k instead);
    each client then receives the result truncated back to its own rank."""

    def __init__(self, weighting: str = "sparsity"):
        self.weighting = weighting

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, info=None) -> torch.Tensor:
        spec, sl = info.spec, _slices(info.spec)
        new = self.fedavg(updates, weights, info.x)  # non-LoRA parameters
        n_w = weights.to(updates.dtype) / weights.sum()
        for name_a, name_b in lora_pairs(spec):
            factors = _client_factors(info, updates, name_a, name_b, sl)
            if self.weighting == "sparsity":
                norms = torch.stack([torch.linalg.matrix_norm(b @ a) for a, b in factors])
                p = norms / norms.sum() if float(norms.sum()) > 0 else n_w
            else:
                p = n_w
            new[sl[name_a]] = sum(p_k * a for p_k, (a, _) in zip(p, factors)).reshape(-1)
            new[sl[name_b]] = sum(p_k * b for p_k, (_, b) in zip(p, factors)).reshape(-1)
        return new - info.x


class FlexLoRA(_LoRAReducer):
    """FlexLoRA (Bai et al. 2024): average the full-size products W = Σ_k p_k B_k A_k (p_k ∝ n_k), then
    redistribute by SVD W = U Σ Vᵀ: B = U[:, :r] Σ[:r], A = Vᵀ[:r]; a rank-r_k client takes the leading r_k
    components, which is the best rank-r_k approximation of W."""

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor, info=None) -> torch.Tensor:
        spec, sl = info.spec, _slices(info.spec)
        new = self.fedavg(updates, weights, info.x)
        p = weights.to(updates.dtype) / weights.sum()
        for name_a, name_b in lora_pairs(spec):
            factors = _client_factors(info, updates, name_a, name_b, sl)
            W = sum(p_k * (b @ a) for p_k, (a, b) in zip(p, factors))
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            r = spec.shapes[name_a][0]
            new[sl[name_b]] = (U[:, :r] * S[:r]).reshape(-1)
            new[sl[name_a]] = Vh[:r].reshape(-1)
        return new - info.x


@AGGREGATORS.register("hetlora")
def hetlora(cfg=None) -> Stage:
    """HetLoRA (Cho et al. 2024): zero-padding, sparsity-weighted aggregation, truncation to each rank."""
    return Reduce(HetLoRA(weighting=cfg.server.hetlora_weighting if cfg is not None else "sparsity"))


@AGGREGATORS.register("flexlora")
def flexlora(cfg=None) -> Stage:
    """FlexLoRA (Bai et al. 2024): average the products B_k A_k, SVD back to each client's rank."""
    return Reduce(FlexLoRA())


def _synchronous_only(cfg) -> None:
    """Both rebuild each client's factors from the current global state x (A_k = A[:r_k] + δA_k); under FedBuff a late
    client's δ is relative to an older x, and the SVD basis moves at every step, so its B_k A_k would be wrong (a
    client one step late: 278% off). Refused rather than aggregated on the wrong model."""
    if cfg.federation.schedule != "sync":
        raise ValueError(f"server.aggregator {cfg.server.aggregator!r} rebuilds each client's LoRA factors from the "
                         f"global state the round started from; under federation.schedule "
                         f"{cfg.federation.schedule!r} a stale client started from an older one: use "
                         f"federation.schedule=sync, or server.aggregator=fedavg")


hetlora.check_config = _synchronous_only
flexlora.check_config = _synchronous_only
