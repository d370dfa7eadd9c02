"""Secure aggregation: the server learns the sum of the clients' update vectors and nothing else about any one of them.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS '17).
Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS '20): SecAgg+.

Who is protected from whom. An honest-but-curious server, even colluding with up to t−1 clients of any one
neighbourhood, learns only the sum of the inputs of the surviving clients U2 (and who survived). It does not protect
against a malicious server that lies about who dropped out beyond what the threshold tolerates (the 2t > k rule below
bounds such lies to a minority of a neighbourhood, but the paper's active-security round with signatures is not
implemented), and it does not hide the sum itself: add differential-privacy noise for that.

The protocol, one instance per FL round, as in the papers:

  0. AdvertiseKeys       u → server: (c_pk_u, s_pk_u); the server forwards to u the keys of its neighbours N(u) ∩ U0.
  1. ShareKeys           u draws the self-mask seed b_u, Shamir-shares s_sk_u and b_u with threshold t among its
                         neighbours, and encrypts each pair of shares e_uv for v under KA(c_sk_u, c_pk_v); the server
                         only routes the ciphertexts. U1 = the clients that completed ShareKeys.
  2. MaskedInputCollection  u sends y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U1} ±PRG(s_uv)  mod 2^bits
                         (+ if u < v, − if u > v, s_uv = KA(s_sk_u, s_pk_v)). U2 = the clients whose y_u arrived.
  3. Unmasking           every u ∈ U2 gets (U2, U1 \\ U2) and reveals, per neighbour v, its share of b_v if v ∈ U2 or
                         its share of s_sk_v if v dropped — never both for one v, remembered across requests. The
                         server rebuilds b_u (u ∈ U2) and s_sk_v (v dropped), removes every mask, and gets Σ_{U2} x_u.

Choices made here. The neighbourhood graph is Bell et al.'s random Harary graph (k = n−1 is Bonawitz's complete
graph). Shares are dealt to the k neighbours only, not to u itself, so a client never reveals anything about its own
secrets; hence 1 ≤ t ≤ k, and t > k/2 is required so that a server cannot collect t shares of both s_sk_u and b_u from
honest clients. Any neighbourhood with fewer than t live members aborts the round (SecAggAbort) before anything is
unmasked. Vectors live in Z_{2^bits} as numpy uint64; on the wire they are little-endian uint32 (bits ≤ 32) or uint64.

Parties only exchange the message dataclasses below; SecAggRound serialises every message to bytes and parses it
back, so the server never holds a reference to a client object, and it counts the bytes. `secure_sum` simulates a
whole round with dropouts.
"""
from __future__ import annotations

import math
import os
import secrets
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar, Protocol, TypeVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "SHAMIR_PRIME", "SecAggAbort", "UnmaskingRefused", "InvalidShareCiphertext", "OutOfOrder", "RingCodec",
    "to_bytes", "from_bytes", "prg", "pairwise_mask", "shamir_share", "shamir_reconstruct", "neighbours",
    "GraphBounds", "graph_bounds", "harary_parameters",
    "SecAggConfig", "AdvertiseKeys", "ShareKeysRequest", "ShareKeys", "MaskingRequest", "MaskedInput",
    "UnmaskingRequest", "UnmaskingResponse", "SecAggClient", "SecAggServer", "SecAggReport", "SecAggRound",
    "secure_sum",
]

SHAMIR_PRIME = 2**521 - 1  # a Mersenne prime above every 32-byte secret
_SHARE_BYTES = 66  # ⌈521 / 8⌉
_MIN_BITS, _MAX_BITS = 8, 48  # above 48 bits, float64 can no longer round x·scale exactly
_MIN_LEVELS = 256  # for_sum refuses a step coarser than clip / 256
_NONCE = bytes(16)  # ChaCha20 counter ‖ nonce: fixed, as every PRG seed is used for exactly one stream
_LABEL = b"fedfm-secagg/v1/"


class SecAggAbort(RuntimeError):
    """The round cannot complete safely (too few live parties or shares, inconsistent messages); nothing is
    unmasked."""


class UnmaskingRefused(SecAggAbort):
    """An honest client refuses an Unmasking request that would reveal more than the protocol allows."""


class InvalidShareCiphertext(SecAggAbort):
    """An encrypted share failed authentication or names the wrong sender/recipient."""


class OutOfOrder(RuntimeError):
    """A call or message for a phase that is not open (for instance a masked input arriving after
    MaskedInputCollection closed); it is rejected and the round goes on without it."""


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and _MIN_BITS <= bits <= _MAX_BITS):
        raise ValueError(f"bits={bits!r}: expected an integer in [{_MIN_BITS}, {_MAX_BITS}]")


def _ring_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


