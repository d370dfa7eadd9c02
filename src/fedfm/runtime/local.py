"""The ``local`` runtime: clients run one after another in this process, on the one shared base."""
from __future__ import annotations

import traceback
from typing import Callable

from ..client import ClientResult, ClientTask
from . import RUNTIMES, Progress, Runtime


class LocalRuntime(Runtime):
    def __init__(self, cfg, client_fn: Callable[[ClientTask], ClientResult]):
        self.client_fn = client_fn

    def run(self, tasks: list[ClientTask], on_result: Progress = None) -> list[ClientResult]:
        results = []
        for task in tasks:
            try:
                result = self.client_fn(task)
            except Exception as e:  # a failing client drops out of the round; the round goes on
                last = traceback.extract_tb(e.__traceback__)[-1]
                result = ClientResult(client_id=task.client_id,
                                      error=f"{type(e).__name__}: {e} (at {last.filename.split('/')[-1]}:{last.lineno})",
                                      crashed=True)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results


@RUNTIMES.register("local")
def _local(cfg, client_fn) -> Runtime:
    return LocalRuntime(cfg, client_fn)
