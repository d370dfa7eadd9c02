"""The round loop around a ``server.Server``: what a schedule drives and what a run is.

A ``Federation`` is the server side plus the way to its clients: a runtime that carries a round's tasks to them and
their results back, a clock, a schedule. ``simulation.Simulation`` holds its virtual clients in the same process;
``deploy.Deployment`` reaches clients on other machines (Flower SuperNodes). Both run the same rounds: sample →
broadcast → the runtime → aggregate → evaluate → checkpoint, so a deployment is the simulation's run with the clients
elsewhere.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np
import torch

from .client import ClientResult
from .errors import ClientFailure, FedfmError


class Federation:
    """Subclasses set ``cfg``, ``server``, ``runtime``, ``clock``, ``schedule``, ``display``, ``random``,
    ``attack`` and ``run_dir``."""

    owned: "tuple[Any, ...] | list[Any]" = ()  # what the run started and closes when it ends (``close()``)

    # ------------------------------------------------------------------ the server side's state, as a run sees it
    @property
    def global_flat(self) -> torch.Tensor:
        return self.server.global_flat

    @global_flat.setter
    def global_flat(self, flat: torch.Tensor) -> None:
        self.server.global_flat = flat
        self._load_global()

    @property
    def start_round(self) -> int:
        return self.server.start_round

    def checkpoint_state(self, rnd: int) -> dict[str, Any]:
        return self.server.checkpoint_state(rnd)

    def load_checkpoint_state(self, ck: dict[str, Any]) -> None:
        self.server.load_checkpoint_state(ck)
        self._load_global()

    def evaluate(self, rnd: int = 0) -> dict[str, Any]:
        return self.server.evaluate(rnd)

    def _load_global(self) -> None:
        """The global model: the shared global state, personal parameters at their initial values."""
        self.server.model.load(self.server.global_flat)

    # ------------------------------------------------------------------ one round
    def num_sampled(self) -> int:
        return self.server.num_sampled()

    def planned_steps(self, cid: int) -> int:
        """Optimizer steps client ``cid`` will take (for the simulated clock)."""
        ccfg = self.cfg.client
        if ccfg.steps is not None:
            return ccfg.steps
        batches = math.ceil(self.server.client_sizes[cid] / ccfg.batch_size) * ccfg.epochs
        return max(1, math.ceil(batches / ccfg.grad_accum))  # as local_sgd counts: one last partial accumulation

    def reachable(self) -> np.ndarray:
        """The clients a round may sample: all of them here; a deployment's connected ones."""
        return np.arange(self.server.num_clients)

    def sample(self, rng: np.random.Generator, k: int, t: float, exclude=(), online_only: bool = False) -> np.ndarray:
        """``k`` clients by ``federation.sampling``; online ones only for availability-aware sampling."""
        if online_only or self.server.sampler.online_only:
            candidates = np.intersect1d(self.clock.online_clients(t), self.reachable())
        else:
            candidates = self.reachable()
        if exclude:
            candidates = np.setdiff1d(candidates, np.fromiter(exclude, dtype=np.int64))
        return self.server.sample(rng, k, candidates)

    def wait_for_clients(self, t: float) -> float:
        """With availability-aware sampling, advance simulated time until enough clients are online."""
        if not self.server.sampler.online_only:
            return t
        need = min(self.cfg.federation.min_clients, self.server.num_clients)
        for _ in range(10_000):
            if len(self.clock.online_clients(t)) >= need:
                return t
            t = self.clock.next_period(t)
        raise FedfmError(f"fewer than federation.min_clients={need} clients were ever online "
                         f"(clock.availability={self.cfg.clock.availability})")

    def broadcast(self, rnd: int, cid: int) -> tuple[bytes, dict[str, bytes]]:
        return self.server.broadcast(rnd, cid)

    def aggregate_results(self, rnd: int, results: list[ClientResult],
                          weights: Optional[list[float]] = None) -> dict[str, Any]:
        row = self.server.aggregate_results(rnd, results, weights)
        self._load_global()
        return row

    def run_round(self, rnd: int) -> dict[str, Any]:
        return self.schedule.run_round(rnd)

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict[str, Any]]:
        """The rounds from ``start_round`` on, what follows them, the final adapter; the runtime is closed however
        the run ends (a Ray it started stops even when a round raises)."""
        try:
            return self._run()
        finally:
            self.runtime.close()
            for part in self.owned:  # what the run started besides its runtime (an inference service)
                part.close()

    def _run(self) -> list[dict[str, Any]]:
        cfg, server = self.cfg, self.server
        rows = []
        if server.start_round == 1 and cfg.eval.initial and cfg.eval.every:
            t0 = time.perf_counter()
            row = {"round": 0, **self.evaluate(0), "wall_s": time.perf_counter() - t0}
            server.log(row)
            rows.append(row)
        budget, last = server.bytes, cfg.federation.rounds
        why = budget.why_stop(server.start_round - 1, last) if server.start_round > 1 else None
        if why is not None:  # resumed after the budget stopped it (with more federation.rounds, say)
            self.display.message(why)
        for rnd in range(server.start_round, last + 1 if why is None else server.start_round):
            if rnd == server.start_round and server.privacy_spent(rnd):  # resumed after the privacy budget stopped it
                break
            server._all_crashed = False
            # the byte budget's last round, when the estimate already says so: evaluated with the round's clients
            server.last_round = rnd if budget.largest and not budget.fits(2) else None
            row = self.run_round(rnd)
            if server._all_crashed and server.global_version == 0 and server.start_round == 1:
                server.log(row)
                first = row["dropped"][0]["error"] if row.get("dropped") else "unknown error"
                raise ClientFailure(f"round {rnd}: every sampled client raised an error before any update was "
                                    f"aggregated, e.g. {first}; stopping (metrics.jsonl lists each client's error)")
            budget.count(rnd, row, first=rnd == 1)  # bytes_total; a budget smaller than round 1 is refused
            why = budget.why_stop(rnd, last)
            # privacy.target_epsilon: the next round would spend more, so this one is the last
            spent = why is None and rnd < last and server.privacy_spent(rnd + 1)
            if (why is not None or spent) and cfg.eval.every and not server.evaluation_due(rnd):
                row.update(self.evaluate(rnd))  # the last round runs evaluated, whatever eval.every says
            server.end_round(rnd, row)
            rows.append(row)
            if why is not None:
                self.display.message(why)
                break
            if spent:
                break
        if rows:
            self._after_rounds(rows)
        if self.run_dir is not None:
            server.save_final()
        return rows

    def _after_rounds(self, rows: list[dict[str, Any]]) -> None:
        """What a run does after its last round, before the final adapter is written (a simulation's audit)."""


