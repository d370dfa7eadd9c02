"""Pre-tokenized data, once: ``encode`` results kept on disk, memory-mapped on the next run with the same data,
tokenizer and task settings.

The key is a SHA-256 over the task's class and settings, the tokenizer (its full serialized vocabulary, merges,
special tokens and chat template; an image processor's settings) and the examples themselves (texts, messages,
images, labels or token ids), so any change
to any of them is a different entry. Entries live in ``$FEDFM_CACHE/tokenized/<key>/`` (``tensors.pt`` loaded
with ``mmap=True``, ``meta.json`` with what the task keeps beside the tensors, e.g. the prompts it will answer),
written to a temporary folder and renamed, so a crash never leaves half an entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

VERSION = 1  # bump when an encoding changes meaning


def _feed(h, obj: Any) -> None:
    if obj is None:
        h.update(b"\x00none")
    elif isinstance(obj, np.ndarray):
        h.update(str(obj.dtype).encode() + str(obj.shape).encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer; for a processor of several parts (an image task's), each part's; an image processor's
    settings."""
    if tokenizer is None:
        return "none"
    if hasattr(tokenizer, "image_processor"):  # a tokenizer and an image processor, as transformers' processors hold
        parts = [tokenizer_fingerprint(getattr(tokenizer, "tokenizer", None)),
                 tokenizer_fingerprint(tokenizer.image_processor)]
        return hashlib.sha256(":".join(parts).encode()).hexdigest()
    if hasattr(tokenizer, "to_json_string"):  # an image processor: its class and settings
        return hashlib.sha256((type(tokenizer).__name__ + tokenizer.to_json_string()).encode()).hexdigest()
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        _feed(h, sorted(tokenizer.get_vocab().items()))
    _feed(h, [getattr(tokenizer, "chat_template", None), tokenizer.pad_token, tokenizer.eos_token,
              tokenizer.bos_token, getattr(tokenizer, "padding_side", None), getattr(tokenizer, "model_max_length", None)])
    return h.hexdigest()


def cache_key(task, examples) -> str:
    h = hashlib.sha256(f"fedfm-tokenized-v{VERSION}:{type(task).__module__}.{type(task).__name__}".encode())
    _feed(h, task.cfg.task.model_dump())
    h.update(tokenizer_fingerprint(task.tokenizer).encode())
    for name in ("texts", "messages", "input_ids"):
        _feed(h, getattr(examples, name, None))
    images = getattr(examples, "images", None)
    if images is not None:  # (text data keeps the keys it always had)
        _feed(h, len(images))
        for image in images:
            _feed(h, np.asarray(image))
    labels = getattr(examples, "labels", None)
    _feed(h, None if labels is None else np.asarray(labels))
    return h.hexdigest()


def encode_cached(task, examples, root: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """``task.encode(examples)``, from the cache when an entry exists (memory-mapped), else computed and stored.
    Returns the encoding and whether it came from the cache."""
    entry = root / "tokenized" / cache_key(task, examples)
    tensors, meta = entry / "tensors.pt", entry / "meta.json"
    if tensors.exists() and meta.exists():
        try:
            enc = torch.load(tensors, mmap=True, weights_only=True)
            for name, value in json.loads(meta.read_text()).items():
                setattr(task, name, value)
            return enc, True
        except Exception:  # an unreadable entry is rebuilt, never trusted
            shutil.rmtree(entry, ignore_errors=True)
    enc = task.encode(examples)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save({k: v.contiguous() for k, v in enc.items()}, tmp / "tensors.pt")
        (tmp / "meta.json").write_text(json.dumps({n: getattr(task, n) for n in task.cached_attrs}))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process wrote the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # a read-only cache only costs the next run its tokenization
    return enc, False
