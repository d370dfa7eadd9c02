"""DP-FedAvg (McMahan et al. 2018): clip each client update to L2 norm C, sum, add Gaussian noise of std z·C, divide
by a fixed denominator (the expected number of sampled clients), so one client changes the released update by at
most C / denominator whatever the others do. Optional adaptive clipping (Andrew et al. 2021): C follows the
γ-quantile of the update norms through a privately counted fraction of unclipped updates, the count centred as in
the paper so that its sensitivity is ½ and the budget split below holds.

``DPFedAvg`` is a stage of the aggregation chain wrapping any linear sum: the plain one (``aggregation.chain.
ClippedSum``, the server clips) or the secure one (``privacy.secure.SecureSum``, each client clips itself and, with
distributed noise, adds its share of the noise).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional

import torch

from ..aggregation import Stage
from ..errors import ConfigError
from ..randomness import Randomness


def noise_share_std(z: float, C: float, m: int) -> float:
    """One client's share of the DP noise: N(0, z²C²/m), so that any m or more shares carry at least the noise
    N(0, z²C²) the accountant assumes."""
    return z * C / m ** 0.5


def clipped_sum(updates: torch.Tensor, C: float) -> tuple[torch.Tensor, float]:
    """Σ_k Δ_k · min(1, C / ‖Δ_k‖) (float64) and the number of unclipped updates Σ_k b_k (b_k = 1 if ‖Δ_k‖ ≤ C)."""
    norms = updates.double().norm(dim=1)
    scale = (C / norms.clamp_min(1e-12)).clamp(max=1.0)
    return (updates.double() * scale.unsqueeze(1)).sum(0), float((norms <= C).sum())


def clip(update: torch.Tensor, C: float) -> tuple[torch.Tensor, bool]:
    """One update scaled to L2 norm ≤ C, and whether it was within C already (what a client does itself under secure
    aggregation, where the server never sees an update alone)."""
    norm = float(update.double().norm())
    return update.double() * min(1.0, C / max(norm, 1e-12)), norm <= C


class DPFedAvg(Stage):
    """Δ̄ = (Σ_k Δ_k · min(1, C / ‖Δ_k‖) + N(0, (z_Δ C)² I)) / E[K]; the clipped sum is the inner stage's.

    ``noise_shares`` m: distributed noise, each of at least m clients adds N(0, (z_Δ C)²/m) before the (secure) sum and
    this stage adds none; None: this stage adds the noise. State: the clip C (it moves under adaptive clipping)."""

    def __init__(self, pcfg, noise_multiplier: float, denominator: float, seed: int, secret: bool = False,
                 inner: Optional[Stage] = None, accountant=None, noise_shares: Optional[int] = None):
        self.C0 = float(pcfg.clip)
        self.random = Randomness(seed, "client", secret)  # secret: noise seeds from the OS, never from ``seed``
        self.z = float(noise_multiplier)
        self.denominator = float(denominator)
        self.gamma = pcfg.target_quantile
        self.eta = pcfg.clip_lr
        self.sigma_b = pcfg.count_noise if pcfg.count_noise is not None else self.denominator / 20.0
        self.z_delta = self.z
        self.inner, self.accountant, self.noise_shares = inner, accountant, noise_shares
        self.delta = getattr(pcfg, "delta", None)
        if self.gamma is not None and self.z > 0:
            # the clipped-count query (sensitivity 1/2) and the sum share the budget: z⁻² = z_Δ⁻² + (2σ_b)⁻²
            rest = self.z ** -2 - (2 * self.sigma_b) ** -2
            if rest <= 0:
                raise ConfigError(f"privacy.count_noise: σ_b={self.sigma_b:g} is too small for noise multiplier "
                                  f"{self.z:.4g} (need 2σ_b > z); raise privacy.count_noise")
            self.z_delta = rest ** -0.5

    def init(self) -> dict[str, Any]:
        return {"C": self.C0, **super().init()}

    def __call__(self, state, u, weights):
        C, m = state["C"], self.noise_shares
        share = None if m is None else noise_share_std(self.z_delta, C, m)
        inner, total, out = self.inner(state["inner"], replace(u, clip=C, noise_share=share), None)
        unclipped = out.pop("unclipped", None)  # (Σ_k b_k, K), exact: only the noised count is released
        shares = out.pop("noise_shares", 0)
        if total is None:  # the inner sum gave nothing (an aborted secure round): noise alone, so that does not show
            delta, info, C = self.release(C, torch.zeros(u.x.numel(), dtype=torch.float64), None, u.rnd)
            info["dp_noise_only"] = True
        else:
            count = None if unclipped is None else self.count_query(*unclipped)
            delta, info, C = self.release(C, total, count, u.rnd, noise=m is None)
            if m is not None:  # the clients' shares: N(0, shares · σ_s²)
                info["dp_noise_std"] = share * shares ** 0.5 / self.denominator
        out.update(info)
        if self.accountant is not None:
            out.update(epsilon=self.accountant.epsilon(u.rnd, self.delta), delta=self.delta)
        return {"C": C, "inner": inner}, delta, out

    @staticmethod
    def count_query(unclipped: float, clients: int) -> float:
        """Σ_k (b_k − ½): the centred count Andrew et al. (2021) noise, so that adding or removing a client moves it
        by exactly ½ (the raw count Σ b_k moves by 1, which would need twice the noise for the same budget)."""
        return float(unclipped) - 0.5 * clients

    def release(self, C: float, total: torch.Tensor, count: float | None, rnd: int,
                noise: bool = True) -> tuple[torch.Tensor, dict[str, Any], float]:
        """(clipped sum + N(0, (z_Δ C)² I)) / E[K], the measurements, and the next round's C; ``noise=False`` when
        the clients already added their shares of it (distributed noise under secure aggregation). With adaptive
        clipping, ``count`` is the centred count Σ(b_k − ½): b̄ = (count + N(0, σ_b²)) / E[K] + ½ is released noised,
        and C follows it. Nothing exact about the clients is returned in the measurements."""
        g = self.random.torch("dp_noise", rnd)
        dim = total.numel()
        z = torch.randn(dim, generator=g, dtype=torch.float64) * (self.z_delta * C)
        delta = ((total.double() + (z if noise else 0.0)) / self.denominator).float()
        info = {"dp_clip": C, "dp_noise_std": self.z_delta * C / self.denominator}
        if self.gamma is not None:
            if count is None:
                raise ValueError("adaptive clipping needs the centred count of unclipped updates")
            b = (count + float(torch.randn(1, generator=g, dtype=torch.float64)) * self.sigma_b) / self.denominator + 0.5
            info["dp_unclipped_fraction"] = b  # the noised b̄ (part of the accounted mechanism), not the exact one
            C = C * math.exp(-self.eta * (b - self.gamma))
        return delta, info, C
