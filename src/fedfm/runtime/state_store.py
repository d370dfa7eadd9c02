"""The client state store: what an algorithm keeps per client between rounds (control variates, personal params…).

In memory up to ``cache_clients`` clients (the least recently used are evicted first); with a ``state_dir`` the
rest live on disk as one safetensors file per client, written atomically (temp file + rename). Files are
versioned (``client_000042.v17.safetensors``): a state is never overwritten in place, so a checkpoint only has to
record which version of each client it saw (a manifest of ints, not the tensors), and resuming from it reads
exactly those versions even if later rounds wrote newer ones. Files no kept checkpoint refers to are deleted.
Memory stays bounded by the cache whatever the number of clients; a checkpoint costs the clients touched since the
last one, not all of them.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import FedfmError

State = dict[str, torch.Tensor]
MANIFEST = "__manifest__"
TRIM_EVERY = 64  # evictions between returns of freed heap pages to the OS


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``). Evicted states free buffers of a few hundred
    KiB between long-lived ones; glibc keeps such holes in the heap, so without this RSS drifts above the cache."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class ClientStateStore:
    def __init__(self, cache_clients: int = 1000, state_dir: Optional[str | Path] = None, keep_manifests: int = 2):
        self.cache_clients = cache_clients
        self.state_dir = Path(state_dir) if state_dir else None
        self._mem: "OrderedDict[int, State]" = OrderedDict()
        self._dirty: set[int] = set()  # in memory and newer than its file (or with no file)
        self._version: dict[int, int] = {}  # cid -> the version of its current file
        self._next = 0
        self._manifests: deque[dict[int, int]] = deque(maxlen=max(keep_manifests, 1))
        self._writes = 0  # the state_dir is made at the first write: building a store writes nothing

    def _path(self, cid: int, version: int) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"client_{cid:06d}.v{version}.safetensors"

    def __contains__(self, cid: int) -> bool:
        return cid in self._mem or cid in self._version

    def __len__(self) -> int:
        return len(set(self._mem) | set(self._version))

    @property
    def in_memory(self) -> int:
        return len(self._mem)

    def get(self, cid: int) -> Optional[State]:
        if cid in self._mem:
            self._mem.move_to_end(cid)
            return self._mem[cid]
        if cid in self._version:
            state = load_file(str(self._path(cid, self._version[cid])))
            self._remember(cid, state)
            return state
        return None

    def put(self, cid: int, state: State) -> None:
        self._remember(cid, {k: v.detach().contiguous() for k, v in state.items()})
        self._dirty.add(cid)

    def _remember(self, cid: int, state: State) -> None:
        self._mem[cid] = state
        self._mem.move_to_end(cid)
        while len(self._mem) > self.cache_clients:
            old, old_state = self._mem.popitem(last=False)
            if old in self._dirty:
                if self.state_dir is None:
                    raise MemoryError(
                        f"client state store: more than runtime.cache_clients={self.cache_clients} clients hold "
                        "state; set runtime.state_dir to spill the rest to disk")
                self._write(old, old_state)

    def _write(self, cid: int, state: State) -> None:
        version = self._next
        self._next += 1
        path = self._path(cid, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
        self._version[cid] = version
        self._dirty.discard(cid)
        self._writes += 1
        if self._writes % TRIM_EVERY == 0:
            _trim_heap()

    def flush(self) -> None:
        """Write every state changed since it was last written."""
        for cid in sorted(self._dirty):
            self._write(cid, self._mem[cid])
        _trim_heap()

    def state_dict(self) -> dict[Any, Any]:
        """For checkpoints: with a ``state_dir``, flush and return a manifest ``{cid: version}`` (files that neither
        this nor the previous kept manifests name are deleted); in memory only, every client's tensors."""
        if self.state_dir is None:
            return {cid: self._mem[cid] for cid in sorted(self._mem)}
        self.flush()
        manifest = dict(sorted(self._version.items()))
        self._manifests.append(manifest)
        self._collect()
        return {MANIFEST: manifest, "next": self._next}

    def _collect(self) -> None:
        keep = {(c, v) for m in self._manifests for c, v in m.items()} | set(self._version.items())
        for p in self.state_dir.iterdir() if self.state_dir.exists() else ():
            m = re.fullmatch(r"client_(\d+)\.v(\d+)\.safetensors", p.name)
            if m and (int(m.group(1)), int(m.group(2))) not in keep:
                p.unlink(missing_ok=True)

    def load_state_dict(self, states: dict[Any, Any]) -> None:
        self._mem.clear()
        self._dirty.clear()
        self._version.clear()
        if MANIFEST in states:
            if self.state_dir is None:
                raise FedfmError("checkpoint: the client states are in files (runtime.state_dir), but this run has "
                                 "no runtime.state_dir")
            manifest = {int(c): int(v) for c, v in states[MANIFEST].items()}
            missing = [self._path(c, v) for c, v in manifest.items() if not self._path(c, v).exists()]
            if missing:
                raise FedfmError(f"checkpoint: {len(missing)} client state file(s) are missing from "
                                 f"{self.state_dir}, e.g. {missing[0].name} (was runtime.state_dir changed or cleaned?)")
            self._version = manifest
            self._next = max(int(states.get("next", 0)), max(manifest.values(), default=-1) + 1)
            self._manifests.clear()
            self._manifests.append(dict(manifest))
            return
        for cid, st in states.items():
            self.put(int(cid), st)
