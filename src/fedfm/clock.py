"""A simulated clock for heterogeneous clients: per-client speed, availability, drop-outs, deadlines.

Nothing here sleeps. Each client's work takes ``steps × clock.step_seconds × speed_k`` simulated seconds; a client is
online in a period of ``clock.period_s`` seconds with probability ``clock.availability``; a client that starts may
drop out with probability ``clock.dropout``. Every draw is seeded by (run seed, purpose, client, period or round),
so a run is reproducible and independent of the order in which clients are simulated. Metrics carry the simulated
time next to wall time, so synchronous and asynchronous schedules can be compared by simulated time-to-accuracy.
"""
from __future__ import annotations

import math

import numpy as np

from .randomness import Randomness


def _uniform(seed: int, purpose: str, *key: int) -> float:
    """A reproducible U[0, 1) draw for one (purpose, client, period or job)."""
    return float(Randomness(seed).rng(purpose, *key).random())


class SimClock:
    def __init__(self, cfg, num_clients: int, seed: int):
        self.cfg, self.seed, self.n = cfg, seed, num_clients
        if cfg.speeds is not None:
            if len(cfg.speeds) != num_clients:
                raise ValueError(f"clock.speeds has {len(cfg.speeds)} entries, expected one per client ({num_clients})")
            speed = np.asarray(cfg.speeds, dtype=np.float64)
        elif cfg.speed_distribution == "lognormal":
            speed = Randomness(seed).rng("clock_speed").lognormal(0.0, cfg.speed_sigma, size=num_clients)
        else:
            speed = np.ones(num_clients)
        self.speed = speed  # seconds-per-step multiplier: 2.0 is a client twice as slow as the reference
        avail = cfg.availability
        if isinstance(avail, list):
            if len(avail) != num_clients:
                raise ValueError(f"clock.availability has {len(avail)} entries, expected one per client ({num_clients})")
            self.availability = np.asarray(avail, dtype=np.float64)
        else:
            self.availability = np.full(num_clients, float(avail))

    def duration(self, client: int, steps: int) -> float:
        """Simulated seconds client ``client`` needs for ``steps`` optimizer steps."""
        return float(steps * self.cfg.step_seconds * self.speed[client])

    def online(self, client: int, t: float) -> bool:
        if self.availability[client] >= 1.0:
            return True
        period = int(math.floor(t / self.cfg.period_s))
        return _uniform(self.seed, "availability", client, period) < self.availability[client]

    def online_clients(self, t: float) -> np.ndarray:
        if (self.availability >= 1.0).all():  # the default: no per-client draws
            return np.arange(self.n)
        return np.array([c for c in range(self.n) if self.online(c, t)], dtype=np.int64)

    def next_period(self, t: float) -> float:
        return (math.floor(t / self.cfg.period_s) + 1) * self.cfg.period_s

    def drops_out(self, client: int, job: int) -> bool:
        """Whether the client that starts job number ``job`` (a round, or an async dispatch) never returns."""
        return self.cfg.dropout > 0 and _uniform(self.seed, "dropout", client, job) < self.cfg.dropout
