"""Secure aggregation (Bonawitz et al. 2017, SecAgg+ graph of Bell et al. 2020): the ring codec round-trips; the
unmasked sum is the plain sum on the complete and the sparse graph, with clients dropping before or after masking;
too many dropouts abort; a masked vector looks uniform whatever its input; a dropped-then-late client cannot be
unmasked; Shamir and the encrypted share channel behave; the server holds no client secret."""
from __future__ import annotations

import itertools
import os
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedfm.privacy.secagg import (
    InvalidShareCiphertext,
    MaskingRequest,
    OutOfOrder,
    RingCodec,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggRound,
    UnmaskingRefused,
    UnmaskingRequest,
    from_bytes,
    neighbours,
    pairwise_mask,
    prg,
    secure_sum,
    shamir_reconstruct,
    shamir_share,
    to_bytes,
)

CHI2_15_CRITICAL = 56.49  # P(χ²₁₅ > 56.49) = 1e-6
RING32 = np.uint64(2**32 - 1)


def _parties(n: int, *, dim: int, k: int | None = None, t: int | None = None, seed: int = 0):
    rnd = SecAggRound(range(n), dim=dim, codec=RingCodec.for_sum(1.0, n), k=k, t=t, graph_seed=seed)
    return rnd, {u: SecAggClient(u, rnd.config) for u in range(n)}


def _until_masking(rnd: SecAggRound, clients: dict[int, SecAggClient]) -> dict[int, MaskingRequest]:
    keys = rnd.advertise_keys(c.advertise_keys() for c in clients.values())
    return rnd.share_keys(clients[u].share_keys(keys[u]) for u in keys)


def _spread_dropouts(n: int, k: int, t: int, count: int, seed: int) -> list[int]:
    """`count` clients whose absence leaves every neighbourhood with at least t members."""
    graph, dropped = neighbours(n, k, seed), set()
    for u in np.random.default_rng(seed).permutation(n):
        if len(dropped) < count and all(len(nb - dropped - {int(u)}) >= t for nb in graph):
            dropped.add(int(u))
    assert len(dropped) == count
    return sorted(dropped)


def _assert_sum(total: np.ndarray, xs, included, step: float) -> None:
    expected = np.sum([np.asarray(xs[u], dtype=np.float64) for u in included], axis=0)
    assert np.max(np.abs(total - expected)) <= len(xs) * step / 2 + 1e-9


def test_ring_codec_round_trip_negatives_and_overflow_guard():
    rng = np.random.default_rng(0)
    n, clip = 7, 3.0
    codec = RingCodec.for_sum(clip, n)
    xs = rng.uniform(-clip, clip, size=(n, 500))
    xs[0, :3] = [-clip, clip, 0.0]
    total = np.zeros(500, dtype=np.uint64)
    for x in xs:
        total = (total + codec.encode(x)) & RING32
    assert np.max(np.abs(codec.decode(total, n) - xs.sum(axis=0))) <= n * codec.step / 2 + 1e-9
    negatives = sum(codec.encode(np.full(4, -clip)) for _ in range(n)) & RING32
    assert np.allclose(codec.decode(negatives, n), -n * clip)
    assert codec.decode(codec.encode(np.array([10 * clip, -10 * clip])), 1).tolist() == [clip, -clip]  # clamped
    assert len(to_bytes(total, 32)) == 4 * 500 and np.array_equal(from_bytes(to_bytes(total, 32), 32, 500), total)

    small = RingCodec(bits=8, scale=1.0, clip=42.0)  # 3 · 42 = 126 < 2^7 fits, 4 · 42 = 168 wraps to −88
    four = sum(small.encode(np.array([42.0])) for _ in range(4)) & np.uint64(255)
    assert small.max_summands == 3 and small.decode(four - small.encode(np.array([42.0])), 3)[0] == 126
    assert small._levels * 4 - 256 == -88 and small.decode(four, 3)[0] == -88  # what the guard below prevents
    with pytest.raises(ValueError, match="n=4 summands can overflow Z_2\\^8"):
        small.decode(four, 4)
    with pytest.raises(ValueError, match="bits=32 leaves 21 quantisation levels .* for n=100000000 summands"):
        RingCodec.for_sum(1.0, 10**8)
    with pytest.raises(ValueError, match="a single input overflows"):
        RingCodec(bits=16, scale=2.0**15, clip=1.0)
    with pytest.raises(ValueError, match="x: expected finite"):
        codec.encode(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="bits=4"):
        RingCodec.for_sum(1.0, 2, bits=4)


