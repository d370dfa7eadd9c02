"""Shared by the benchmarks: print one measurement as a JSON line and append it to its results file."""
from __future__ import annotations

import json
from pathlib import Path


def emit(record: dict, path: Path | None) -> str:
    """Print ``record`` as one JSON line; append it to ``path`` (None: print only)."""
    line = json.dumps(record)
    print(line, flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    return line
