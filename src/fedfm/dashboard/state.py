"""What the dashboard shows, read from a run directory alone: ``metrics.jsonl`` (whole lines only, read on from where
the last read stopped), ``partition.json``, ``config.yaml``, ``.fedfm-run``, ``report/`` and ``adapter/``.

Everything here is data from outside (client ids and error strings come from clients): it is passed on as JSON and
the page renders it as text. Rows of any driver are read calmly: a key a row lacks is simply absent from it.
"""
from __future__ import annotations

import json
import math
import os
import stat
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ..tracking import MARKER, owned

# The curves the page draws, per round, by the metrics.jsonl key that holds them.
SERIES = ("eval_accuracy", "fed_accuracy", "client_acc_worst10", "eval_loss", "fed_loss", "train_loss", "epsilon")
LINKED = ("report", "adapter")  # folders whose files the page links to (and the app serves, read-only)
MAX_CLIENT_ROWS = 500  # the client table sent to the page; the rest is counted


def _number(v: Any) -> Optional[float]:
    """A finite number, or None (a missing key, null, NaN, or not a number)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


class MetricsTail:
    """The whole lines of a ``metrics.jsonl`` that another process is appending to, read on from the last read.

    A last line being written (no newline yet) waits for its newline; a line that is not a JSON object is skipped
    and counted. The file replaced or cut (``--overwrite``, a resume that drops rounds after its checkpoint) is read
    again from the start."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.skipped = 0
        self._offset = 0
        self._inode: Optional[tuple[int, int]] = None
        self.mtime: Optional[float] = None
        self.generation = 0  # counts the times the file was read again from the start

    def _reset(self) -> None:
        self.rows, self.skipped, self._offset = [], 0, 0
        self.generation += 1

    def read(self) -> list[dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._reset()
            self._inode = self.mtime = None
            return self.rows
        inode = (st.st_dev, st.st_ino)
        if inode != self._inode or st.st_size < self._offset:
            self._reset()
            self._inode = inode
        self.mtime = st.st_mtime
        if st.st_size == self._offset:
            return self.rows
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(st.st_size - self._offset)
        except OSError:  # replaced or removed since the stat (--overwrite): the next read starts again
            return self.rows
        end = chunk.rfind(b"\n")
        if end < 0:
            return self.rows  # only part of a line so far
        self._offset += end + 1
        for line in chunk[:end].split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("round"), int):
                self.rows.append(row)
            else:
                self.skipped += 1
        return self.rows


class WholeFile:
    """A small file the run writes whole (atomically), parsed again only when it changed (its inode, size or
    mtime); ``None`` while it is not there or does not parse."""

    def __init__(self, path: Path, parse: Callable[[bytes], Any]):
        self.path, self.parse = path, parse
        self._seen: Optional[tuple] = None
        self.value: Any = None

    def read(self) -> Any:
        try:
            st = os.stat(self.path)
        except OSError:
            self._seen = self.value = None
            return None
        seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if seen != self._seen:
            try:
                self.value = self.parse(self.path.read_bytes())
            except (OSError, ValueError, yaml.YAMLError):
                self.value = None  # being replaced: the next read sees it whole
            self._seen = seen
        return self.value


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    sub = cfg.get(name)
    return sub if isinstance(sub, dict) else {}


def _created(marker: Any) -> Optional[float]:
    try:
        return datetime.fromisoformat(marker["created"]).timestamp()
    except (TypeError, KeyError, ValueError):
        return None


def _items(row: dict[str, Any], key: str) -> list:
    """``row[key]`` when it is a list, else nothing."""
    v = row.get(key)
    return v if isinstance(v, list) else []


class ClientTable:
    """One entry per client seen in any row, accumulated over the rounds as rows arrive: the last round it took part
    in (sampled, returned or dropped), its examples, total bytes up and down, its last round's seconds, how often it
    dropped and the last reason, its own ε (sample-level DP) and its last accuracy on its own test split (a client
    only evaluated, never sampled, has no last round)."""

    def __init__(self):
        self.table: dict[str, dict[str, Any]] = {}
        self.rows = 0  # how many rows were added

    def _entry(self, cid: Any, rnd: Optional[int]) -> dict[str, Any]:
        key = str(cid)
        e = self.table.get(key)
        if e is None:
            e = self.table[key] = {"id": key, "last_round": None, "examples": None, "bytes_up": 0, "bytes_down": 0,
                                   "seconds": None, "dropped": 0, "last_error": None, "epsilon": None,
                                   "accuracy": None}
        if rnd is not None and (e["last_round"] is None or rnd > e["last_round"]):
            e["last_round"] = rnd
        return e

    def add(self, row: dict[str, Any]) -> None:
        rnd = row["round"]
        for cid in _items(row, "clients"):
            self._entry(cid, rnd)
        for cs in _items(row, "client_stats"):
            if isinstance(cs, dict) and "id" in cs:
                e = self._entry(cs["id"], rnd)
                for k in ("examples", "seconds", "epsilon"):
                    if k in cs:
                        e[k] = _number(cs[k])
                for k in ("bytes_up", "bytes_down"):
                    e[k] += _number(cs.get(k)) or 0
        for drop in _items(row, "dropped"):
            if isinstance(drop, dict) and "id" in drop:
                e = self._entry(drop["id"], rnd)
                e["dropped"] += 1
                e["last_error"] = str(drop.get("error", ""))
        acc = row.get("client_acc")
        if isinstance(acc, dict):
            for cid, v in acc.items():
                if _number(v) is not None:
                    self._entry(cid, None)["accuracy"] = _number(v)
        self.rows += 1

    def entries(self) -> list[dict[str, Any]]:
        """The entries, numeric ids in order, then named ones."""
        def order(cid: str) -> tuple:
            return (0, int(cid), "") if cid.lstrip("-").isdigit() else (1, 0, cid)

        return [self.table[k] for k in sorted(self.table, key=order)]


