"""DP-FedAvg (McMahan et al. 2018): clip each client update to L2 norm C, sum, add Gaussian noise of std z·C, divide
by a fixed denominator (the expected number of sampled clients), so one client changes the released update by at
most C / denominator whatever the others do. Optional adaptive clipping (Andrew et al. 2021): C follows the
γ-quantile of the update norms through a privately counted fraction of unclipped updates, the count centred as in
the paper so that its sensitivity is ½ and the budget split below holds.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from ..randomness import Randomness
from ..stateful import Stateful


class DPFedAvg(Stateful):
    """Δ̄ = (Σ_k Δ_k · min(1, C / ‖Δ_k‖) + N(0, (z_Δ C)² I)) / E[K]."""

    def __init__(self, pcfg, noise_multiplier: float, denominator: float, seed: int, secret: bool = False):
        self.C = float(pcfg.clip)
        self.random = Randomness(seed, "client", secret)  # secret: noise seeds from the OS, never from ``seed``
        self.z = float(noise_multiplier)
        self.denominator = float(denominator)
        self.gamma = pcfg.target_quantile
        self.eta = pcfg.clip_lr
        self.sigma_b = pcfg.count_noise if pcfg.count_noise is not None else self.denominator / 20.0
        self.z_delta = self.z
        if self.gamma is not None and self.z > 0:
            # the clipped-count query (sensitivity 1/2) and the sum share the budget: z⁻² = z_Δ⁻² + (2σ_b)⁻²
            rest = self.z ** -2 - (2 * self.sigma_b) ** -2
            if rest <= 0:
                raise ConfigError(f"privacy.count_noise: σ_b={self.sigma_b:g} is too small for noise multiplier "
                                  f"{self.z:.4g} (need 2σ_b > z); raise privacy.count_noise")
            self.z_delta = rest ** -0.5

    def __call__(self, updates: torch.Tensor, dim: int, rnd: int) -> tuple[torch.Tensor, dict[str, Any]]:
        total, unclipped = self.clipped_sum(updates, dim)
        return self.release(total, self.count_query(unclipped, updates.shape[0]), rnd)

    def clip(self, update: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One update scaled to L2 norm ≤ C, and whether it was within C already (what a client does itself
        under secure aggregation, where the server never sees an update alone)."""
        norm = float(update.double().norm())
        return update.double() * min(1.0, self.C / max(norm, 1e-12)), norm <= self.C

    def clipped_sum(self, updates: torch.Tensor, dim: int) -> tuple[torch.Tensor, float]:
        """Σ_k Δ_k · min(1, C / ‖Δ_k‖) and the number of unclipped updates Σ_k b_k (b_k = 1 if ‖Δ_k‖ ≤ C)."""
        if not updates.shape[0]:
            return torch.zeros(dim, dtype=torch.float64), 0.0
        norms = updates.double().norm(dim=1)
        scale = (self.C / norms.clamp_min(1e-12)).clamp(max=1.0)
        return (updates.double() * scale.unsqueeze(1)).sum(0), float((norms <= self.C).sum())

    @staticmethod
    def count_query(unclipped: float, clients: int) -> float:
        """Σ_k (b_k − ½): the centred count Andrew et al. (2021) noise, so that adding or removing a client moves it
        by exactly ½ (the raw count Σ b_k moves by 1, which would need twice the noise for the same budget)."""
        return float(unclipped) - 0.5 * clients

    def release(self, total: torch.Tensor, count: float | None, rnd: int,
                noise: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        """(clipped sum + N(0, (z_Δ C)² I)) / E[K]; ``noise=False`` when the clients already added their shares
        of it (distributed noise under secure aggregation). With adaptive clipping, ``count`` is the centred count
        Σ(b_k − ½): b̄ = (count + N(0, σ_b²)) / E[K] + ½ is released noised, and C follows it. Nothing exact about
        the clients is returned in the measurements."""
        g = self.random.torch("dp_noise", rnd)
        C, dim = self.C, total.numel()
        z = torch.randn(dim, generator=g, dtype=torch.float64) * (self.z_delta * C)
        delta = ((total.double() + (z if noise else 0.0)) / self.denominator).float()
        info = {"dp_clip": C, "dp_noise_std": self.z_delta * C / self.denominator}
        if self.gamma is not None:
            if count is None:
                raise ValueError("adaptive clipping needs the centred count of unclipped updates")
            b = (count + float(torch.randn(1, generator=g, dtype=torch.float64)) * self.sigma_b) / self.denominator + 0.5
            info["dp_unclipped_fraction"] = b  # the noised b̄ (part of the accounted mechanism), not the exact one
            self.C = C * math.exp(-self.eta * (b - self.gamma))
        return delta, info

    def state_dict(self) -> dict[str, Any]:
        return {"C": self.C}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "C" in state:
            self.C = float(state["C"])
