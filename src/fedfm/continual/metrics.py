"""The continual-learning metrics of an accuracy matrix, as the literature defines them, and its plot.

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

import os
from pathlib import Path
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


def plot_matrix(R: Sequence[Sequence[float]], names: list[str], metric: str, path: Path) -> Path:
    """A heatmap of the accuracy matrix: row i after training stage i, column j the held-out examples of stage j;
    written to a temporary file and renamed, so a half-written plot is never left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = np.asarray(R, dtype=np.float64)
    higher = "loss" not in metric
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * R.shape[1], 1.0 + 0.9 * R.shape[0]))
    try:
        im = ax.imshow(R, cmap="viridis" if higher else "viridis_r", aspect="auto")
        span = float(np.nanmax(R) - np.nanmin(R)) or 1.0
        for i in range(R.shape[0]):
            for j in range(R.shape[1]):
                frac = (R[i, j] - np.nanmin(R)) / span
                dark = frac < 0.5 if higher else frac > 0.5  # viridis is dark at its low end
                colour = "white" if dark else "black"
                ax.text(j, i, f"{R[i, j]:.3f}", ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(R.shape[1]), [names[j] for j in range(R.shape[1])], rotation=30, ha="right")
        ax.set_yticks(range(R.shape[0]), [names[i] for i in range(R.shape[0])])
        ax.set_xlabel("held-out examples of stage j")
        ax.set_ylabel("after training stage i")
        ax.set_title(f"held-out {metric} R[i, j]")
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path
