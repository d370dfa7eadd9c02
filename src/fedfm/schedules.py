"""Schedules, keyed by ``federation.schedule``: how client work is ordered in (simulated) time.

``sync``: rounds as in FedAvg; the round waits for the sampled clients (up to ``clock.deadline_s``; slower clients
are stragglers and dropped). ``fedbuff``: buffered asynchronous aggregation (Nguyen et al. 2022); ``concurrency``
clients train at once, each on the global version it downloaded, and the server steps whenever ``buffer_size``
results have arrived, weighting each by its staleness. A "round" of a fedbuff run is one server step.
"""
from __future__ import annotations

import dataclasses
import heapq
import time
from typing import Any, Callable

from .attacks import tamper_results
from .client import ClientResult, ClientTask
from .registry import Registry
from .stateful import Stateful

SCHEDULES: Registry[Callable[..., "Schedule"]] = Registry("schedule")


class Schedule(Stateful):
    def __init__(self, sim):
        self.sim = sim  # the simulation: its server side, runtime and clock
        self.sim_time = 0.0

    def run_round(self, rnd: int) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"sim_time": self.sim_time}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sim_time = float(state.get("sim_time", 0.0))


def _received(row: dict[str, Any], sent: dict[int, int]) -> None:
    """Each returning client's downloaded bytes, into the row's ``client_stats``."""
    for stat in row.get("client_stats", ()):
        stat["bytes_down"] = int(sent.get(stat["id"], 0))


def _dropped(cid: int, why: str) -> ClientResult:
    return ClientResult(client_id=int(cid), error=why)


@SCHEDULES.register("sync")
class Sync(Schedule):
    synchronous = True  # one round at a time: what per-round accounting and a secure sum need
    """Synchronous rounds: sample → broadcast → train → aggregate; the round lasts as long as its slowest returning
    client (or ``clock.deadline_s``)."""


    def run_round(self, rnd: int) -> dict[str, Any]:
        s, cfg = self.sim, self.sim.cfg
        clock, deadline = s.clock, cfg.clock.deadline_s
        t0 = time.perf_counter()
        self.sim_time = s.wait_for_clients(self.sim_time)
        # from the OS under client-level DP with secret randomness: amplification by sampling assumes nobody knows it
        ids = s.sample(s.random.rng("client_sample", rnd), s.num_sampled(), self.sim_time)
        tasks, skipped, durations, sent = [], {}, {}, {}
        for c in ids:
            c = int(c)
            if not clock.online(c, self.sim_time):
                skipped[c] = _dropped(c, "offline (simulated availability)")
                continue
            if clock.drops_out(c, rnd):
                skipped[c] = _dropped(c, "dropped out (simulated)")
                continue
            durations[c] = clock.duration(c, s.planned_steps(c))
            if deadline is not None and durations[c] > deadline:
                skipped[c] = _dropped(c, f"straggler: needs {durations[c]:.1f}s > clock.deadline_s={deadline}")
                continue
            payload, extras = s.broadcast(rnd, c)
            sent[c] = len(payload) + sum(len(b) for b in extras.values())
            tasks.append(ClientTask(client_id=c, round=rnd, payload=payload, extras=extras,
                                    seed=s.random.seed("client_task", rnd, c), evaluate=s.server.federated_due(rnd)))
        s.display.round_start(rnd, cfg.federation.rounds, len(ids))
        ran = {r.client_id: r for r in s.runtime.run(tasks, on_result=s.display.client_done)}
        results = [ran.get(int(c)) or skipped[int(c)] for c in ids]
        results = tamper_results(s, results, rnd)  # malicious clients send what their attack says
        returned = [durations[r.client_id] for r in results if r.error is None]
        waited = deadline if (deadline is not None and len(returned) < len(ids)) else 0.0
        self.sim_time += max(returned + [waited]) if (returned or waited) else 0.0
        row = s.aggregate_results(rnd, results)
        if s.attack.malicious:
            row["malicious"] = [int(c) for c in ids if int(c) in s.attack.malicious]
        # what travelled down: the broadcasts, plus under secagg the protocol's server-to-client messages and under
        # split learning the activations' gradients
        _received(row, sent)
        row.update({"bytes_down": sum(sent.values()) + int(row.get("secagg_bytes_down", 0))
                    + int(row.get("split_bytes_down", 0)),
                    "clients": [int(c) for c in ids], "sim_time_s": self.sim_time,
                    "wall_s": time.perf_counter() - t0})
        return row


