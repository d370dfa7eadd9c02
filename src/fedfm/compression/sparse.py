"""Sparse codecs: ``topk`` sends the k coordinates of largest magnitude with their indices, ``randk`` k coordinates
drawn at random (the seed of the draw travels, not the indices). Both are biased on their own; a client pairs them
with error feedback (``feedback.py``; Seide et al. 2014, Stich et al. 2018: what it did not send it adds to its next
update). k is ``codec.count``, or ``codec.fraction`` of the values (at least one).

The kept values go through a dense codec, ``codec.values``: fp32, fp16, bf16, or int8/int4 blocks (top-k + int8).
Bytes: a 33-byte header, the indices (4 bytes each, increasing) or an 8-byte seed, then the values.
"""
from __future__ import annotations

import math
import struct

import torch

from ..errors import UpdateRejected
from . import CODECS, Codec, check_finite, check_layout, fingerprint, flat_of, layout_of, read_header, state_of
from .quantize import BlockQuantizer


class RawValues:
    """Values as raw ``dtype`` bytes."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.size = torch.empty(0, dtype=dtype).element_size()

    def nbytes(self, n: int) -> int:
        return n * self.size

    def pack(self, vec: torch.Tensor, generator=None) -> bytes:
        return vec.to(self.dtype).contiguous().view(torch.uint8).numpy().tobytes()

    def unpack(self, data: bytes, n: int) -> torch.Tensor:
        if len(data) != self.nbytes(n):
            raise UpdateRejected(f"{len(data)} bytes of values, expected {self.nbytes(n)} for {n} values")
        if not n:
            return torch.zeros(0)
        return check_finite(torch.frombuffer(bytearray(data), dtype=self.dtype).float())


VALUE_CODES = {"fp32": 32, "fp16": 16, "bf16": 17, "int8": 8, "int4": 4}
_RAW = {32: torch.float32, 16: torch.float16, 17: torch.bfloat16}


def value_packer(code: int, block_size: int, stochastic: bool):
    return RawValues(_RAW[code]) if code in _RAW else BlockQuantizer(code, block_size, stochastic)


class SparseCodec(Codec):
    carries_state = False  # a sparse change, not a state: never the downlink
    HEADER = struct.Struct("<2sBBBIQQ8s")  # magic, kind, value code, stochastic, block, values, k, fingerprint
    MAGIC = b"FK"
    kind = 0

    def __init__(self, fraction: float | None = None, count: int | None = None, values: str = "fp32",
                 block_size: int = 64, stochastic: bool = False):
        if fraction is None and count is None:
            fraction = 0.1
        self.fraction, self.count = fraction, count
        self.code = VALUE_CODES[values]
        self.packer = value_packer(self.code, block_size, stochastic)
        self.block_size, self.stochastic = int(block_size), bool(stochastic)
        self.random = self.kind == 1 or (self.stochastic and self.code in (8, 4))

    @classmethod
    def from_config(cls, ccfg) -> "SparseCodec":
        return cls(ccfg.fraction, ccfg.count, ccfg.values, ccfg.block_size, ccfg.stochastic)

    def k(self, n: int) -> int:
        if self.count is not None:
            return min(int(self.count), n)
        return min(n, max(1, math.ceil(self.fraction * n))) if n else 0

    def indices(self, flat: torch.Tensor, k: int, generator) -> tuple[torch.Tensor, bytes]:
        """The kept indices (increasing) and what the frame carries of them."""
        raise NotImplementedError

    def read_indices(self, data: bytes, n: int, k: int) -> tuple[torch.Tensor, int]:
        """The indices from the frame (after the header) and the bytes they took."""
        raise NotImplementedError

    def encode(self, state, generator=None) -> bytes:
        names, shapes = layout_of(state)
        flat = flat_of(state)
        n = flat.numel()
        k = self.k(n)
        idx, carried = self.indices(flat, k, generator)
        head = self.HEADER.pack(self.MAGIC, self.kind, self.code, int(self.stochastic), self.block_size, n, k,
                                fingerprint(names, shapes))
        return head + carried + self.packer.pack(flat[idx], generator)

    def decode(self, data: bytes, spec=None):
        data, (magic, kind, code, stochastic, block, n, k, fp) = read_header(self, data, spec)
        if magic != self.MAGIC or kind != self.kind or code not in VALUE_CODES.values() or block < 1:
            raise UpdateRejected(f"not {self.name} bytes (magic {magic!r}, kind {kind}, value code {code})")
        check_layout(n, fp, spec)
        if k > n:
            raise UpdateRejected(f"{k} kept values of {n}")
        body = data[self.HEADER.size:]
        idx, used = self.read_indices(body, n, k)
        values = value_packer(code, block, bool(stochastic)).unpack(body[used:], k)
        flat = torch.zeros(n)
        flat[idx] = values
        return state_of(flat, spec)


@CODECS.register("topk")
class TopK(SparseCodec):
    """The k coordinates of largest |Δ| (Aji & Heafield 2017; with error feedback, Stich et al. 2018)."""

    name, kind = "topk", 0

    def indices(self, flat, k, generator):
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values if k else torch.zeros(0, dtype=torch.long)
        return idx, idx.to(torch.int32).numpy().tobytes()

    def read_indices(self, data, n, k):
        if len(data) < 4 * k:
            raise UpdateRejected(f"{len(data)} bytes, too few for {k} indices")
        idx = torch.frombuffer(bytearray(data[:4 * k]), dtype=torch.int32).long() if k else torch.zeros(0, dtype=torch.long)
        if k and (idx.min() < 0 or idx.max() >= n or (idx[1:] <= idx[:-1]).any()):
            raise UpdateRejected("top-k indices must be increasing and within the state")
        return idx, 4 * k


@CODECS.register("randk")
class RandK(SparseCodec):
    """k coordinates drawn uniformly without replacement (Stich et al. 2018's rand-k); only the draw's seed travels."""

    name, kind = "randk", 1
    SEED = struct.Struct("<Q")

    @staticmethod
    def draw(seed: int, n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values

    def indices(self, flat, k, generator):
        if generator is None:
            raise ValueError("randk draws its coordinates from a generator: pass one from randomness.py")
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        return self.draw(seed, flat.numel(), k), self.SEED.pack(seed)

    def read_indices(self, data, n, k):
        if len(data) < self.SEED.size:
            raise UpdateRejected("randk bytes without their seed")
        (seed,) = self.SEED.unpack_from(data)
        return self.draw(seed, n, k), self.SEED.size