# ---------------------------------------------------------------------------------------------------------------------
# Fixed-point encoding in Z_{2^bits}
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RingCodec:
    """x ↦ round(clamp(x, ±clip) · scale) mod 2^bits; a sum of n codes decodes as a signed `bits`-bit integer / scale.

    Decoding is exact up to n · step/2 (step = 1/scale) as long as n ≤ max_summands, i.e. n · round(clip · scale)
    < 2^(bits−1). Build one with `for_sum` to get the finest step for a given clip and number of summands.
    """

    bits: int
    scale: float
    clip: float

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        for name in ("scale", "clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r}: expected a finite positive number")
        if self._levels < 1:
            raise ValueError(f"scale={self.scale:g} with clip={self.clip:g}: clip·scale < 1/2 encodes every input as 0")
        if self.max_summands < 1:
            raise ValueError(f"scale={self.scale:g} with clip={self.clip:g}: a single input overflows "
                             f"Z_2^{self.bits} (need clip·scale < 2^{self.bits - 1})")

    @classmethod
    def for_sum(cls, clip: float, n: int, bits: int = 32) -> RingCodec:
        """The finest codec for which a sum of n inputs clamped to ±clip cannot overflow: n·clip·scale < 2^(bits−1)."""
        _check_bits(bits)
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n={n!r}: expected the number of summands, an integer ≥ 1")
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip={clip!r}: expected a finite positive number")
        levels = ((1 << (bits - 1)) - 1) // n
        if levels < _MIN_LEVELS:
            raise ValueError(f"bits={bits} leaves {levels} quantisation levels per sign for n={n} summands "
                             f"(step {clip / max(levels, 1):.3g} for clip={clip:g}); need ≥ {_MIN_LEVELS}: "
                             f"raise bits or lower n")
        return cls(bits, levels / clip, clip)

    @property
    def step(self) -> float:
        return 1.0 / self.scale

    @property
    def _levels(self) -> int:
        return int(np.rint(self.clip * self.scale))

    @property
    def max_summands(self) -> int:
        """The largest n whose sum of codes decodes without wrapping around."""
        return ((1 << (self.bits - 1)) - 1) // self._levels

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Float array → ring elements (uint64, same shape); values beyond ±clip are clamped."""
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("x: expected finite values, got NaN or ±inf")
        q = np.rint(np.clip(x, -self.clip, self.clip) * self.scale).astype(np.int64)
        return q.view(np.uint64) & _ring_mask(self.bits)

    def decode(self, total: np.ndarray, n: int) -> np.ndarray:
        """A sum of n codes (uint64 ring elements) → float64 sum of the inputs."""
        if n > self.max_summands:
            raise ValueError(f"n={n} summands can overflow Z_2^{self.bits} with clip={self.clip:g} and "
                             f"scale={self.scale:g}; at most {self.max_summands} fit")
        total = np.asarray(total)
        if total.dtype != np.uint64:
            raise ValueError(f"total: expected ring elements of dtype uint64, got {total.dtype}")
        shift = 64 - self.bits  # sign-extend the low `bits` bits
        return ((total << np.uint64(shift)).view(np.int64) >> shift) / self.scale


def to_bytes(y: np.ndarray, bits: int) -> bytes:
    """A ring vector as raw little-endian uint32 (bits ≤ 32) or uint64."""
    return np.ascontiguousarray(y, dtype=np.uint64).astype("<u4" if bits <= 32 else "<u8").tobytes()


def from_bytes(data: bytes, bits: int, dim: int) -> np.ndarray:
    """The inverse of `to_bytes`; rejects a wrong length or values outside Z_{2^bits}."""
    width = 4 if bits <= 32 else 8
    if len(data) != width * dim:
        raise ValueError(f"expected {width * dim} bytes for {dim} ring elements of {bits} bits, got {len(data)}")
    y = np.frombuffer(data, dtype="<u4" if width == 4 else "<u8").astype(np.uint64)
    if np.any(y > _ring_mask(bits)):
        raise ValueError(f"vector holds values ≥ 2^{bits}: not elements of Z_2^{bits}")
    return y


# ---------------------------------------------------------------------------------------------------------------------
# Cryptographic primitives: KA (X25519 + HKDF), PRG (ChaCha20), Shamir, the share channel (ChaCha20-Poly1305)
# ---------------------------------------------------------------------------------------------------------------------

def _kdf(shared: bytes, purpose: bytes, session: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL + purpose + b"/" + session).derive(shared)


def _agree(sk: X25519PrivateKey, pk: bytes, purpose: bytes, session: bytes) -> bytes:
    return _kdf(sk.exchange(X25519PublicKey.from_public_bytes(pk)), purpose, session)


def prg(seed: bytes, dim: int, bits: int) -> np.ndarray:
    """Expand a 32-byte seed into `dim` uniform elements of Z_{2^bits} (ChaCha20 keystream, little-endian words)."""
    if len(seed) != 32:
        raise ValueError(f"seed: expected 32 bytes, got {len(seed)}")
    width = 4 if bits <= 32 else 8
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(bytes(width * dim))
    return np.frombuffer(stream, dtype="<u4" if width == 4 else "<u8").astype(np.uint64) & _ring_mask(bits)


def pairwise_mask(u: int, s_sk_u: X25519PrivateKey, s_pk: Mapping[int, bytes], config: SecAggConfig) -> np.ndarray:
    """Σ_v ±PRG(s_uv) over the partners v in `s_pk` (v ↦ s_pk_v): + if u < v, − if u > v.

    Client u adds this to its masked input; the server, having rebuilt s_sk_v of a dropped v, adds it to cancel the
    masks that v's surviving neighbours left in the sum (their signs are the opposite of v's)."""
    total = np.zeros(config.dim, dtype=np.uint64)
    for v, pk in s_pk.items():
        if v == u:
            raise ValueError(f"client {u} cannot be its own mask partner")
        mask = prg(_agree(s_sk_u, pk, b"mask", config.session), config.dim, config.bits)
        if u < v:
            total += mask
        else:
            total -= mask
    return total & _ring_mask(config.bits)


def shamir_share(secret: int, t: int, xs: Sequence[int]) -> dict[int, int]:
    """t-out-of-len(xs) Shamir shares of `secret` over GF(SHAMIR_PRIME): {x: f(x)} for a random f of degree t−1
    with f(0) = secret."""
    p = SHAMIR_PRIME
    if not 0 <= secret < p:
        raise ValueError("secret: expected an integer in [0, SHAMIR_PRIME)")
    if len(set(xs)) != len(xs) or any(not 0 < x < p for x in xs):
        raise ValueError(f"xs={list(xs)}: expected distinct x coordinates in [1, SHAMIR_PRIME)")
    if not 1 <= t <= len(xs):
        raise ValueError(f"t={t}: expected 1 ≤ t ≤ {len(xs)}, the number of shares")
    coefficients = [secret] + [secrets.randbelow(p) for _ in range(t - 1)]

    def f(x: int) -> int:
        acc = 0
        for c in reversed(coefficients):
            acc = (acc * x + c) % p
        return acc

    return {x: f(x) for x in xs}


def shamir_reconstruct(shares: Mapping[int, int], t: int) -> int:
    """f(0) by Lagrange interpolation from t of the shares {x: f(x)}; fewer than t shares raise ValueError."""
    if t < 1:
        raise ValueError(f"t={t}: expected a threshold ≥ 1")
    if len(shares) < t:
        raise ValueError(f"{len(shares)} shares cannot reconstruct a secret shared with threshold t={t}")
    p = SHAMIR_PRIME
    points = sorted(shares.items())[:t]
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        num = den = 1
        for j, (x_j, _) in enumerate(points):
            if j != i:
                num = num * x_j % p
                den = den * (x_j - x_i) % p
        secret = (secret + y_i * num * pow(den, -1, p)) % p
    return secret


def _seal(key: bytes, u: int, v: int, s_share: int, b_share: int, session: bytes) -> bytes:
    """e_uv = AE_k(u ‖ v ‖ share of s_sk_u ‖ share of b_u), nonce prepended."""
    plaintext = (struct.pack("<QQ", u, v) + s_share.to_bytes(_SHARE_BYTES, "big")
                 + b_share.to_bytes(_SHARE_BYTES, "big"))
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _LABEL + b"share/" + session)


def _open(key: bytes, ciphertext: bytes, u: int, v: int, session: bytes) -> tuple[int, int]:
    """Decrypt e_uv (from u, for v) → (share of s_sk_u, share of b_u); a forged, tampered, misaddressed or
    reflected ciphertext raises InvalidShareCiphertext."""
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(ciphertext[:12], ciphertext[12:], _LABEL + b"share/" + session)
    except InvalidTag:
        raise InvalidShareCiphertext(f"the share ciphertext from client {u} to client {v} failed authentication "
                                     f"(tampered, or not encrypted for {v} by {u})") from None
    if len(plaintext) != 16 + 2 * _SHARE_BYTES:
        raise InvalidShareCiphertext(f"the share ciphertext from client {u} to client {v} has a malformed body")
    sender, recipient = struct.unpack_from("<QQ", plaintext)
    if (sender, recipient) != (u, v):
        raise InvalidShareCiphertext(f"a share ciphertext delivered as ({u} → {v}) is labelled "
                                     f"({sender} → {recipient})")
    return (int.from_bytes(plaintext[16:16 + _SHARE_BYTES], "big"),
            int.from_bytes(plaintext[16 + _SHARE_BYTES:], "big"))


# ---------------------------------------------------------------------------------------------------------------------
# The public round configuration and the neighbourhood graph
# ---------------------------------------------------------------------------------------------------------------------

def neighbours(n: int, k: int, seed: int) -> list[frozenset[int]]:
    """Bell et al.'s random Harary graph on parties 0..n−1: shuffle them with the public `seed`, put them on a ring,
    and connect each to the k/2 next and k/2 previous ones. k ≥ n−1 gives Bonawitz's complete graph; otherwise k
    must be even. Returns the neighbour set of each party (k-regular, symmetric, no self-loops)."""
    if n < 2:
        raise ValueError(f"n={n}: secure aggregation needs at least 2 parties")
    if k >= n - 1:
        return [frozenset(range(n)) - {i} for i in range(n)]
    if k < 2 or k % 2:
        raise ValueError(f"k={k}: expected an even number ≥ 2 of neighbours (k/2 on each side of the shuffled ring), "
                         f"or k ≥ n−1 = {n - 1} for the complete graph")
    order = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    graph: list[set[int]] = [set() for _ in range(n)]
    for pos, u in enumerate(order):
        for d in range(1, k // 2 + 1):
            v = order[(pos + d) % n]
            graph[u].add(v)
            graph[v].add(u)
    return [frozenset(s) for s in graph]


@dataclass(frozen=True)
class GraphBounds:
    """Union bounds on what can go wrong in one round on the random Harary graph H(n, k) with threshold t, when c of
    the n clients are corrupt (they and the server pool what they know) and d drop out, both fixed before the graph
    is drawn (Bell et al. 2020, the conditions of their Harary-graph analysis):
    - ``shares``: some honest client has ≥ t corrupt neighbours, who could rebuild both its mask key and b_u;
    - ``split``: the honest survivors' graph falls apart, so the server learns the sums of its pieces;
    - ``stall``: some client has fewer than t surviving neighbours, and the round aborts.
    ``security`` = shares + split; ``correctness`` = stall."""

    n: int
    k: int
    t: int
    corrupt: int
    dropouts: int
    shares: float
    split: float
    stall: float

    @property
    def security(self) -> float:
        return min(1.0, self.shares + self.split)

    @property
    def correctness(self) -> float:
        return min(1.0, self.stall)


def _hypergeom_sf(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[X ≥ at_least] for X the marked items among ``draws`` taken without replacement (exact, integer binomials)."""
    total = math.comb(population, draws)
    return sum(math.comb(marked, i) * math.comb(population - marked, draws - i)
               for i in range(max(at_least, 0), min(marked, draws) + 1)) / total


