"""Codecs: ``encode(state) -> bytes`` and ``decode(bytes, spec) -> state``; everything that crosses the client/server
line. One registry (``codec.name`` up, ``codec.downlink`` down):

    fp32, fp16, bf16   every tensor cast, in a safetensors frame
    int8, int4         per-block absmax quantisation, optionally with stochastic rounding (``quantize.py``)
    topk, randk        the k largest (or k random) coordinates, their values through a dense codec (``sparse.py``);
                       what a client does not send it keeps and adds to its next update (``feedback.py``)

The block and sparse codecs lay the state out flat in the order of the names it is encoded with and start with a
fixed header: a magic, the codec's parameters, the number of values and an 8-byte fingerprint of the names and
shapes, so a decoder refuses bytes meant for another layout. Their byte counts are exact: header, scales, indices
and values are all there is.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from ..errors import UpdateRejected
from ..registry import Registry

CODECS: Registry[type] = Registry("codec")


def fingerprint(names, shapes) -> bytes:
    """8 bytes that name a layout (its names and shapes, in order): a decoder's check that bytes are for its state."""
    h = hashlib.blake2b(digest_size=8)
    for n in names:
        h.update(f"{n}:{tuple(shapes[n])};".encode())
    return h.digest()


def layout_of(state) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    return list(state), {n: tuple(t.shape) for n, t in state.items()}


def flat_of(state) -> torch.Tensor:
    """The state's tensors, in its order, as one fp32 vector."""
    if not state:
        return torch.zeros(0)
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in state.values()])


def state_of(flat: torch.Tensor, spec) -> "OrderedDict[str, torch.Tensor]":
    """``flat`` cut into ``spec``'s names and shapes."""
    out, at = OrderedDict(), 0
    for n in spec.names:
        size = int(torch.Size(spec.shapes[n]).numel())
        out[n] = flat[at:at + size].view(spec.shapes[n])
        at += size
    return out


def numel_of(spec) -> int:
    return sum(int(torch.Size(spec.shapes[n]).numel()) for n in spec.names)


def need_spec(codec, spec) -> None:
    if spec is None:
        raise TypeError(f"codec {codec.name!r} lays the state out flat: decode it with the state's spec "
                        "(its names and shapes)")


def read_header(codec, data: bytes, spec) -> tuple[bytes, tuple]:
    """A flat frame's bytes and its unpacked fixed header (``codec.HEADER``), refused when too short."""
    need_spec(codec, spec)
    data = bytes(data)
    if len(data) < codec.HEADER.size:
        raise UpdateRejected(f"undecodable update ({len(data)} bytes, shorter than the {codec.name} header)")
    return data, codec.HEADER.unpack_from(data)


def check_layout(n: int, fp: bytes, spec) -> None:
    """The frame's value count and layout fingerprint are the decoder's state's."""
    if n != numel_of(spec) or fp != fingerprint(spec.names, spec.shapes):
        raise UpdateRejected(f"parameter names or shapes differ from the expected state ({n} values for "
                             f"{numel_of(spec)})")


def check_finite(flat: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(flat).all():
        raise UpdateRejected("non-finite values")
    return flat


class Codec:
    """What every codec declares: ``carries_state`` (it can send a whole state, so it may be the downlink: a sparse
    codec sends a change, not a state), ``lossless``, and ``random`` (its encoding draws from a generator: the
    caller passes one from ``randomness.py``)."""

    name = "?"
    carries_state = True
    lossless = False
    random = False

    @classmethod
    def from_config(cls, ccfg) -> "Codec":
        return cls()

    def encode(self, state, generator: torch.Generator | None = None) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, spec=None) -> "OrderedDict[str, torch.Tensor]":
        raise NotImplementedError


class CastCodec(Codec):
    """Send each tensor cast to ``wire_dtype`` in a safetensors frame; decode back to fp32."""

    wire_dtype = torch.float32

    def encode(self, state: "dict[str, torch.Tensor]", generator=None) -> bytes:
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
    name = "fp32"
    wire_dtype = torch.float32
    lossless = True


@CODECS.register("fp16")
class FP16(CastCodec):
    name = "fp16"
    wire_dtype = torch.float16


@CODECS.register("bf16")
class BF16(CastCodec):
    name = "bf16"
    wire_dtype = torch.bfloat16


def make_codec(ccfg) -> Codec:
    """The uplink codec of a config's ``codec`` section (or a codec name, with that codec's defaults)."""
    if isinstance(ccfg, str):
        return CODECS.get(ccfg)()
    return CODECS.get(ccfg.name).from_config(ccfg)


def make_downlink(ccfg) -> Codec:
    """The codec of the server's broadcast: ``codec.downlink``, or by default ``codec.name`` when that codec can
    carry a whole state, else fp32. It rounds to nearest: a client takes its delta against the state as it decoded
    it, so the broadcast's rounding never accumulates in the global model and needs no unbiased draws."""
    name = ccfg.downlink or (ccfg.name if getattr(CODECS.get(ccfg.name), "carries_state", True) else "fp32")
    return CODECS.get(name).from_config(ccfg.model_copy(update={"stochastic": False}))


from . import quantize, sparse  # noqa: E402,F401  (register int8, int4, topk, randk)