def test_neighbour_graph_is_a_seeded_k_regular_harary_graph():
    graph = neighbours(20, 8, seed=1)
    assert all(len(nb) == 8 and u not in nb for u, nb in enumerate(graph))
    assert all(u in graph[v] for u, nb in enumerate(graph) for v in nb)
    assert graph == neighbours(20, 8, seed=1) and graph != neighbours(20, 8, seed=2)
    assert neighbours(5, 4, seed=0) == [frozenset(range(5)) - {u} for u in range(5)]  # k = n−1: Bonawitz
    with pytest.raises(ValueError, match="k=3: expected an even number"):
        neighbours(20, 3, seed=0)
    with pytest.raises(ValueError, match="t=4: expected k/2 < t ≤ k for k=8"):
        SecAggConfig(tuple(range(20)), 10, k=8, t=4)


@pytest.mark.parametrize("k,t", [(None, None), (4, 3)], ids=["complete graph", "SecAgg+ k=4"])
def test_unmasked_sum_equals_the_plain_sum(k, t):
    n, dim = 10, 1000
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    xs = [rng.normal(0.0, 1.0, dim) for _ in range(n)]
    total, report = secure_sum(xs, k=k, t=t, seed=5)
    assert report.included == tuple(range(n)) and report.dropped == () and not report.refused
    _assert_sum(total, xs, range(n), report.codec.step)
    degree = n - 1 if k is None else k
    for u in range(n):  # y travels as raw uint32 words; ShareKeys carries one ~176-byte ciphertext per neighbour
        assert 4 * dim <= report.bytes_sent[u]["MaskedInputCollection"] < 4 * dim + 64
        assert degree * 176 < report.bytes_sent[u]["ShareKeys"] < degree * 200 + 64

    ids = {7: rng.normal(size=(3, 4)), 19: rng.normal(size=(3, 4)), 40: rng.normal(size=(3, 4))}
    total, report = secure_sum(ids, seed=1)
    assert report.included == (7, 19, 40) and total.shape == (3, 4)
    _assert_sum(total, ids, ids, report.codec.step)


GRAPHS = {"complete graph n=10": (10, None, 5), "SecAgg+ n=20 k=8": (20, 8, 5)}


