"""The continual-learning metrics of an accuracy matrix, as the literature defines them (its plot is
``tracking.report.plot_matrix``).

``R[i, j]`` is the score on stage j's held-out examples after training stage i (i, j = 0 … T−1). After stage k:

- average accuracy (Chaudhry et al. 2018): A_k = 1/(k+1) Σ_{j≤k} R[k, j]
- forgetting (Chaudhry et al. 2018, "Riemannian Walk"): f_j^k = max_{l<k} R[l, j] − R[k, j], averaged over j < k
- backward transfer (Lopez-Paz & Ranzato 2017, GEM): BWT_k = 1/k Σ_{j<k} (R[k, j] − R[j, j])
- forward transfer (Lopez-Paz & Ranzato 2017, GEM): FWT_k = 1/k Σ_{0<j≤k} (R[j−1, j] − b_j), b_j the score of the
  model before any training

For a score where lower is better (a held-out loss) forgetting and the transfers are computed on −R, so that their
signs mean the same as for an accuracy: forgetting > 0 is the loss having risen since its best, BWT < 0 is the
earlier stages' loss risen since they were trained. The average stays the plain mean of R's row (a loss).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def stage_metrics(R: Sequence[Sequence[float]], higher_is_better: bool = True,
                  baseline: Optional[Sequence[float]] = None) -> dict[str, Optional[float]]:
    """The metrics after the last stage of ``R`` (k+1 rows of at least k+1 columns; column j is stage j)."""
    R = np.asarray(R, dtype=np.float64)
    k = R.shape[0] - 1
    if R.ndim != 2 or R.shape[1] <= k:
        raise ValueError(f"an accuracy matrix after stage {k} needs {k + 1} rows of at least {k + 1} columns, got "
                         f"shape {R.shape}")
    S = R if higher_is_better else -R
    out: dict[str, Optional[float]] = {"average": float(R[k, :k + 1].mean()), "forgetting": None, "bwt": None,
                                       "fwt": None}
    if k > 0:
        out["forgetting"] = float(np.mean([S[:k, j].max() - S[k, j] for j in range(k)]))
        out["bwt"] = float(np.mean([S[k, j] - S[j, j] for j in range(k)]))
        if baseline is not None:
            b = np.asarray(baseline, dtype=np.float64) * (1 if higher_is_better else -1)
            out["fwt"] = float(np.mean([S[j - 1, j] - b[j] for j in range(1, k + 1)]))
    return out
