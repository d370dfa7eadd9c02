"""Privacy: client-level DP (DP-FedAvg), sample-level DP (DP-SGD), secure aggregation, and where their randomness
comes from."""
from __future__ import annotations

import secrets


def mechanism_seed(cfg, *parts: int) -> int:
    """The seed of one draw of a privacy mechanism: ``derive_seed(federation.seed, *parts)`` under
    ``privacy.randomness: seeded`` (reproducible, so anyone who holds the seed can re-draw the noise and remove it),
    else 63 fresh bits from the operating system's CSPRNG."""
    if cfg.privacy.randomness == "seeded":
        from ..server import derive_seed

        return derive_seed(cfg.federation.seed, *parts)
    return secrets.randbits(63)
