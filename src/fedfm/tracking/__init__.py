"""The run directory: ``config.yaml``, ``partition.json``, ``metrics.jsonl``, ``checkpoints/``, ``adapter/``,
``report/`` (and, with ``tracking.sinks``, ``tracking.json`` and ``tensorboard/``: ``fedfm.tracking.sinks``).

fedfm marks a directory it made with ``.fedfm-run``; only such a directory is resumed or replaced (``--overwrite``),
and only the files fedfm writes in it (``owned``) are ever removed: anything else a user keeps there stays.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import warnings
import zipfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from ..errors import DiskFull, FedfmError

MARKER = ".fedfm-run"

# Every file fedfm writes in a run directory, as a path relative to it: what --overwrite may remove. adapter/ and
# model/ are written whole by save_pretrained and replaced whole; a temporary file or folder (.NAME.tmp) is renamed
# into place when complete. tests/test_cli.py checks that a run writes nothing else.
_OWNED = re.compile(r"""
    \.fedfm-run | config\.yaml | partition\.json | synthetic\.jsonl | metrics\.jsonl(\.partial)? | privacy_audit\.json
  | tracking\.json | tensorboard/events\.out\.tfevents\.[^/]+
  | checkpoints/round_\d{4,}\.pt
  | client_state/client_\d+\.v\d+\.safetensors
  | report/((accuracy|loss|bytes|client_accuracy|partition)\.png | summary\.md | generations_round_\d+\.jsonl)
  | (adapter|model)/.+
  | ((checkpoints|client_state|report)/)? \.[^/]+\.tmp(/.+)?
""", re.X)
_OWNED_DIRS = re.compile(r"(checkpoints|client_state|report|adapter|model|tensorboard|\.[^/]+\.tmp)(/.+)?")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def owned(relative: str) -> bool:
    """Whether fedfm writes the file at this path (relative to a run directory, with ``/``)."""
    return _OWNED.fullmatch(relative) is not None


def _fedfm_version() -> str:
    try:
        from importlib.metadata import version

        return version("fedfm")
    except Exception:  # not installed (a source checkout on PYTHONPATH)
        return "unknown"


def atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """``write(f)`` into ``.NAME.tmp`` beside ``path``, synced, then renamed over ``path``: a reader sees the old file
    or the whole new one. A failed write removes the temporary file and leaves ``path`` as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


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


class CorruptCheckpoint(FedfmError):
    """A checkpoint file that does not read back whole (cut short, overwritten, not a checkpoint)."""