def clients_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ClientTable`` of these rows."""
    table = ClientTable()
    for row in rows:
        table.add(row)
    return table.entries()


def _files(run_dir: Path, folder: str) -> list[dict[str, Any]]:
    """The files fedfm wrote under ``run_dir/folder`` (``tracking.owned``; temporary files left out), as links."""
    base = run_dir / folder
    if not base.is_dir():
        return []
    out = []
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if p.is_symlink() or not owned(rel) or any(part.startswith(".") for part in rel.split("/")):
            continue
        try:
            st = p.stat()
        except OSError:  # removed since the listing (--overwrite)
            continue
        if stat.S_ISREG(st.st_mode):
            out.append({"name": p.relative_to(base).as_posix(), "href": f"files/{rel}", "bytes": st.st_size})
    return out


class RunState:
    """The dashboard's view of one run directory; ``read()`` returns it as a JSON-ready dict (``/api/state``)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = d = Path(run_dir)
        self.metrics = MetricsTail(d / "metrics.jsonl")
        self.marker = WholeFile(d / MARKER, json.loads)
        self.config = WholeFile(d / "config.yaml", yaml.safe_load)
        self.partition = WholeFile(d / "partition.json", lambda b: _partition(json.loads(b)))
        self._table, self._generation = ClientTable(), self.metrics.generation

    def clients(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The client table of ``rows``: only the rows added since the last read are added to it (all of them again
        when the file was read again from the start)."""
        if self._generation != self.metrics.generation:
            self._table, self._generation = ClientTable(), self.metrics.generation
        for row in rows[self._table.rows:]:
            self._table.add(row)
        return self._table.entries()

    def read(self, now: Optional[float] = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        d = self.run_dir
        marker = self.marker.read()
        rows = self.metrics.read()
        cfg = self.config.read()
        cfg = cfg if isinstance(cfg, dict) else {}
        federation, privacy = _section(cfg, "federation"), _section(cfg, "privacy")
        total = federation.get("rounds") if isinstance(federation.get("rounds"), int) else None
        last = rows[-1]["round"] if rows else None
        adapter = _files(d, "adapter")
        created = _created(marker)
        finished = bool(rows) and (bool(adapter) or (total is not None and last is not None and last >= total))
        if marker is None and not rows:
            status = "waiting"
        else:
            status = "finished" if finished else "running"
        end = self.metrics.mtime if finished and self.metrics.mtime else now
        notes = []
        if self.metrics.skipped:
            notes.append(f"metrics.jsonl: {self.metrics.skipped} line(s) that are not a round's JSON object skipped")
        mode = privacy.get("mode", "none")
        return {
            "run_dir": str(d.resolve()),
            "name": cfg.get("name"),
            "status": status,
            "created": marker.get("created") if isinstance(marker, dict) else None,
            "elapsed_s": max(0.0, end - created) if created is not None else None,
            "since_update_s": max(0.0, now - self.metrics.mtime) if self.metrics.mtime else None,
            "round": last,
            "rounds": total,
            "series": {"round": [r["round"] for r in rows],
                       **{k: [_number(r.get(k)) for r in rows] for k in SERIES}},
            "clients": (clients := self.clients(rows))[:MAX_CLIENT_ROWS],
            "clients_total": len(clients),
            "partition": self.partition.read(),
            "privacy": {"mode": mode if isinstance(mode, str) else "none",
                        "target_epsilon": _number(privacy.get("target_epsilon")),
                        "delta": _number(privacy.get("delta")),
                        "epsilon": next((_number(r["epsilon"]) for r in reversed(rows) if "epsilon" in r), None)},
            "links": {"report": _files(d, "report"), "adapter": adapter},
            "notes": notes,
        }


def _partition(desc: Any) -> Optional[dict[str, Any]]:
    """partition.json's label mix: label names and each client's counts (None when it is not there or not one)."""
    if not isinstance(desc, dict) or not isinstance(desc.get("clients"), list):
        return None
    names = desc.get("label_names")
    clients = [{"name": str(c.get("name", c.get("id", i))),
                "n_train": _number(c.get("n_train")),
                "label_counts": [_number(x) or 0 for x in c["label_counts"]] if isinstance(c.get("label_counts"), list)
                else None}
               for i, c in enumerate(desc["clients"]) if isinstance(c, dict)]
    return {"method": str(desc.get("method", "")), "num_clients": len(clients),
            "label_names": [str(n) for n in names] if isinstance(names, list) else None,
            "clients": clients[:MAX_CLIENT_ROWS]}


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a run directory fedfm writes (its marker, config.yaml or metrics.jsonl)."""
    return path.is_dir() and any((path / n).is_file() for n in (MARKER, "config.yaml", "metrics.jsonl"))
