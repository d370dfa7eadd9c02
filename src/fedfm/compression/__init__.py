"""Codecs: ``encode(state) -> bytes`` and ``decode(bytes) -> state``; everything that crosses the client/server line."""
from __future__ import annotations

from collections import OrderedDict

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from ..errors import UpdateRejected
from ..registry import Registry

CODECS: Registry[type] = Registry("codec")


class CastCodec:
    """Send each tensor cast to ``wire_dtype`` in a safetensors frame; decode back to fp32."""

    wire_dtype = torch.float32

    def encode(self, state: "dict[str, torch.Tensor]") -> bytes:
        return st_save({n: t.detach().to(self.wire_dtype).contiguous() for n, t in state.items()})

    def decode(self, data: bytes, spec=None) -> "OrderedDict[str, torch.Tensor]":
        """Decode; with a ``StateSpec``, also validate names, shapes, dtype and finiteness."""
        try:
            raw = st_load(bytes(data))
        except (SafetensorError, Exception) as e:  # truncated or garbage bytes
            raise UpdateRejected(f"undecodable update ({type(e).__name__}: {e})") from None
        if spec is None:
            return OrderedDict((n, t.float()) for n, t in raw.items())
        if set(raw) != set(spec.names):
            missing = sorted(set(spec.names) - set(raw))[:3]
            extra = sorted(set(raw) - set(spec.names))[:3]
            raise UpdateRejected(f"parameter names differ from the expected state (missing {missing}, unexpected {extra})")
        out = OrderedDict()
        for n in spec.names:
            t = raw[n]
            if tuple(t.shape) != spec.shapes[n]:
                raise UpdateRejected(f"{n}: shape {tuple(t.shape)}, expected {spec.shapes[n]}")
            if t.dtype != self.wire_dtype:
                raise UpdateRejected(f"{n}: dtype {t.dtype}, expected {self.wire_dtype}")
            t = t.float()
            if not torch.isfinite(t).all():
                raise UpdateRejected(f"{n}: non-finite values")
            out[n] = t
        return out


@CODECS.register("fp32")
class FP32(CastCodec):
    wire_dtype = torch.float32


@CODECS.register("fp16")
class FP16(CastCodec):
    wire_dtype = torch.float16


@CODECS.register("bf16")
class BF16(CastCodec):
    wire_dtype = torch.bfloat16


def make_codec(name: str):
    return CODECS.get(name)()
