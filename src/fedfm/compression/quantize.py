"""Block quantisation: ``int8`` and ``int4`` codecs, per-block absmax scales (blockwise quantisation as in Dettmers et
al. 2022, "8-bit Optimizers via Block-wise Quantization"), deterministic or stochastic rounding.

A block of ``codec.block_size`` values x shares one scale s = max|x| / L (L = 127 for 8 bits, 7 for 4), stored as
bfloat16 rounded up so that |x| / s ≤ L always holds; each value is sent as q = round(x / s) ∈ [−L, L] and decoded as
q·s. Deterministic rounding is within s/2 of x; stochastic rounding, q = ⌊x/s + u⌋ with u ~ U[0, 1), is unbiased:
E[q·s] = x (Alistarh et al. 2017, QSGD's unbiased rounding).

Bytes of a state of n values in blocks of b: a 24-byte header, 2·⌈n/b⌉ bytes of scales, then n bytes (int8) or
⌈n/2⌉ bytes (int4, two values per byte).
"""
from __future__ import annotations

import math
import struct

import torch

from ..errors import UpdateRejected
from . import CODECS, Codec, check_finite, check_layout, fingerprint, flat_of, layout_of, read_header, state_of

SCALE = torch.bfloat16


class BlockQuantizer:
    """A flat fp32 vector to (scales, packed integers) and back."""

    def __init__(self, bits: int, block_size: int = 64, stochastic: bool = False):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits, self.block_size, self.stochastic = bits, int(block_size), bool(stochastic)
        self.levels = 2 ** (bits - 1) - 1

    def nbytes(self, n: int) -> int:
        """Scales and values of n values (the exact size of ``pack``'s output)."""
        blocks = math.ceil(n / self.block_size)
        return 2 * blocks + (n if self.bits == 8 else (n + 1) // 2)

    def quantize(self, flat: torch.Tensor, generator: torch.Generator | None = None):
        """(q int8 [n], scales bfloat16 [blocks])."""
        n, b, L = flat.numel(), self.block_size, self.levels
        blocks = math.ceil(n / b)
        padded = torch.zeros(blocks * b)
        padded[:n] = flat
        x = padded.view(blocks, b)
        exact = x.abs().amax(1) / L
        scale = exact.to(SCALE)
        low = scale.float() < exact  # rounded down to bfloat16: take the next one up, so |x|/s ≤ L
        scale[low] = torch.nextafter(scale[low], torch.full_like(scale[low], float("inf")))
        s = scale.float().unsqueeze(1)
        y = torch.where(s > 0, x / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x))
        if self.stochastic:
            if generator is None:
                raise ValueError("stochastic rounding draws from a generator: pass one from randomness.py")
            q = torch.floor(y + torch.rand(y.shape, generator=generator))
        else:
            q = torch.round(y)
        return q.clamp_(-L, L).to(torch.int8).reshape(-1)[:n], scale

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        n, b = q.numel(), self.block_size
        s = scale.float().repeat_interleave(b)[:n]
        return q.float() * s

    def pack(self, flat: torch.Tensor, generator: torch.Generator | None = None) -> bytes:
        q, scale = self.quantize(flat, generator)
        if self.bits == 4:
            u = (q + 8).to(torch.uint8)  # −7…7 as 1…15
            if u.numel() % 2:
                u = torch.cat([u, torch.full((1,), 8, dtype=torch.uint8)])
            u = (u[0::2] | (u[1::2] << 4))
            values = u.numpy().tobytes()
        else:
            values = q.numpy().tobytes()
        return scale.view(torch.int16).numpy().tobytes() + values

    def unpack(self, data: bytes, n: int) -> torch.Tensor:
        if len(data) != self.nbytes(n):
            raise UpdateRejected(f"{self.bits}-bit block data of {len(data)} bytes, expected {self.nbytes(n)} for "
                                 f"{n} values in blocks of {self.block_size}")
        blocks = math.ceil(n / self.block_size)
        scale = torch.frombuffer(bytearray(data[:2 * blocks]), dtype=torch.int16).view(SCALE) if blocks else \
            torch.zeros(0, dtype=SCALE)
        if not torch.isfinite(scale.float()).all() or (scale.float() < 0).any():
            raise UpdateRejected("block scales must be finite and non-negative")
        raw = torch.frombuffer(bytearray(data[2 * blocks:]), dtype=torch.uint8) if n else torch.zeros(0, dtype=torch.uint8)
        if self.bits == 4:
            u = torch.stack([raw & 0xF, raw >> 4], 1).reshape(-1)[:n]
            if ((u == 0) | (u > 15)).any():
                raise UpdateRejected("4-bit values outside −7…7")
            q = u.to(torch.int16) - 8
        else:
            q = raw.view(torch.int8)
            if (q == -128).any():
                raise UpdateRejected("8-bit values outside −127…127")
        return check_finite(self.dequantize(q, scale))


class BlockCodec(Codec):
    """A state as one flat vector, quantised per block: header, scales, values."""

    bits = 8
    HEADER = struct.Struct("<2sBBIQ8s")  # magic, bits, stochastic, block size, values, layout fingerprint
    MAGIC = b"FQ"

    def __init__(self, block_size: int = 64, stochastic: bool = False):
        self.quantizer = BlockQuantizer(self.bits, block_size, stochastic)
        self.random = bool(stochastic)

    @classmethod
    def from_config(cls, ccfg) -> "BlockCodec":
        return cls(ccfg.block_size, ccfg.stochastic)

    def encode(self, state, generator=None) -> bytes:
        names, shapes = layout_of(state)
        flat = flat_of(state)
        qz = self.quantizer
        head = self.HEADER.pack(self.MAGIC, self.bits, int(qz.stochastic), qz.block_size, flat.numel(),
                                fingerprint(names, shapes))
        return head + qz.pack(flat, generator)

    def decode(self, data: bytes, spec=None):
        data, (magic, bits, _, block, n, fp) = read_header(self, data, spec)
        if magic != self.MAGIC or bits != self.bits or block < 1:
            raise UpdateRejected(f"not {self.name} bytes (magic {magic!r}, {bits} bits, block {block})")
        check_layout(n, fp, spec)
        qz = BlockQuantizer(self.bits, block)
        return state_of(qz.unpack(data[self.HEADER.size:], n), spec)


@CODECS.register("int8")
class Int8(BlockCodec):
    name, bits = "int8", 8


@CODECS.register("int4")
class Int4(BlockCodec):
    name, bits = "int4", 4
