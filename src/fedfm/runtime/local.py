"""The ``local`` runtime: clients run one after another in this process, on the one shared base."""
from __future__ import annotations

from typing import Callable

from ..client import ClientResult, ClientTask
from . import RUNTIMES, Progress, Runtime, call_client


class LocalRuntime(Runtime):
    def __init__(self, cfg, client_fn: Callable[[ClientTask], ClientResult]):
        self.client_fn = client_fn

    def run(self, tasks: list[ClientTask], on_result: Progress = None) -> list[ClientResult]:
        results = []
        for task in tasks:
            result = call_client(self.client_fn, task)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results


@RUNTIMES.register("local")
def _local(cfg, client_fn) -> Runtime:
    return LocalRuntime(cfg, client_fn)