@pytest.mark.parametrize("when", ["after masking", "before masking", "both"])
@pytest.mark.parametrize("graph", GRAPHS)
def test_sum_is_recovered_with_30_percent_dropouts(graph, when):
    n, k, t = GRAPHS[graph]
    drops = _spread_dropouts(n, n - 1 if k is None else k, t, count=3 * n // 10, seed=7)
    before = {"after masking": [], "before masking": drops, "both": drops[::2]}[when]
    after = [u for u in drops if u not in before]
    rng = np.random.default_rng(2)
    xs = [rng.uniform(-1.0, 1.0, 200) for _ in range(n)]
    total, report = secure_sum(xs, k=k, t=t, seed=7, drop_before_masking=before, drop_after_masking=after)
    included = [u for u in range(n) if u not in before]
    assert report.included == tuple(included) and report.dropped == tuple(before) and not report.refused
    _assert_sum(total, xs, included, report.codec.step)
    assert all("Unmasking" not in report.bytes_sent[u] for u in drops)  # the dropped never answered


@pytest.mark.parametrize("when", ["drop_before_masking", "drop_after_masking"])
def test_too_many_dropouts_abort_with_a_clear_error(when):
    xs = [np.ones(16) for _ in range(10)]
    expected = {"drop_before_masking": r"MaskedInputCollection: client 0 has 4 neighbours in U2, fewer than t=5",
                "drop_after_masking": r"Unmasking: 4 shares of b_u for client 0 arrived, fewer than t=5; nothing is "
                                      r"unmasked"}
    with pytest.raises(SecAggAbort, match=expected[when]):
        secure_sum(xs, t=5, **{when: range(6)})
    # SecAgg+: emptying one neighbourhood is enough, however many clients stay elsewhere
    n, k, t = 20, 8, 5
    victim_neighbours = sorted(neighbours(n, k, seed=3)[0])[:4]
    with pytest.raises(SecAggAbort, match=r"fewer than t=5"):
        secure_sum([np.ones(16)] * n, k=k, t=t, seed=3, **{when: victim_neighbours})


def _chi2_top_bits(y: np.ndarray) -> float:
    counts = np.bincount((y >> np.uint64(28)).astype(np.int64), minlength=16)
    expected = len(y) / 16
    return float(np.sum((counts - expected) ** 2 / expected))


def test_a_masked_vector_is_independent_of_its_input():
    dim = 1 << 15
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    inputs = {"zeros": np.zeros(dim), "all +clip": np.ones(dim),
              "large, random sign": rng.choice([-1.0, 1.0], dim) * rng.uniform(0.9, 1.0, dim)}
    masked = {}
    for name, x in inputs.items():  # a fresh round, hence fresh keys and b_u, for each input
        rnd, clients = _parties(3, dim=dim)
        requests = _until_masking(rnd, clients)
        message = clients[0].masked_input_collection(requests[0], rnd.codec.encode(x))
        masked[name] = from_bytes(message.y, 32, dim)
    assert _chi2_top_bits(rnd.codec.encode(inputs["all +clip"])) > CHI2_15_CRITICAL  # the test has power
    for y in masked.values():
        assert _chi2_top_bits(y) < CHI2_15_CRITICAL
    bound = 5 / np.sqrt(dim)
    assert abs(np.corrcoef(inputs["large, random sign"], masked["large, random sign"].astype(np.float64))[0, 1]) < bound
    y0, y1 = (masked[name].astype(np.float64) for name in ("zeros", "all +clip"))
    sigma = 2.0**32 / np.sqrt(12)  # uniform on Z_2^32
    assert abs(y0.mean() - 2.0**31) < 5 * sigma / np.sqrt(dim)
    assert abs(y0.mean() - y1.mean()) < 5 * sigma * np.sqrt(2 / dim)
    assert abs(y0.var() / y1.var() - 1) < 5 * np.sqrt(2 * 0.8 / dim)  # Var(s²) = 0.8 σ⁴ / D for a uniform


def test_a_dropped_then_late_client_cannot_be_unmasked():
    n, late, dim = 6, 2, 64
    rnd, clients = _parties(n, dim=dim)
    cfg, codec = rnd.config, rnd.codec
    rng = np.random.default_rng(3)
    xs = {u: rng.uniform(-1.0, 1.0, dim) for u in range(n)}
    requests = _until_masking(rnd, clients)
    masked = {u: clients[u].masked_input_collection(requests[u], codec.encode(xs[u])) for u in range(n)}
    asks = rnd.masked_input_collection(masked[u] for u in range(n) if u != late)  # y_late misses the deadline
    assert late not in asks and asks[0].dropped == {late}
    responses = [clients[u].unmasking(asks[u]) for u in asks]
    total = rnd.unmasking(responses)

    # (b) the server's sum excludes the late client, and the late y is rejected when it arrives
    _assert_sum(total, xs, [u for u in range(n) if u != late], codec.step)
    with pytest.raises(OutOfOrder, match="MaskedInputCollection is not open"):
        rnd.masked_input_collection([masked[late]])

    # (a) the server rebuilds s_sk_late from the revealed shares and strips the pairwise masks from the late y ...
    s_shares = {cfg.index(r.u): r.s_sk_shares[late] for r in responses}
    s_sk = X25519PrivateKey.from_private_bytes(shamir_reconstruct(s_shares, cfg.t).to_bytes(32, "big"))
    assert s_sk.public_key().public_bytes_raw() == rnd.server.public_keys[late][1]
    partners = {v: rnd.server.public_keys[v][1] for v in cfg.graph[late] & rnd.server.U1}
    stripped = (from_bytes(masked[late].y, cfg.bits, dim) - pairwise_mask(late, s_sk, partners, cfg)) & RING32
    assert not np.allclose(codec.decode(stripped, 1), xs[late], atol=0.5)  # ... but PRG(b_late) still hides x
    unmasked = (stripped - prg(clients[late]._b_u, dim, cfg.bits)) & RING32  # only b_late was missing
    assert np.allclose(codec.decode(unmasked, 1), xs[late], atol=codec.step)

    # the shares of b_late: every client that gave its share of s_sk_late refuses, whatever the lists say
    again = UnmaskingRequest(survivors=rnd.server.U2 | {late}, dropped=frozenset())
    for u in asks:
        with pytest.raises(UnmaskingRefused, match=rf"already revealed the other share type for clients \[{late}\]"):
            clients[u].unmasking(again)
    both = UnmaskingRequest(survivors=frozenset(range(n)), dropped=frozenset({late}))
    with pytest.raises(UnmaskingRefused, match=rf"clients \[{late}\] are listed both as survivors and as dropped"):
        clients[0].unmasking(both)
    flip = UnmaskingRequest(survivors=rnd.server.U2 - {1}, dropped=frozenset({1, late}))  # vice versa: b then s_sk
    with pytest.raises(UnmaskingRefused, match=r"already revealed the other share type for clients \[1\]"):
        clients[0].unmasking(flip)

    # the same through the driver
    total, report = secure_sum(list(xs.values()), late=[late])
    assert report.late_rejected == (late,) and late not in report.included and report.dropped == (late,)
    _assert_sum(total, xs, report.included, report.codec.step)


def test_shamir_any_t_shares_reconstruct_and_fewer_do_not():
    secret = int.from_bytes(os.urandom(32), "big")
    xs, t = list(range(1, 8)), 4
    shares = shamir_share(secret, t, xs)
    assert shamir_reconstruct(shares, t) == secret
    for subset in itertools.combinations(xs, t):
        assert shamir_reconstruct({x: shares[x] for x in subset}, t) == secret
    for subset in itertools.combinations(xs, t - 1):
        few = {x: shares[x] for x in subset}
        with pytest.raises(ValueError, match="3 shares cannot reconstruct a secret shared with threshold t=4"):
            shamir_reconstruct(few, t)
        assert shamir_reconstruct(few, t - 1) != secret  # a lower-degree curve through them misses f(0)
    with pytest.raises(ValueError, match="distinct"):
        shamir_share(secret, 2, [1, 1, 2])
    with pytest.raises(ValueError, match="t=5: expected 1 ≤ t ≤ 4"):
        shamir_share(secret, 5, [1, 2, 3, 4])


def test_share_ciphertexts_are_authenticated_and_addressed():
    rnd, clients = _parties(4, dim=8)
    x = rnd.codec.encode(np.zeros(8))
    with pytest.raises(OutOfOrder, match="client 1: MaskedInputCollection called while the client expects"):
        clients[1].masked_input_collection(MaskingRequest({}), x)
    requests = _until_masking(rnd, clients)
    to_1 = requests[1].ciphertexts  # {v: e_v1}

    tampered = bytearray(to_1[0])
    tampered[30] ^= 1
    with pytest.raises(InvalidShareCiphertext, match="from client 0 to client 1 failed authentication"):
        clients[1].masked_input_collection(MaskingRequest(to_1 | {0: bytes(tampered)}), x)
    with pytest.raises(InvalidShareCiphertext, match="from client 0 to client 2 failed authentication"):
        clients[2].masked_input_collection(MaskingRequest(requests[2].ciphertexts | {0: to_1[0]}), x)  # meant for 1
    reflected = requests[0].ciphertexts[1]  # e_10, under the same pairwise key as e_01
    with pytest.raises(InvalidShareCiphertext, match=r"delivered as \(0 → 1\) is labelled \(1 → 0\)"):
        clients[1].masked_input_collection(MaskingRequest(to_1 | {0: reflected}), x)
    assert clients[1].masked_input_collection(requests[1], x).u == 1  # nothing was kept from the failed attempts


def _walk(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(key, seen)
            yield from _walk(value, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from _walk(item, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from _walk(vars(obj), seen)


def test_the_server_holds_no_client_secret():
    n, dim, gone = 6, 16, 4
    rnd, clients = _parties(n, dim=dim)
    requests = _until_masking(rnd, clients)
    x = rnd.codec.encode(np.full(dim, 0.5))
    asks = rnd.masked_input_collection(clients[u].masked_input_collection(requests[u], x) for u in requests
                                       if u != gone)
    total = rnd.unmasking(clients[u].unmasking(asks[u]) for u in asks)  # rebuilds s_sk of the dropped client
    assert np.allclose(total, 0.5 * (n - 1), atol=n * rnd.codec.step)
    assert not [o for o in _walk(rnd) if isinstance(o, (X25519PrivateKey, SecAggClient))]
    assert sum(isinstance(o, X25519PrivateKey) for o in _walk(clients[0])) == 2  # the walk finds c_sk and s_sk
    assert {name for name in vars(clients[0]) if not name.startswith("_")} == {"u", "config"}


def test_secagg_plus_at_scale_prints_its_timing():
    n, k, t, dim = 20, 8, 5, 200_000
    rng = np.random.default_rng(4)
    xs = [rng.normal(0.0, 0.1, dim).astype(np.float32) for _ in range(n)]
    drops = _spread_dropouts(n, k, t, count=4, seed=0)
    start = time.perf_counter()
    total, report = secure_sum(xs, k=k, t=t, clip=1.0, seed=0, drop_before_masking=drops[:2],
                               drop_after_masking=drops[2:])
    elapsed = time.perf_counter() - start
    _assert_sum(total, xs, report.included, report.codec.step)
    upload = np.mean([sum(report.bytes_sent[u].values()) for u in report.included])
    print(f"\nSecAgg+ n={n} k={k} t={t} D={dim}: {elapsed:.2f} s in all; server "
          f"{ {p: round(s, 3) for p, s in report.server_seconds.items()} }; clients (total) "
          f"{ {p: round(s, 3) for p, s in report.client_seconds.items()} }; {upload / 1e6:.2f} MB uploaded per client")


def test_the_graph_bounds_are_upper_bounds_on_what_random_draws_show():
    """Monte Carlo over fresh graphs with c corrupt and d dropping clients placed at random: how often an honest
    client has ≥ t corrupt neighbours, the honest survivors split, or a client has < t live neighbours. Each rate
    stays within graph_bounds' union bound (and is not zero, so the check has teeth)."""
    from fedfm.privacy.secagg import graph_bounds
    from tests.conftest import reachable

    n, k, t = 40, 6, 4
    b = graph_bounds(n, k, t, corrupt_fraction=0.15, dropout_fraction=0.1)  # bounds 0.0995, 0.486, 0.328
    assert max(b.shares, b.split, b.stall) < 1
    rng = np.random.default_rng(0)
    shares = split = stall = 0
    draws = 2000
    for i in range(draws):
        graph = neighbours(n, k, seed=int(rng.integers(2**62)))
        order = rng.permutation(n)
        corrupt, dropped = set(order[:b.corrupt].tolist()), set(order[b.corrupt:b.corrupt + b.dropouts].tolist())
        honest = set(range(n)) - corrupt
        shares += any(len(graph[u] & corrupt) >= t for u in honest)
        stall += any(len(graph[u] - dropped) < t for u in range(n))
        alive = honest - dropped
        split += reachable(graph, alive) != alive
    for name, count in (("shares", shares), ("split", split), ("stall", stall)):
        rate, bound = count / draws, getattr(b, name)
        assert 0 < rate <= bound + 3 * (bound * (1 - min(bound, 1)) / draws) ** 0.5 + 1e-9, (name, rate, bound)
