"""Privacy: client-level DP (DP-FedAvg), sample-level DP (DP-SGD), secure aggregation, and what a client discloses
(its randomness comes from ``fedfm.randomness``)."""
from __future__ import annotations

import dataclasses

# What a client's result carries besides its (encoded, or under secagg masked) update, by privacy setting. Everything
# else a client measures (its exact training loss, its wall time, the steps its data size implies) is computed from
# its data without noise, so it stays on the client wherever the guarantee covers what the server sees.
SENT_METRICS = {
    "none": None,  # None: every metric (no guarantee is claimed)
    "client": None,  # central DP-FedAvg: the server is trusted with single updates, and so with their metrics
    "client+secagg": (),  # the server is not trusted with one client: nothing but the masked, clipped update
    "sample": ("dp_steps", "dp_epsilon"),  # DP-SGD: each client's own accounting (n_k is public, as in Opacus)
}


def disclosure(cfg) -> str:
    """The key of ``SENT_METRICS`` for a run's config."""
    mode = cfg.privacy.mode
    return "client+secagg" if mode == "client" and cfg.secagg.enabled else mode


def disclose(cfg, result):
    """The ``ClientResult`` as it leaves the client: metrics cut to ``SENT_METRICS``; under DP-FedAvg with secure
    aggregation the example count too (reported as 1: DP-FedAvg weighs every client alike, and the count is the
    client's data)."""
    setting = disclosure(cfg)
    allowed = SENT_METRICS[setting]
    if allowed is None or result.error is not None:
        return result
    metrics = {k: v for k, v in result.metrics.items() if k in allowed}
    n = 1 if setting == "client+secagg" else result.num_examples
    return dataclasses.replace(result, metrics=metrics, num_examples=n)
