"""Membership inference audit: the loss-threshold attack of Yeom et al. 2018 on the final global model.

The attacker guesses "member" when an example's loss is low. Its power over every threshold at once is the ROC
AUC of (−loss) separating the clients' training examples (members) from held-out examples (non-members): 0.5 means
the model's losses tell the two apart no better than chance.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..randomness import Randomness


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(a member scores above a non-member) + ½ P(tie): the Mann-Whitney form of the ROC AUC."""
    s = np.concatenate([member_scores, nonmember_scores])
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    m, n = len(member_scores), len(nonmember_scores)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


@torch.no_grad()
def example_losses(task, model, encoded, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Each row's own loss under ``model`` (the task's per-row loss, in eval mode)."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        sel = rows[i:i + batch_size]
        batch = next(task.batches(encoded, sel, len(sel)))  # unshuffled, in one batch
        out.append(task.segment_losses(model, batch, [1] * len(sel)).float().cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros(0)


def membership_audit(server, max_examples: int = 500) -> dict[str, Any]:
    """Loss-threshold MIA on the current global model: members are clients' training examples, non-members the
    held-out test set; the same seeded number of each."""
    rng = Randomness(server.cfg.federation.seed).rng("audit")
    members = np.concatenate([np.asarray(c.train) for c in server.data.clients])
    nonmembers = np.asarray(server.data.test)
    k = int(min(max_examples, len(members), len(nonmembers)))
    members = np.sort(rng.choice(members, size=k, replace=False))
    nonmembers = np.sort(rng.choice(nonmembers, size=k, replace=False))
    server._load_global()  # the auditor of a simulation: it sees the clients' examples and the held-out set
    bs = server.cfg.eval.batch_size
    lm = example_losses(server.task, server.model, server.encoded, members, bs)
    ln = example_losses(server.task, server.model, server.encoded, nonmembers, bs)
    return {"mia_auc": roc_auc(-lm, -ln), "mia_members": int(len(lm)), "mia_nonmembers": int(len(ln)),
            "mia_member_loss": float(lm.mean()), "mia_nonmember_loss": float(ln.mean()),
            "attack": "loss threshold (Yeom et al. 2018)"}
