"""What travels between the two sides, as bytes: a ``ClientTask`` down, a ``ClientResult`` up.

Both are written with safetensors (the codec's bytes as uint8 tensors, everything else as JSON in the header), so
reading a message runs no code, whatever a peer sends.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as _load
from safetensors.torch import save as _save

from ..errors import UpdateRejected
from . import ClientResult, ClientTask

_PAYLOAD, _EXTRA = "payload", "extra."


def _pack(blobs: dict[str, bytes], meta: dict[str, Any]) -> bytes:
    tensors = {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) if v else torch.zeros(0, dtype=torch.uint8)
               for k, v in blobs.items()}
    return _save(tensors, metadata={"meta": json.dumps(meta)})


def _unpack(data: bytes, what: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    try:
        tensors = _load(data)
        header_len = int.from_bytes(data[:8], "little")  # the safetensors header: its length, then its JSON
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["meta"])
    except Exception as e:  # not a message of ours: refuse it, name what was expected
        raise UpdateRejected(f"not a fedfm {what} message ({type(e).__name__}: {e})") from None
    return {k: t.numpy().tobytes() for k, t in tensors.items()}, meta


def task_to_bytes(task: ClientTask) -> bytes:
    blobs = {_PAYLOAD: task.payload, **{_EXTRA + k: v for k, v in task.extras.items()}}
    return _pack(blobs, {"client_id": task.client_id, "round": task.round, "seed": task.seed,
                         "evaluate": task.evaluate})


def task_from_bytes(data: bytes) -> ClientTask:
    blobs, meta = _unpack(data, "task")
    return ClientTask(client_id=int(meta["client_id"]), round=int(meta["round"]), seed=int(meta["seed"]),
                      payload=blobs.get(_PAYLOAD, b""), evaluate=bool(meta.get("evaluate", False)),
                      extras={k[len(_EXTRA):]: v for k, v in blobs.items() if k.startswith(_EXTRA)})


def result_to_bytes(result: ClientResult) -> bytes:
    blobs = {_PAYLOAD: result.update, **{_EXTRA + k: v for k, v in result.extras.items()}}
    return _pack(blobs, {"client_id": result.client_id, "num_examples": result.num_examples,
                         "metrics": result.metrics, "error": result.error, "crashed": result.crashed})


def result_from_bytes(data: bytes) -> ClientResult:
    blobs, meta = _unpack(data, "result")
    return ClientResult(client_id=int(meta["client_id"]), update=blobs.get(_PAYLOAD, b""),
                        num_examples=int(meta["num_examples"]), metrics=dict(meta.get("metrics") or {}),
                        error=meta.get("error"), crashed=bool(meta.get("crashed", False)),
                        extras={k[len(_EXTRA):]: v for k, v in blobs.items() if k.startswith(_EXTRA)})