def graph_bounds(n: int, k: int, t: int, corrupt_fraction: float, dropout_fraction: float) -> GraphBounds:
    """The failure probabilities of one round (``GraphBounds``) for n clients, of which ⌈γn⌉ corrupt and ⌈δn⌉ drop."""
    k = min(k, n - 1)
    c, d = min(n, math.ceil(corrupt_fraction * n - 1e-9)), min(n, math.ceil(dropout_fraction * n - 1e-9))
    shares = min(1.0, n * _hypergeom_sf(n - 1, c, k, t))  # an honest u's k neighbours, drawn from the other n − 1
    stall = min(1.0, n * _hypergeom_sf(n - 1, d, k, k - t + 1))
    r = c + d  # removed from the honest survivors' graph; H(n, k) stays connected after removing fewer than k nodes
    if r < k or k >= n - 1:
        split = 0.0 if n - r >= 1 else 1.0
    else:  # it splits only where k/2 removed nodes sit side by side on the shuffled ring (twice); bound by once
        half = k // 2
        split = min(1.0, n * math.prod((r - j) / (n - j) for j in range(half)) if r >= half else 0.0)
    return GraphBounds(n, k, t, c, d, shares, split, stall)


def harary_parameters(n: int, corrupt_fraction: float, dropout_fraction: float, security_bits: int = 40,
                      correctness_bits: int = 20) -> GraphBounds:
    """The sparsest graph (smallest even k, then smallest t > k/2) whose round fails security with probability at
    most 2^−security_bits and correctness with at most 2^−correctness_bits, for ⌈γn⌉ corrupt clients and ⌈δn⌉
    dropouts. When no graph meets both, the complete graph (k = n − 1) with the smallest secure t: an abort releases
    nothing, a leak cannot be undone, so only security is a must. Raises ValueError when even that is not secure."""
    if n < 2:
        raise ValueError(f"n={n}: secure aggregation needs at least 2 parties")
    sec, cor = 2.0 ** -security_bits, 2.0 ** -correctness_bits
    for k in [*range(2, n - 1, 2), n - 1]:
        for t in range(k // 2 + 1, k + 1):
            b = graph_bounds(n, k, t, corrupt_fraction, dropout_fraction)
            if b.security <= sec and b.correctness <= cor:
                return b
    for t in range((n - 1) // 2 + 1, n):
        b = graph_bounds(n, n - 1, t, corrupt_fraction, dropout_fraction)
        if b.security <= sec:
            return b
    raise ValueError(f"no threshold makes secure aggregation of {n} clients safe with ⌈{corrupt_fraction:g}·n⌉ corrupt "
                     f"(even the complete graph needs more than the corrupt among each client's neighbours)")


@dataclass(frozen=True)
class SecAggConfig:
    """What every party of one round knows: the roster U (sampled client ids), vector length, graph and threshold.

    k=None (or k ≥ n−1) is the complete graph; t=None is ⌊k/2⌋ + 1, the smallest strict majority of a
    neighbourhood. After construction `k` and `t` hold the values in force and `graph[u]` is N(u).
    `session` (e.g. the FL round number) is bound into every derived key.
    """

    clients: tuple[int, ...]
    dim: int
    k: int | None = None
    t: int | None = None
    bits: int = 32
    graph_seed: int = 0
    session: bytes = b""
    graph: dict[int, frozenset[int]] = field(init=False, repr=False, compare=False)
    _x: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = tuple(sorted(int(u) for u in self.clients))
        if len(ids) < 2 or len(set(ids)) != len(ids) or ids[0] < 0:
            raise ValueError(f"clients={list(self.clients)}: expected at least 2 distinct non-negative client ids")
        if not (isinstance(self.dim, int) and self.dim >= 1):
            raise ValueError(f"dim={self.dim!r}: expected the vector length, an integer ≥ 1")
        _check_bits(self.bits)
        n = len(ids)
        k = n - 1 if self.k is None else min(int(self.k), n - 1)
        by_position = neighbours(n, k, self.graph_seed)
        t = k // 2 + 1 if self.t is None else int(self.t)
        if not k / 2 < t <= k:
            raise ValueError(f"t={t}: expected k/2 < t ≤ k for k={k} neighbours (t shares of a secret come from a "
                             f"strict majority of a client's neighbours, so no server gets both s_sk_u and b_u)")
        object.__setattr__(self, "clients", ids)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "t", t)
        object.__setattr__(self, "graph", {ids[i]: frozenset(ids[j] for j in nb) for i, nb in enumerate(by_position)})
        object.__setattr__(self, "_x", {u: i + 1 for i, u in enumerate(ids)})

    def index(self, u: int) -> int:
        """Client u's 1-based position in the roster: the x coordinate of the Shamir shares it holds."""
        return self._x[u]


# ---------------------------------------------------------------------------------------------------------------------
# Messages (the only things that cross between parties) and their wire format
# ---------------------------------------------------------------------------------------------------------------------

def _pack(obj: object, out: list[bytes]) -> None:
    if isinstance(obj, int) and obj >= 0:
        raw = obj.to_bytes((obj.bit_length() + 7) // 8, "big")
        out += [b"i", struct.pack("<H", len(raw)), raw]
    elif isinstance(obj, bytes):
        out += [b"b", struct.pack("<I", len(obj)), obj]
    elif isinstance(obj, tuple):
        out += [b"t", struct.pack("<I", len(obj))]
        for item in obj:
            _pack(item, out)
    elif isinstance(obj, frozenset):
        out += [b"s", struct.pack("<I", len(obj))]
        for item in sorted(obj):
            _pack(item, out)
    elif isinstance(obj, dict):
        out += [b"d", struct.pack("<I", len(obj))]
        for key in sorted(obj):
            _pack(key, out)
            _pack(obj[key], out)
    else:
        raise TypeError(f"cannot serialise {type(obj).__name__} {obj!r}")


def _unpack(buf: memoryview, i: int) -> tuple[object, int]:
    tag = bytes(buf[i:i + 1])
    i += 1
    if tag == b"i":
        (size,) = struct.unpack_from("<H", buf, i)
        return int.from_bytes(_take(buf, i + 2, size), "big"), i + 2 + size
    if tag == b"b":
        (size,) = struct.unpack_from("<I", buf, i)
        return _take(buf, i + 4, size), i + 4 + size
    if tag in (b"t", b"s", b"d"):
        (count,) = struct.unpack_from("<I", buf, i)
        i += 4
        items = []
        for _ in range(count * (2 if tag == b"d" else 1)):
            item, i = _unpack(buf, i)
            items.append(item)
        if tag == b"t":
            return tuple(items), i
        if tag == b"s":
            return frozenset(items), i
        return dict(zip(items[::2], items[1::2])), i
    raise ValueError(f"malformed message: unknown tag {tag!r} at byte {i - 1}")


def _take(buf: memoryview, i: int, size: int) -> bytes:
    if i + size > len(buf):
        raise ValueError("malformed message: truncated")
    return bytes(buf[i:i + size])


_M = TypeVar("_M", bound="_Message")


class _Message:
    """Deterministic binary encoding of a message dataclass: a one-byte type tag, then its fields."""

    _TAG: ClassVar[bytes]

    def to_bytes(self) -> bytes:
        out = [self._TAG]
        _pack(tuple(getattr(self, f.name) for f in fields(self)), out)  # type: ignore[arg-type]
        return b"".join(out)

    @classmethod
    def from_bytes(cls: type[_M], data: bytes) -> _M:
        buf = memoryview(data)
        if bytes(buf[:1]) != cls._TAG:
            raise ValueError(f"not a {cls.__name__} message")
        try:
            values, end = _unpack(buf, 1)
        except struct.error as e:
            raise ValueError(f"malformed {cls.__name__} message: {e}") from None
        if end != len(data) or not isinstance(values, tuple) or len(values) != len(fields(cls)):  # type: ignore
            raise ValueError(f"malformed {cls.__name__} message")
        return cls(*values)


class _FromClient(Protocol):
    @property
    def u(self) -> int: ...


_C = TypeVar("_C", bound=_FromClient)


@dataclass(frozen=True)
class AdvertiseKeys(_Message):
    """Round 0, u → server: u's two public keys."""

    _TAG = b"A"
    u: int
    c_pk: bytes  # channel key: encrypts the shares u sends through the server
    s_pk: bytes  # mask key: s_uv = KA(s_sk_u, s_pk_v)


@dataclass(frozen=True)
class ShareKeysRequest(_Message):
    """Round 0 → 1, server → u: {v: (c_pk_v, s_pk_v)} for v ∈ N(u) ∩ U0."""

    _TAG = b"a"
    keys: dict[int, tuple[bytes, bytes]]


@dataclass(frozen=True)
class ShareKeys(_Message):
    """Round 1, u → server: {v: e_uv}, one ciphertext for each neighbour v ∈ N(u) ∩ U0."""

    _TAG = b"S"
    u: int
    ciphertexts: dict[int, bytes]


@dataclass(frozen=True)
class MaskingRequest(_Message):
    """Round 1 → 2, server → u: {v: e_vu} for v ∈ N(u) ∩ U1; the senders are u's mask partners."""

    _TAG = b"s"
    ciphertexts: dict[int, bytes]


@dataclass(frozen=True)
class MaskedInput(_Message):
    """Round 2, u → server: y_u as raw little-endian words (see `to_bytes`)."""

    _TAG = b"M"
    u: int
    y: bytes


@dataclass(frozen=True)
class UnmaskingRequest(_Message):
    """Round 2 → 3, server → u ∈ U2: who is in the sum and who completed ShareKeys but sent no masked input."""

    _TAG = b"m"
    survivors: frozenset[int]  # U2
    dropped: frozenset[int]  # U1 \ U2


@dataclass(frozen=True)
class UnmaskingResponse(_Message):
    """Round 3, u → server: u's shares of s_sk_v for its dropped neighbours and of b_v for its surviving ones."""

    _TAG = b"U"
    u: int
    s_sk_shares: dict[int, int]
    b_shares: dict[int, int]


# ---------------------------------------------------------------------------------------------------------------------
# The parties
# ---------------------------------------------------------------------------------------------------------------------

class SecAggClient:
    """Client u's side of one round. It holds its own secrets (c_sk_u, s_sk_u, b_u) and the shares its neighbours
    entrusted to it, all private; its methods are the four rounds, each taking the server's message and returning
    u's reply."""

    def __init__(self, u: int, config: SecAggConfig):
        if u not in config.graph:
            raise ValueError(f"client {u} is not in the round's roster {list(config.clients)}")
        self.u = u
        self.config = config
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._b_u = b""  # drawn in ShareKeys
        self._keys: dict[int, tuple[bytes, bytes]] = {}  # v ∈ N(u) ∩ U0 → (c_pk_v, s_pk_v)
        self._held: dict[int, tuple[int, int]] = {}  # v ∈ N(u) ∩ U1 → (my share of s_sk_v, my share of b_v)
        self._revealed: dict[int, str] = {}  # v → "s_sk" or "b": the one share type Unmasking revealed for v
        self._phase = "AdvertiseKeys"

    def _expect(self, phase: str) -> None:
        if self._phase != phase:
            raise OutOfOrder(f"client {self.u}: {phase} called while the client expects {self._phase}")

    def _channel_key(self, v: int) -> bytes:
        return _agree(self._c_sk, self._keys[v][0], b"channel", self.config.session)

    def advertise_keys(self) -> AdvertiseKeys:
        """Round 0: send (c_pk_u, s_pk_u)."""
        self._expect("AdvertiseKeys")
        self._phase = "ShareKeys"
        return AdvertiseKeys(self.u, self._c_sk.public_key().public_bytes_raw(),
                             self._s_sk.public_key().public_bytes_raw())

    def share_keys(self, request: ShareKeysRequest) -> ShareKeys:
        """Round 1: draw b_u, t-out-of-|N(u) ∩ U0| share s_sk_u and b_u, encrypt each neighbour's pair of shares."""
        self._expect("ShareKeys")
        cfg, u = self.config, self.u
        strangers = set(request.keys) - cfg.graph[u]
        if strangers:
            raise SecAggAbort(f"client {u}: ShareKeys carries keys of non-neighbours {sorted(strangers)}")
        own = [self._c_sk.public_key().public_bytes_raw(), self._s_sk.public_key().public_bytes_raw()]
        every_key = own + [pk for pair in request.keys.values() for pk in pair]
        if len(set(every_key)) != len(every_key):
            raise SecAggAbort(f"client {u}: the advertised public keys are not all distinct")
        if len(request.keys) < cfg.t:
            raise SecAggAbort(f"client {u}: only {len(request.keys)} neighbours advertised keys, fewer than t={cfg.t}")
        self._keys = dict(request.keys)
        self._b_u = os.urandom(32)
        xs = [cfg.index(v) for v in request.keys]
        s_shares = shamir_share(int.from_bytes(self._s_sk.private_bytes_raw(), "big"), cfg.t, xs)
        b_shares = shamir_share(int.from_bytes(self._b_u, "big"), cfg.t, xs)
        ciphertexts = {v: _seal(self._channel_key(v), u, v, s_shares[x], b_shares[x], cfg.session)
                       for v, x in zip(request.keys, xs)}
        self._phase = "MaskedInputCollection"
        return ShareKeys(u, ciphertexts)

    def masked_input_collection(self, request: MaskingRequest, x: np.ndarray) -> MaskedInput:
        """Round 2: keep the shares addressed to u, then send y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U1} ±PRG(s_uv).

        `x` is u's input already encoded in the ring (RingCodec.encode), a uint64 vector of length dim. Nothing is
        kept or sent if any ciphertext fails to open."""
        self._expect("MaskedInputCollection")
        cfg, u = self.config, self.u
        x = np.asarray(x)
        if x.dtype != np.uint64 or x.shape != (cfg.dim,) or np.any(x > _ring_mask(cfg.bits)):
            raise ValueError(f"x: expected a ring vector from RingCodec.encode (uint64, shape ({cfg.dim},), "
                             f"values < 2^{cfg.bits}), got {x.dtype} {x.shape}")
        strangers = set(request.ciphertexts) - set(self._keys)
        if strangers:
            raise SecAggAbort(f"client {u}: shares from {sorted(strangers)}, who did not advertise keys to it")
        if len(request.ciphertexts) < cfg.t:
            raise SecAggAbort(f"client {u}: only {len(request.ciphertexts)} neighbours completed ShareKeys, "
                              f"fewer than t={cfg.t}")
        held = {v: _open(self._channel_key(v), ct, v, u, cfg.session) for v, ct in request.ciphertexts.items()}
        y = x + prg(self._b_u, cfg.dim, cfg.bits)
        y += pairwise_mask(u, self._s_sk, {v: self._keys[v][1] for v in held}, cfg)
        self._held = held
        self._phase = "Unmasking"
        return MaskedInput(u, to_bytes(y & _ring_mask(cfg.bits), cfg.bits))

    def unmasking(self, request: UnmaskingRequest) -> UnmaskingResponse:
        """Round 3: reveal, for each neighbour v, the share of b_v if v survived or of s_sk_v if v dropped.

        Refuses (UnmaskingRefused, revealing nothing) if the lists are inconsistent with what u knows, if fewer than
        t of its neighbours are survivors, or if any v would get the other share type than an earlier request
        revealed: once u has helped unmask v's pairwise masks it never helps unmask v's self mask, and vice versa."""
        self._expect("Unmasking")
        cfg, u = self.config, self.u

        def refuse(why: str) -> UnmaskingRefused:
            return UnmaskingRefused(f"client {u} refuses Unmasking: {why}")

        both = request.survivors & request.dropped
        if both:
            raise refuse(f"clients {sorted(both)} are listed both as survivors and as dropped")
        if u not in request.survivors:
            raise refuse("it sent its masked input but is not listed among the survivors")
        survivors, dropped = request.survivors & cfg.graph[u], request.dropped & cfg.graph[u]
        unknown = survivors - set(self._held)
        if unknown:
            raise refuse(f"neighbours {sorted(unknown)} are listed as survivors but never completed ShareKeys")
        unaccounted = set(self._held) - survivors - dropped
        if unaccounted:
            raise refuse(f"neighbours {sorted(unaccounted)} are listed neither as survivors nor as dropped")
        if len(survivors) < cfg.t:
            raise refuse(f"only {len(survivors)} of its neighbours are survivors, fewer than t={cfg.t}")
        wanted = {v: "b" for v in survivors} | {v: "s_sk" for v in dropped & set(self._held)}
        clash = sorted(v for v, kind in wanted.items() if self._revealed.get(v, kind) != kind)
        if clash:
            raise refuse(f"it already revealed the other share type for clients {clash}; revealing both would "
                         f"unmask their inputs")
        self._revealed.update(wanted)
        return UnmaskingResponse(u, s_sk_shares={v: self._held[v][0] for v, kind in wanted.items() if kind == "s_sk"},
                                 b_shares={v: self._held[v][1] for v, kind in wanted.items() if kind == "b"})


def party_to_bytes(party: SecAggClient) -> bytes:
    """Client u's secrets and what it holds between two phases, for a party whose process ends after each phase
    (a Flower ClientApp): written only to the client's own disk, deleted when its round ends."""
    import json

    return json.dumps({
        "u": party.u, "phase": party._phase, "b_u": party._b_u.hex(),
        "c_sk": party._c_sk.private_bytes_raw().hex(), "s_sk": party._s_sk.private_bytes_raw().hex(),
        "keys": {str(v): [c.hex(), s.hex()] for v, (c, s) in party._keys.items()},
        "held": {str(v): [str(a), str(b)] for v, (a, b) in party._held.items()},
        "revealed": {str(v): k for v, k in party._revealed.items()},
    }).encode()


def party_from_bytes(config: SecAggConfig, data: bytes) -> SecAggClient:
    """The party ``party_to_bytes`` wrote, in the round ``config`` describes."""
    import json

    st = json.loads(data)
    party = SecAggClient(int(st["u"]), config)
    party._phase, party._b_u = st["phase"], bytes.fromhex(st["b_u"])
    party._c_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(st["c_sk"]))
    party._s_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(st["s_sk"]))
    party._keys = {int(v): (bytes.fromhex(c), bytes.fromhex(k)) for v, (c, k) in st["keys"].items()}
    party._held = {int(v): (int(a), int(b)) for v, (a, b) in st["held"].items()}
    party._revealed = {int(v): k for v, k in st["revealed"].items()}
    return party


