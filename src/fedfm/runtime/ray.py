"""The ``ray`` runtime: a round's clients run on a pool of Ray actors (``runtime.num_workers``).

Each actor builds the client side once from the config alone (``worker_clients(cfg)``: the base loaded once, its
own copy of the seeded partition, each client's ``LocalData`` cut there when the client is first given to it) and
trains the clients it is given one after another. Only the messages travel, as bytes (``client/wire.py``): a
``ClientTask`` down, a ``ClientResult`` up; never example data. A client goes to worker ``client_id % num_workers``.
A worker that dies mid-round, or gives no answer within ``runtime.worker_timeout_s`` (hung, or never scheduled on a
cluster short of the resources it asks for): its clients come back as dropped (the error names the worker and where
it runs), it is replaced, and the run goes on; the round never waits forever. Without ``runtime.address`` a local Ray is started (no dashboard) and stopped by ``close()``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import ray

from ..client import ClientResult, ClientTask
from ..client.wire import result_from_bytes, result_to_bytes, task_from_bytes, task_to_bytes
from . import Progress, Runtime, call_client


class _Worker:
    """One actor: the client side built once, then one task's bytes in, one result's bytes out."""

    def __init__(self, cfg, worker_clients: Callable):
        self.client_fn = worker_clients(cfg)

    def ready(self) -> bool:
        return True

    def run(self, message: bytes) -> bytes:
        return result_to_bytes(call_client(self.client_fn, task_from_bytes(message)))


class RayRuntime(Runtime):
    def __init__(self, cfg, worker_clients: Callable):
        rc = cfg.runtime
        self.num_workers, self.started, self.timeout = rc.num_workers, False, rc.worker_timeout_s
        if not ray.is_initialized():
            if rc.address is None:  # a local Ray sized to the pool, loopback only, no dashboard
                ray.init(num_cpus=math.ceil(rc.num_workers * rc.cpus_per_worker),
                         num_gpus=math.ceil(rc.num_workers * rc.gpus_per_worker), include_dashboard=False,
                         object_store_memory=200 * 2**20, logging_level=logging.WARNING,
                         _node_ip_address="127.0.0.1", configure_logging=False)
            else:
                ray.init(address=rc.address, logging_level=logging.WARNING, configure_logging=False)
            self.started = True
        self._actor = ray.remote(num_cpus=rc.cpus_per_worker, num_gpus=rc.gpus_per_worker, max_restarts=0)(_Worker)
        self._cfg, self._worker_clients = cfg, worker_clients
        self.workers = [self._new_worker() for _ in range(self.num_workers)]
        self.replaced = 0
        self.notes = [f"runtime ray: {self.num_workers} worker(s), {rc.cpus_per_worker:g} CPU and "
                      f"{rc.gpus_per_worker:g} GPU each, on {rc.address or 'a local Ray'}"]

    def _new_worker(self):
        return self._actor.remote(self._cfg, self._worker_clients)

    def submit(self, tasks: list[ClientTask]) -> list[tuple[ClientTask, int, Any]]:
        """Each task to its worker (``client_id % num_workers``): (task, worker, reference to the result's bytes)."""
        out = []
        for task in tasks:
            w = task.client_id % self.num_workers
            out.append((task, w, self.workers[w].run.remote(task_to_bytes(task))))
        return out

    def run(self, tasks: list[ClientTask], on_result: Progress = None) -> list[ClientResult]:
        submitted = self.submit(tasks)
        pending = {ref: k for k, (_, _, ref) in enumerate(submitted)}
        results: list[ClientResult | None] = [None] * len(submitted)
        dead: dict[int, str] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout)
            if not done:  # nobody answered in time: every client still out is dropped, its worker replaced
                where = self._cfg.runtime.address or "a local Ray"
                for ref, k in pending.items():
                    task, w, _ = submitted[k]
                    dead.setdefault(w, "silent")
                    results[k] = ClientResult(client_id=task.client_id, crashed=True, error=(
                        f"ray worker {w} (on {where}) gave no answer within runtime.worker_timeout_s="
                        f"{self.timeout:g}s; it is replaced"))
                    if on_result is not None:
                        on_result(results[k])
                break
            k = pending.pop(done[0])
            task, w, ref = submitted[k]
            try:
                result = result_from_bytes(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                dead.setdefault(w, type(e).__name__)
                result = ClientResult(client_id=task.client_id, crashed=True,
                                      error=f"ray worker {w} died during the round ({dead[w]}); it is replaced")
            results[k] = result
            if on_result is not None:
                on_result(result)
        for w in dead:  # the run goes on: a fresh actor in the dead (or silent) one's place for the next round
            ray.kill(self.workers[w])
            self.workers[w] = self._new_worker()
            self.replaced += 1
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for actor in self.workers:
            ray.kill(actor)
        self.workers = []
        if self.started:
            ray.shutdown()
            self.started = False