@SCHEDULES.register("fedbuff")
class FedBuff(Schedule):
    """FedBuff (Nguyen et al. 2022): Δ̄ = (1/K) Σ_{i∈buffer} s(τ_i) Δ_i with s(τ) = (1 + τ)^(−a) (a = 1/2 in the
    paper), applied when K results are buffered; τ_i = server steps since client i downloaded its model."""

    buffered = True  # the aggregate is over the whole buffer: Σ w_k Δ_k / K (aggregation.chain.FedBuffMean)

    def __init__(self, sim):
        super().__init__(sim)
        self.version = 0  # number of server steps so far
        self.jobs = 0  # dispatches so far (seeds client work and drop-outs)
        self.in_flight: list[tuple[float, int, int, int, ClientResult]] = []  # (finish, job, client, version, result)
        self.bytes_down = 0  # sent during the current server step
        self.sent_to: dict[int, int] = {}  # by client, since its result was last buffered

    def state_dict(self) -> dict[str, Any]:
        # results as plain dicts, so that a checkpoint holds only tensors and builtins (loaded with weights_only=True)
        flight = [(t, j, c, v, dataclasses.asdict(r)) for t, j, c, v, r in self.in_flight]
        return {"sim_time": self.sim_time, "version": self.version, "jobs": self.jobs, "in_flight": flight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.version = int(state.get("version", 0))
        self.jobs = int(state.get("jobs", 0))
        self.in_flight = [(t, j, c, v, ClientResult(**r)) for t, j, c, v, r in state.get("in_flight", [])]
        heapq.heapify(self.in_flight)

    def staleness_weight(self, tau: int) -> float:
        return float((1.0 + tau) ** (-self.sim.cfg.federation.staleness_exponent))

    def _dispatch(self, rnd: int) -> bool:
        """Start one more client on the current global model; False if no client can start now."""
        s = self.sim
        busy = {c for _, _, c, _, _ in self.in_flight}
        rng = s.random.rng("async_sample", self.jobs)
        ids = s.sample(rng, 1, self.sim_time, exclude=busy, online_only=True)  # async clients check in when online
        if len(ids) == 0:
            return False
        c, job = int(ids[0]), self.jobs
        self.jobs += 1
        finish = self.sim_time + s.clock.duration(c, s.planned_steps(c))
        if s.clock.drops_out(c, job):
            res = _dropped(c, "dropped out (simulated)")
        else:
            payload, extras = s.broadcast(rnd, c)
            task = ClientTask(client_id=c, round=rnd, payload=payload, extras=extras, seed=s.random.seed("async_task", job, c),
                              evaluate=s.server.federated_due(rnd))
            res = tamper_results(s, s.runtime.run([task], on_result=s.display.client_done), job)[0]
            got = len(payload) + sum(len(b) for b in extras.values())
            self.bytes_down += got
            self.sent_to[c] = self.sent_to.get(c, 0) + got
        heapq.heappush(self.in_flight, (finish, job, c, self.version, res))
        return True

    def run_round(self, rnd: int) -> dict[str, Any]:
        s, fed = self.sim, self.sim.cfg.federation
        t0 = time.perf_counter()
        s.display.round_start(rnd, fed.rounds, fed.buffer_size)
        self.bytes_down = 0
        buffer: list[ClientResult] = []
        stale: list[int] = []
        failed: list[ClientResult] = []
        while len(buffer) < fed.buffer_size:
            while len(self.in_flight) < fed.concurrency and self._dispatch(rnd):
                pass
            if not self.in_flight:  # nobody online: wait for the next availability period
                self.sim_time = s.clock.next_period(self.sim_time)
                continue
            finish, _, c, started, res = heapq.heappop(self.in_flight)
            self.sim_time = max(self.sim_time, finish)
            if res.error is not None:
                failed.append(res)
                if not buffer and len(failed) >= len(s.server.client_sizes) and all(r.crashed for r in failed):
                    break  # as many crashes as clients and no update: the client code fails, waiting would not end
                continue
            buffer.append(res)
            stale.append(self.version - started)
        weights = [self.staleness_weight(t) for t in stale] + [0.0] * len(failed)
        # the chain divides by K, the buffer size, as in the paper: an update that fails validation counts as zero
        row = s.aggregate_results(rnd, buffer + failed, weights=weights)
        _received(row, self.sent_to)
        for r in buffer:
            self.sent_to.pop(r.client_id, None)
        if row["aggregated"]:  # the model version (what staleness counts) moves only when the server steps
            self.version += 1
        row.update({"bytes_down": int(self.bytes_down) + int(row.get("split_bytes_down", 0)), "clients": [r.client_id for r in buffer],
                    "staleness": stale, "sim_time_s": self.sim_time, "wall_s": time.perf_counter() - t0})
        return row


def make_schedule(sim) -> Schedule:
    return SCHEDULES.get(sim.cfg.federation.schedule)(sim)