class SecAggServer:
    """The server's side of one round. It holds only public keys, the running sum of masked inputs and the shares
    clients revealed; ciphertexts pass through. Each phase method takes every message that arrived before that
    phase's deadline (whoever is missing has dropped) and returns the replies to send, keyed by client id. A phase
    that has closed rejects further messages with OutOfOrder; an abort ends the round."""

    def __init__(self, config: SecAggConfig):
        self.config = config
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}  # u ∈ U0 → (c_pk_u, s_pk_u)
        self.U0: frozenset[int] = frozenset()  # advertised keys
        self.U1: frozenset[int] = frozenset()  # completed ShareKeys
        self.U2: frozenset[int] = frozenset()  # sent a masked input: the clients in the sum
        self.U3: frozenset[int] = frozenset()  # answered Unmasking
        self._masked_sum = np.zeros(config.dim, dtype=np.uint64)  # Σ_{u ∈ U2} y_u
        self._s_sk_shares: dict[int, dict[int, int]] = {}  # dropped v → {x_w: share of s_sk_v}
        self._b_shares: dict[int, dict[int, int]] = {}  # survivor v → {x_w: share of b_v}
        self._phase = "AdvertiseKeys"

    def _open_phase(self, phase: str, following: str) -> None:
        if self._phase != phase:
            raise OutOfOrder(f"{phase} is not open (the server is at {self._phase}): the message is rejected")
        self._phase = following

    def _abort(self, why: str) -> SecAggAbort:
        self._phase = "aborted"
        return SecAggAbort(f"secure aggregation aborted: {why}")

    def _senders(self, phase: str, msgs: Iterable[_C], allowed: frozenset[int]) -> list[_C]:
        batch, seen = list(msgs), set()
        for m in batch:
            if m.u not in allowed or m.u in seen:
                raise self._abort(f"{phase}: unexpected or repeated message from client {m.u}")
            seen.add(m.u)
        return batch

    def _require_neighbourhoods(self, phase: str, parties: Iterable[int], pool: frozenset[int], name: str) -> None:
        """Every party's secrets must have ≥ t holders among `pool`, or they could never be reconstructed."""
        cfg = self.config
        for u in sorted(parties):
            have = len(cfg.graph[u] & pool)
            if have < cfg.t:
                raise self._abort(f"{phase}: client {u} has {have} neighbours in {name}, fewer than t={cfg.t}")

    def advertise_keys(self, msgs: Iterable[AdvertiseKeys]) -> dict[int, ShareKeysRequest]:
        """Round 0: U0 = the senders; forward each u the keys of N(u) ∩ U0."""
        self._open_phase("AdvertiseKeys", "ShareKeys")
        batch = self._senders("AdvertiseKeys", msgs, frozenset(self.config.clients))
        self.public_keys = {m.u: (m.c_pk, m.s_pk) for m in batch}
        self.U0 = frozenset(self.public_keys)
        self._require_neighbourhoods("AdvertiseKeys", self.U0, self.U0, "U0")
        graph = self.config.graph
        return {u: ShareKeysRequest({v: self.public_keys[v] for v in graph[u] & self.U0}) for u in self.U0}

    def share_keys(self, msgs: Iterable[ShareKeys]) -> dict[int, MaskingRequest]:
        """Round 1: U1 = the senders; route each e_uv (u ∈ U1) to v ∈ U1."""
        self._open_phase("ShareKeys", "MaskedInputCollection")
        graph = self.config.graph
        batch = self._senders("ShareKeys", msgs, self.U0)
        for m in batch:
            if set(m.ciphertexts) != graph[m.u] & self.U0:
                raise self._abort(f"ShareKeys: client {m.u} must send one ciphertext to each of its neighbours in U0 "
                                  f"{sorted(graph[m.u] & self.U0)}, sent to {sorted(m.ciphertexts)}")
        self.U1 = frozenset(m.u for m in batch)
        self._require_neighbourhoods("ShareKeys", self.U1, self.U1, "U1")
        return {v: MaskingRequest({m.u: m.ciphertexts[v] for m in batch if m.u in graph[v]}) for v in self.U1}

    def masked_input_collection(self, msgs: Iterable[MaskedInput]) -> dict[int, UnmaskingRequest]:
        """Round 2: U2 = the senders; add up their y_u; ask each u ∈ U2 to help unmask (U2, U1 \\ U2)."""
        self._open_phase("MaskedInputCollection", "Unmasking")
        cfg = self.config
        for m in self._senders("MaskedInputCollection", msgs, self.U1):
            self._masked_sum += from_bytes(m.y, cfg.bits, cfg.dim)
            self.U2 |= {m.u}
        self._masked_sum &= _ring_mask(cfg.bits)
        # only U2 is asked to unmask: every secret to rebuild (b_u of U2, s_sk_v of U1 \ U2) needs t holders there
        self._require_neighbourhoods("MaskedInputCollection", self.U1, self.U2, "U2")
        request = UnmaskingRequest(survivors=self.U2, dropped=self.U1 - self.U2)
        return {u: request for u in self.U2}

    def unmasking(self, msgs: Iterable[UnmaskingResponse]) -> np.ndarray:
        """Round 3: rebuild b_u (u ∈ U2) and s_sk_v (v ∈ U1 \\ U2), strip every mask, return Σ_{u ∈ U2} x_u in the
        ring. Aborts before rebuilding anything if some secret has fewer than t shares."""
        self._open_phase("Unmasking", "done")
        cfg = self.config
        dropped = self.U1 - self.U2
        batch = self._senders("Unmasking", msgs, self.U2)
        for m in batch:
            if not (m.b_shares.keys() <= cfg.graph[m.u] & self.U2 and m.s_sk_shares.keys() <= cfg.graph[m.u] & dropped):
                raise self._abort(f"Unmasking: client {m.u} sent shares for clients it was not asked about")
            for v, share in m.b_shares.items():
                self._b_shares.setdefault(v, {})[cfg.index(m.u)] = share
            for v, share in m.s_sk_shares.items():
                self._s_sk_shares.setdefault(v, {})[cfg.index(m.u)] = share
        self.U3 = frozenset(m.u for m in batch)
        for kind, owners, shares in (("b_u", self.U2, self._b_shares), ("s_sk_u", dropped, self._s_sk_shares)):
            for v in sorted(owners):
                have = len(shares.get(v, {}))
                if have < cfg.t:
                    raise self._abort(f"Unmasking: {have} shares of {kind} for client {v} arrived, fewer than "
                                      f"t={cfg.t}; nothing is unmasked")
        total = self._masked_sum.copy()
        for u in sorted(self.U2):
            total -= prg(self._secret(self._b_shares[u], f"b_u of client {u}"), cfg.dim, cfg.bits)
        for v in sorted(dropped):
            s_sk_v = X25519PrivateKey.from_private_bytes(self._secret(self._s_sk_shares[v], f"s_sk_u of client {v}"))
            if s_sk_v.public_key().public_bytes_raw() != self.public_keys[v][1]:
                raise self._abort(f"Unmasking: the rebuilt s_sk_u of client {v} does not match its s_pk_u")
            total += pairwise_mask(v, s_sk_v, {w: self.public_keys[w][1] for w in cfg.graph[v] & self.U2}, cfg)
        return total & _ring_mask(cfg.bits)

    def _secret(self, shares: Mapping[int, int], what: str) -> bytes:
        value = shamir_reconstruct(shares, self.config.t)
        if value >= 1 << 256:
            raise self._abort(f"Unmasking: the rebuilt {what} is not a 32-byte secret (inconsistent shares)")
        return value.to_bytes(32, "big")


