"""The client state store: what an algorithm keeps per client between rounds (control variates, personal params…).

In memory up to ``cache_clients`` clients (least recently used stay); with a ``state_dir`` the rest spill to disk
as one safetensors file per client, written atomically (temp file + rename).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

State = dict[str, torch.Tensor]


class ClientStateStore:
    def __init__(self, cache_clients: int = 1000, state_dir: Optional[str | Path] = None):
        self.cache_clients = cache_clients
        self.state_dir = Path(state_dir) if state_dir else None
        self._mem: "OrderedDict[int, State]" = OrderedDict()
        self._on_disk: set[int] = set()
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)

    def _path(self, cid: int) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"client_{cid:06d}.safetensors"

    def __contains__(self, cid: int) -> bool:
        return cid in self._mem or cid in self._on_disk

    def __len__(self) -> int:
        return len(set(self._mem) | self._on_disk)

    def get(self, cid: int) -> Optional[State]:
        if cid in self._mem:
            self._mem.move_to_end(cid)
            return self._mem[cid]
        if cid in self._on_disk:
            state = load_file(str(self._path(cid)))
            self._remember(cid, state)
            return state
        return None

    def put(self, cid: int, state: State) -> None:
        self._remember(cid, {k: v.detach().contiguous() for k, v in state.items()})

    def _remember(self, cid: int, state: State) -> None:
        self._mem[cid] = state
        self._mem.move_to_end(cid)
        while len(self._mem) > self.cache_clients:
            old, old_state = self._mem.popitem(last=False)
            if self.state_dir is None:
                raise MemoryError(
                    f"client state store: more than runtime.cache_clients={self.cache_clients} clients hold state; "
                    "set runtime.state_dir to spill the rest to disk"
                )
            self._write(old, old_state)

    def _write(self, cid: int, state: State) -> None:
        path = self._path(cid)
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
        self._on_disk.add(cid)

    def state_dict(self) -> dict[int, State]:
        """Every client's state (for checkpoints)."""
        return {cid: self.get(cid) for cid in sorted(set(self._mem) | self._on_disk)}

    def load_state_dict(self, states: dict[int, State]) -> None:
        self._mem.clear()
        self._on_disk.clear()
        for cid, st in states.items():
            self.put(int(cid), st)
