"""Runtimes: where client work runs. ``Runtime.run(tasks) -> results``; the round loop never looks inside."""
from __future__ import annotations

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


def make_runtime(cfg, client_fn: Callable[[ClientTask], ClientResult]) -> Runtime:
    return RUNTIMES.get(cfg.runtime.name)(cfg, client_fn)


from . import batched, local  # noqa: E402,F401  (register "local" and "batched"; heavy runtimes register lazily)