# ---------------------------------------------------------------------------------------------------------------------
# Driving a round: SecAggRound (for the FL server) and secure_sum (a whole simulated round)
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class SecAggReport:
    """What happened in one round. Bytes are measured on the serialised messages; seconds are wall time."""

    codec: RingCodec
    included: tuple[int, ...] = ()  # U2: whose inputs are in the sum
    dropped: tuple[int, ...] = ()  # U1 \ U2: completed ShareKeys, no masked input; their pairwise masks removed
    late_rejected: tuple[int, ...] = ()  # sent a masked input after the phase closed (excluded from the sum)
    refused: dict[int, str] = field(default_factory=dict)  # client → why it refused an Unmasking request
    bytes_sent: dict[int, dict[str, int]] = field(default_factory=dict)  # client → phase → bytes uploaded
    bytes_received: dict[int, dict[str, int]] = field(default_factory=dict)  # client → phase → bytes downloaded
    server_seconds: dict[str, float] = field(default_factory=dict)  # phase → server compute time
    client_seconds: dict[str, float] = field(default_factory=dict)  # phase → total over clients (secure_sum only)


class SecAggRound:
    """One FL round of secure aggregation, seen from the server: create it with the sampled client ids, give each
    client party `config` (SecAggClient(u, round.config)), then feed each phase the messages that arrived before its
    deadline. Every message is serialised and parsed back on its way (so parties share no objects) and counted in
    `report`. `unmasking` returns the decoded float sum of the inputs of `report.included`.

        rnd = SecAggRound(ids, dim=d, codec=RingCodec.for_sum(clip, len(ids)), k=8, session=b"round 7")
        keys = rnd.advertise_keys(c.advertise_keys() for c in live)
        cts = rnd.share_keys(c.share_keys(keys[c.u]) for c in live)
        asks = rnd.masked_input_collection(c.masked_input_collection(cts[c.u], rnd.codec.encode(x[c.u])) for c in live)
        total = rnd.unmasking(c.unmasking(asks[c.u]) for c in live)
    """

    def __init__(self, client_ids: Iterable[int], *, dim: int, codec: RingCodec, k: int | None = None,
                 t: int | None = None, graph_seed: int = 0, session: bytes = b""):
        self.config = SecAggConfig(tuple(client_ids), dim, k, t, codec.bits, graph_seed, session)
        self.codec = codec
        self.server = SecAggServer(self.config)
        self.report = SecAggReport(codec)

    def _exchange(self, phase: str, msgs: Iterable[_Message], step: Callable[[list], dict[int, _M]]) -> dict[int, _M]:
        received = []
        for m in msgs:
            data = m.to_bytes()
            sent = self.report.bytes_sent.setdefault(m.u, {})  # type: ignore[attr-defined]
            sent[phase] = sent.get(phase, 0) + len(data)
            received.append(type(m).from_bytes(data))
        start = time.perf_counter()
        try:
            replies = step(received)
        finally:
            self.report.server_seconds[phase] = self.report.server_seconds.get(phase, 0.0) + time.perf_counter() - start
        delivered = {}
        for u, reply in replies.items():
            data = reply.to_bytes()
            self.report.bytes_received.setdefault(u, {})[phase] = len(data)
            delivered[u] = type(reply).from_bytes(data)
        return delivered

    def advertise_keys(self, msgs: Iterable[AdvertiseKeys]) -> dict[int, ShareKeysRequest]:
        return self._exchange("AdvertiseKeys", msgs, self.server.advertise_keys)

    def share_keys(self, msgs: Iterable[ShareKeys]) -> dict[int, MaskingRequest]:
        return self._exchange("ShareKeys", msgs, self.server.share_keys)

    def masked_input_collection(self, msgs: Iterable[MaskedInput]) -> dict[int, UnmaskingRequest]:
        return self._exchange("MaskedInputCollection", msgs, self.server.masked_input_collection)

    def unmasking(self, msgs: Iterable[UnmaskingResponse]) -> np.ndarray:
        result: list[np.ndarray] = []

        def step(batch: list[UnmaskingResponse]) -> dict:
            result.append(self.server.unmasking(batch))
            return {}

        self._exchange("Unmasking", msgs, step)
        self.report.included = tuple(sorted(self.server.U2))
        self.report.dropped = tuple(sorted(self.server.U1 - self.server.U2))
        return self.codec.decode(result[0], len(self.server.U2))


