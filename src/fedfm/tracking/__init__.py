"""The run directory: ``config.yaml``, ``partition.json``, ``metrics.jsonl``, ``checkpoints/``, ``adapter/``, ``report/``."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FedfmError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _builtin_scalars(obj: Any) -> Any:
    """numpy scalars as Python ones, through dicts, lists and tuples, so the checkpoint loads with weights_only."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {_builtin_scalars(k): _builtin_scalars(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_builtin_scalars(v) for v in obj)
    return obj


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_file = self.path / "metrics.jsonl"
        self.report = self.path / "report"
        self.adapter = self.path / "adapter"

    # ------------------------------------------------------------ creation
    def create(self, overwrite: bool) -> None:
        """Make a fresh run directory; an existing one is never replaced unless ``overwrite``."""
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise FedfmError(
                    f"output.dir: run directory {self.path} already exists; pass --overwrite to replace it, "
                    f"--resume {self.path} to continue it, or set output.dir"
                )
            if not (self.path / "config.yaml").exists():
                raise FedfmError(f"output.dir: {self.path} is not a fedfm run directory (no config.yaml); refusing to delete it")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        self.report.mkdir(exist_ok=True)

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.path / "config.yaml", yaml_text)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=1))

    # ------------------------------------------------------------ metrics
    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (written after the last complete checkpoint)."""
        rows = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))

    def write_generations(self, rnd: int, records: list[dict[str, Any]]) -> Path:
        """``report/generations_round_<k>.jsonl``: the held-out prompts with the model's answers at this eval."""
        self.report.mkdir(parents=True, exist_ok=True)
        path = self.report / f"generations_round_{rnd}.jsonl"
        atomic_write_text(path, "".join(json.dumps({"round": rnd, **r}) + "\n" for r in records))
        return path

    def read_generations(self) -> dict[int, list[dict[str, Any]]]:
        out = {}
        for p in self.report.glob("generations_round_*.jsonl") if self.report.exists() else []:
            m = re.fullmatch(r"generations_round_(\d+)\.jsonl", p.name)
            if m:
                out[int(m.group(1))] = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return dict(sorted(out.items()))

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, rnd: int, state: dict[str, Any], keep: int) -> Path:
        """Write ``round_XXXX.pt`` atomically, then prune to the last ``keep``."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        path = self.checkpoints / f"round_{rnd:04d}.pt"
        tmp = self.checkpoints / f".round_{rnd:04d}.pt.tmp"
        torch.save(_builtin_scalars(state), tmp)
        os.replace(tmp, path)
        for old in self.list_checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.exists():
            return []
        found = [p for p in self.checkpoints.iterdir() if re.fullmatch(r"round_\d{4,}\.pt", p.name)]
        return sorted(found, key=lambda p: int(p.stem.split("_")[1]))

    def load_last_checkpoint(self) -> dict[str, Any] | None:
        cks = self.list_checkpoints()
        if not cks:
            return None
        try:  # tensors and builtins only: unpickling a checkpoint never constructs other objects or runs code
            return torch.load(cks[-1], map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise FedfmError(f"checkpoint {cks[-1]}: holds objects other than tensors and builtins (written by an older "
                             f"fedfm, or not by fedfm); it is not loaded, since unpickling them could run code "
                             f"({str(e).splitlines()[-1][:200]})") from None