def _whole_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _checkpoint_problem(ck: Any, path: Path) -> Optional[str]:
    """What is wrong with a loaded checkpoint, or None: it is a dict of its own round, and its global state (when it
    has one) is as long as its parameters' shapes say."""
    if not isinstance(ck, dict):
        return f"holds a {type(ck).__name__}, not a checkpoint"
    if ck.get("round") != int(path.stem.split("_")[1]):
        return f"holds round {ck.get('round')}, not the round its name says"
    flat, shapes = ck.get("global"), ck.get("shapes")
    if shapes is not None and (not isinstance(flat, torch.Tensor)
                               or sum(int(np.prod(s)) for s in shapes.values()) != flat.numel()):
        return "its global state does not match its parameters' shapes"
    return None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_file = self.path / "metrics.jsonl"
        self.report = self.path / "report"
        self.adapter = self.path / "adapter"

    # ------------------------------------------------------------ creation
    def is_run(self) -> bool:
        """Whether fedfm made this directory (its marker file is there)."""
        return (self.path / MARKER).is_file()

    def check_new(self, overwrite: bool) -> None:
        """Refuse, touching nothing, a directory that ``create`` must not write into: one that holds files and is not
        a run directory fedfm made, or (without ``overwrite``) an existing run."""
        if self.path.exists() and not self.path.is_dir():
            raise FedfmError(f"output.dir: {self.path} is a file, not a directory")
        if not self.path.exists() or not any(self.path.iterdir()):
            return
        if not self.is_run():
            raise FedfmError(f"output.dir: {self.path} is not a fedfm run directory (it holds files but no {MARKER}); "
                             f"fedfm writes into or replaces only directories it made: set output.dir to a new directory")
        if not overwrite:
            raise FedfmError(
                f"output.dir: run directory {self.path} already exists; pass --overwrite to replace it, "
                f"--resume {self.path} to continue it, or set output.dir"
            )

    def create(self, overwrite: bool) -> None:
        """Make a fresh run directory; an existing run is replaced only with ``overwrite``, and then only the files
        fedfm wrote in it are removed (``owned``: the user's own files stay). Call it when the new run is built and
        about to write its first round, so that a run that fails before then leaves the old one as it was."""
        self.check_new(overwrite)
        if self.is_run():
            self._remove_owned()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_json(MARKER, {"fedfm": _fedfm_version(),
                                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self.checkpoints.mkdir(exist_ok=True)
        self.report.mkdir(exist_ok=True)

    def _remove_owned(self) -> None:
        """Remove the files fedfm wrote here (its marker last, replaced right after), then the folders of fedfm's
        that are left empty."""
        for top, dirs, files in os.walk(self.path, topdown=False):
            rel_top = Path(top).relative_to(self.path).as_posix()
            for name in files:
                rel = name if rel_top == "." else f"{rel_top}/{name}"
                if rel != MARKER and owned(rel):
                    os.unlink(Path(top) / name)
            if rel_top != "." and _OWNED_DIRS.fullmatch(rel_top) and not os.listdir(top):
                os.rmdir(top)

    def check_resumable(self) -> None:
        """Refuse, touching nothing, a directory that is not a run fedfm made."""
        if not self.path.is_dir():
            raise FedfmError(f"--resume: run directory {self.path} does not exist")
        if not (self.path / "config.yaml").is_file():
            raise FedfmError(f"--resume: {self.path} is not a run directory (no config.yaml)")
        if not self.is_run():
            raise FedfmError(f"--resume: {self.path} is not a run directory fedfm made (no {MARKER}); it was left as "
                             f"it was")

    # ------------------------------------------------------------ writing, when the disk may be full
    def resume_advice(self) -> str:
        cks = self.list_checkpoints()
        kept = f"the last checkpoint, {cks[-1]}, is intact" if cks else "no round was checkpointed yet"
        return f"{kept}: free some space, then continue with `fedfm run --resume {self.path}`"

    @contextmanager
    def writing(self, path: Optional[Path] = None, then: Optional[str] = None) -> Iterator[None]:
        """A full disk (or quota) while writing ``path`` becomes one line naming the file and how to go on (by default:
        resume from the last checkpoint, which a failed write leaves intact)."""
        try:
            yield
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
            raise DiskFull(f"disk full: could not write {path or e.filename or 'a file of the run'}; "
                           f"{then or self.resume_advice()}") from None

    def write_config(self, yaml_text: str) -> None:
        with self.writing(self.path / "config.yaml"):
            atomic_write_text(self.path / "config.yaml", yaml_text)

    def write_json(self, name: str, obj: Any) -> None:
        with self.writing(self.path / name):
            atomic_write_text(self.path / name, json.dumps(obj, indent=1))

    def write_text(self, name: str, text: str) -> None:
        with self.writing(self.path / name):
            atomic_write_text(self.path / name, text)

    # ------------------------------------------------------------ metrics
    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.writing(self.metrics_file), open(self.metrics_file, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (written after the last complete checkpoint)."""
        rows = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        with self.writing(self.metrics_file):
            atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))

    def check_metrics(self) -> tuple[list[bytes], bytes]:
        """The whole lines of ``metrics.jsonl`` and a last one cut short (a run killed, or out of disk, while writing
        it; empty if none); any other line that is not a JSON object is an error naming it. Reads only."""
        if not self.metrics_file.exists():
            return [], b""
        lines = self.metrics_file.read_bytes().split(b"\n")
        whole, tail = lines[:-1], lines[-1]  # tail: what follows the last newline (empty when the file ends in one)
        if not tail and whole and not _json_object(whole[-1]):
            whole, tail = whole[:-1], whole[-1]
        for number, line in enumerate(whole, start=1):
            if line.strip() and not _json_object(line):
                raise FedfmError(f"{self.metrics_file}: line {number} is not a JSON object; fix or remove it and "
                                 f"resume again")
        return whole, tail if tail.strip() else b""

    def set_aside_partial_metrics(self) -> Optional[str]:
        """A last line of ``metrics.jsonl`` cut short is moved to ``metrics.jsonl.partial``, not dropped; returns a
        note saying so."""
        whole, tail = self.check_metrics()
        if not tail:
            return None
        partial = self.metrics_file.with_name(self.metrics_file.name + ".partial")
        with self.writing(partial):
            with open(partial, "ab") as f:  # first keep it, then take it out of the metrics
                f.write(tail + b"\n")
                f.flush()
                os.fsync(f.fileno())
            atomic_write_bytes(self.metrics_file, b"".join(line + b"\n" for line in whole))
        return f"{self.metrics_file}: its last line was cut short; moved it to {partial}"

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
        with self.writing(path):
            atomic_write(path, lambda f: torch.save(_builtin_scalars(state), f))
        for old in self.list_checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.exists():
            return []
        found = [p for p in self.checkpoints.iterdir() if re.fullmatch(r"round_\d{4,}\.pt", p.name)]
        return sorted(found, key=lambda p: int(p.stem.split("_")[1]))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """One checkpoint, read back with tensors and builtins only (unpickling it never constructs other objects or
        runs code) and checked to be whole; ``CorruptCheckpoint`` if it is not."""
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if _whole_zip(path):  # a well-formed file that names other objects: refused, never run
                raise FedfmError(f"checkpoint {path}: holds objects other than tensors and builtins (not written by "
                                 f"this fedfm); it is not loaded, since unpickling them could run code "
                                 f"({str(e).splitlines()[-1][:200]})") from None
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt (not a checkpoint file fedfm wrote)") from None
        except Exception as e:  # cut short, overwritten, empty
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:120] if str(e) else 'cut short'})") from None
        problem = _checkpoint_problem(ck, path)
        if problem:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: it {problem}")
        return ck

    def load_last_checkpoint(self, warn: Optional[Callable[[str], None]] = None) -> dict[str, Any] | None:
        """The newest checkpoint that reads back whole. A corrupt newer one is passed over with a warning that names
        it and the one resumed from (it is replaced when the run writes that round again)."""
        bad: list[CorruptCheckpoint] = []
        for path in reversed(self.list_checkpoints()):
            try:
                ck = self.load_checkpoint(path)
            except CorruptCheckpoint as e:
                bad.append(e)
                continue
            if bad:
                (warn or warnings.warn)(f"{'; '.join(map(str, bad))}: resuming from {path} instead")
            return ck
        if bad:
            raise FedfmError(f"{'; '.join(map(str, bad))}, and no earlier checkpoint reads back whole; move "
                             f"{self.checkpoints} away to start the run over from round 1")
        return None


def _json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