def open_run_dir(run_dir, resume: bool, overwrite: bool, warn) -> Optional[dict[str, Any]]:
    """Before the model loads: check that ``output.dir`` can take a new run (nothing is touched: an old run is
    replaced only by ``begin``), or, resuming, read its last good checkpoint (a corrupt one passed over, with
    ``warn``) and check its metrics. Returns the checkpoint to resume from, if any."""
    from .config import check_writable_dir

    check_writable_dir(run_dir.path, "output.dir")
    if not resume:
        run_dir.check_new(overwrite)
        return None
    ck = run_dir.load_last_checkpoint(warn)
    run_dir.check_metrics()
    return ck


def begin(fed: Federation, run_dir, ck: Optional[dict[str, Any]], resume: bool, overwrite: bool, warn,
          say=print) -> None:
    """Once the federation is built: resuming, load the checkpoint and cut the metrics back to it; else make the
    run directory (only now replacing an old one with ``overwrite``) and write the config."""
    if resume:
        if ck is not None:
            fed.load_checkpoint_state(ck)
            say(f"resuming after round {ck['round']}")
        note = run_dir.set_aside_partial_metrics()  # a last line cut short: kept in metrics.jsonl.partial
        if note:
            warn(note)
        run_dir.truncate_metrics(ck["round"] if ck is not None else -1)
        if not fed.server.bytes.known:  # a checkpoint from before the byte count was kept: count the rows
            fed.server.bytes.from_rows(run_dir.read_metrics())
    else:
        run_dir.create(overwrite=overwrite)
        run_dir.write_config(fed.cfg.to_yaml())