def secure_sum(inputs: Sequence[np.ndarray] | Mapping[int, np.ndarray], *, k: int | None = None,
               t: int | None = None, bits: int = 32, clip: float | None = None, seed: int = 0,
               drop_before_masking: Iterable[int] = (), drop_after_masking: Iterable[int] = (),
               late: Iterable[int] = ()) -> tuple[np.ndarray, SecAggReport]:
    """Simulate one round among len(inputs) clients (ids 0..n−1 for a list, the keys for a dict) and return the sum
    of the inputs of U2, decoded to float64 with the inputs' shape, and the report.

    drop_before_masking: complete ShareKeys, never send y (excluded; their pairwise masks are removed).
    drop_after_masking:  send y, then never answer Unmasking (included; their b_u comes from their neighbours).
    late:                send y after MaskedInputCollection closed (rejected, excluded, like drop_before_masking).
    clip: the public clamp of every coordinate; None uses the largest |input| (a simulation convenience: in a real
    deployment clip is part of the round's public config). k, t: see SecAggConfig; `seed` is the public graph seed.
    """
    xs = dict(inputs) if isinstance(inputs, Mapping) else dict(enumerate(inputs))
    arrays = {u: np.asarray(x, dtype=np.float64) for u, x in xs.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"inputs: expected arrays of one shape, got {sorted(shapes)}")
    (shape,) = shapes
    before, after, late_set = set(drop_before_masking), set(drop_after_masking), set(late)
    for name, group in (("drop_before_masking", before), ("drop_after_masking", after), ("late", late_set)):
        if not group <= arrays.keys():
            raise ValueError(f"{name}: clients {sorted(group - arrays.keys())} are not among the inputs")
    if before & after or before & late_set or after & late_set:
        raise ValueError("drop_before_masking, drop_after_masking and late must be disjoint")
    if clip is None:
        clip = max(float(np.max(np.abs(a), initial=0.0)) for a in arrays.values()) or 1.0
    codec = RingCodec.for_sum(clip, len(arrays), bits)
    rnd = SecAggRound(arrays, dim=math.prod(shape), codec=codec, k=k, t=t, graph_seed=seed,
                      session=b"secure_sum/%d" % seed)
    parties = {u: SecAggClient(u, rnd.config) for u in sorted(arrays)}
    report = rnd.report

    def clients(phase: str, call: Callable[[SecAggClient], _M | None], who: Iterable[int]) -> list[_M]:
        start = time.perf_counter()
        out = [m for m in (call(parties[u]) for u in sorted(who)) if m is not None]
        report.client_seconds[phase] = report.client_seconds.get(phase, 0.0) + time.perf_counter() - start
        return out

    def answer(party: SecAggClient, request: UnmaskingRequest) -> UnmaskingResponse | None:
        try:
            return party.unmasking(request)
        except UnmaskingRefused as e:
            report.refused[party.u] = str(e)
            return None

    keys = rnd.advertise_keys(clients("AdvertiseKeys", lambda c: c.advertise_keys(), parties))
    cts = rnd.share_keys(clients("ShareKeys", lambda c: c.share_keys(keys[c.u]), keys))
    masked = clients("MaskedInputCollection",
                     lambda c: c.masked_input_collection(cts[c.u], codec.encode(arrays[c.u].ravel())),
                     set(cts) - before)
    asks = rnd.masked_input_collection(m for m in masked if m.u not in late_set)
    rejected = []
    for m in masked:
        if m.u in late_set:
            try:
                rnd.masked_input_collection([m])
            except OutOfOrder:
                rejected.append(m.u)
    report.late_rejected = tuple(rejected)
    responses = clients("Unmasking", lambda c: answer(c, asks[c.u]), set(asks) - after)
    return rnd.unmasking(responses).reshape(shape), report
