"""Runtimes: where client work runs. ``Runtime.run(tasks) -> results``; the round loop never looks inside."""
from __future__ import annotations

import traceback
from typing import Callable, Optional

from ..client import ClientResult, ClientTask
from ..registry import Registry

RUNTIMES: Registry[Callable[..., "Runtime"]] = Registry("runtime")

Progress = Optional[Callable[[ClientResult], None]]


class Runtime:
    """Runs a round's client tasks and returns one result per task (an error result if a client failed)."""

    def run(self, tasks: list[ClientTask], on_result: Progress = None) -> list[ClientResult]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def call_client(client_fn: Callable[[ClientTask], ClientResult], task: ClientTask) -> ClientResult:
    """One client's work; a client that raises drops out of the round with its error (and where), the round goes on."""
    try:
        return client_fn(task)
    except Exception as e:
        last = traceback.extract_tb(e.__traceback__)[-1]
        return ClientResult(client_id=task.client_id,
                            error=f"{type(e).__name__}: {e} (at {last.filename.split('/')[-1]}:{last.lineno})",
                            crashed=True)


def make_runtime(cfg, client_fn: Callable[[ClientTask], ClientResult],
                 worker_clients: Optional[Callable[..., Callable[[ClientTask], ClientResult]]] = None) -> Runtime:
    """The runtime ``runtime.name`` picks. ``client_fn`` is the client side in this process; a runtime whose clients
    run in other processes (``remote`` entries: ray) gets ``worker_clients(cfg)`` instead, which builds the client
    side in each worker from the config alone (its own copy of the seeded partition)."""
    entry = RUNTIMES.get(cfg.runtime.name)
    if getattr(entry, "remote", False):
        if worker_clients is None:
            raise ValueError(f"runtime {cfg.runtime.name!r} runs clients in other processes and needs worker_clients")
        return entry(cfg, worker_clients)
    return entry(cfg, client_fn)


@RUNTIMES.register("ray")
def _ray(cfg, worker_clients) -> Runtime:
    from .ray import RayRuntime  # ray itself is imported here, only when runtime.name is ray

    return RayRuntime(cfg, worker_clients)


def _ray_check_config(cfg) -> None:
    """The ray runtime keeps no client state across rounds (a worker may die and be replaced, and a client may land
    on another worker): refuse what needs it, before anything loads."""
    from ..client import CLIENT_ALGORITHMS
    from ..compression import make_codec
    from ..compression.feedback import uses_feedback
    from ..errors import ConfigError
    from ..models import personal_patterns

    why = None
    algorithm = CLIENT_ALGORITHMS.get(cfg.client.algorithm)
    if getattr(algorithm, "process_state", None):
        why = algorithm.process_state
    elif algorithm.extra_names:
        why = f"client.algorithm {cfg.client.algorithm!r} keeps per-client state (e.g. SCAFFOLD's c_i)"
    elif personal_patterns(cfg.adapter):
        why = f"personal parameters ({', '.join(personal_patterns(cfg.adapter))}, from adapter.personal or " \
              f"adapter.method {cfg.adapter.method!r}) stay on each client across rounds"
    elif cfg.privacy.mode == "sample":
        why = "privacy.mode 'sample' keeps each client's DP-SGD step count across rounds"
    elif uses_feedback(cfg.codec, make_codec(cfg.codec)):
        why = f"codec.name {cfg.codec.name!r} with error feedback keeps what each client did not send"
    if why:
        raise ConfigError(f"runtime.name 'ray' does not support this yet: {why}, and ray workers keep no client state "
                          "across rounds; use runtime.name local or batched")


_ray.remote = True
_ray.check_config = _ray_check_config

from . import batched, local  # noqa: E402,F401  (register "local" and "batched"; "ray" imports ray only when built)
