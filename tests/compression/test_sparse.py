"""top-k and random-k codecs, and error feedback in the client state store."""
import math
import struct
from collections import OrderedDict

import pytest
import torch

from fedfm.compression.feedback import RESIDUAL, encode_with_feedback
from fedfm.compression.sparse import RandK, SparseCodec, TopK
from fedfm.errors import UpdateRejected
from fedfm.models.state import Layout
from fedfm.runtime.state_store import ClientStateStore


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(a=torch.randn(10, 30, generator=g), b=torch.randn(200, generator=g) * 0.1)


def _spec(st):
    return Layout({n: tuple(t.shape) for n, t in st.items()})


def _flat(st):
    return torch.cat([t.reshape(-1) for t in st.values()])


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    st = _state()
    x = _flat(st)
    codec = TopK(count=37)
    back = _flat(codec.decode(codec.encode(st), _spec(st)))
    kept = back != 0
    assert int(kept.sum()) == 37
    assert torch.equal(back[kept], x[kept])  # fp32 values: exact
    assert x[kept].abs().min() >= x[~kept].abs().max()


@pytest.mark.parametrize("values,size", [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_topk_bytes_are_header_indices_and_values(values, size):
    st = _state()
    n = _flat(st).numel()
    codec = TopK(fraction=0.1, values=values)
    k = math.ceil(0.1 * n)
    assert codec.k(n) == k
    assert len(codec.encode(st)) == SparseCodec.HEADER.size + 4 * k + size * k


def test_topk_composes_with_int8_values():
    st = _state()
    n = _flat(st).numel()
    codec = TopK(fraction=0.1, values="int8", block_size=16)
    k = codec.k(n)
    data = codec.encode(st)
    assert len(data) == SparseCodec.HEADER.size + 4 * k + 2 * math.ceil(k / 16) + k
    back, exact = _flat(codec.decode(data, _spec(st))), _flat(TopK(fraction=0.1).decode(TopK(fraction=0.1).encode(st),
                                                                                      _spec(st)))
    kept = exact != 0
    assert torch.equal(back != 0, kept) or int((back != 0).sum()) <= k  # a value may round to 0
    # each kept value within half a step of its int8 block
    assert ((back - exact)[kept].abs() <= exact[kept].abs().max() / 127).all()


def test_randk_sends_a_seed_not_indices_and_draws_from_the_generator():
    st = _state()
    n = _flat(st).numel()
    codec = RandK(count=50)
    a = codec.encode(st, torch.Generator().manual_seed(1))
    b = codec.encode(st, torch.Generator().manual_seed(2))
    assert len(a) == SparseCodec.HEADER.size + 8 + 4 * 50
    da, db = _flat(codec.decode(a, _spec(st))), _flat(codec.decode(b, _spec(st)))
    assert int((da != 0).sum()) == 50 and not torch.equal(da != 0, db != 0)
    x = _flat(st)
    assert torch.equal(da[da != 0], x[da != 0])
    with pytest.raises(ValueError, match="generator"):
        codec.encode(st)
    assert n > 50


@pytest.mark.parametrize("bad", ["unsorted", "out_of_range", "truncated", "k_above_n", "other_layout", "nan"])
def test_decode_refuses_bad_sparse_bytes(bad):
    st = _state()
    spec, codec = _spec(st), TopK(count=4)
    data = bytearray(codec.encode(st))
    h = SparseCodec.HEADER.size
    if bad == "unsorted":
        data[h:h + 8] = struct.pack("<ii", 9, 3)
    elif bad == "out_of_range":
        data[h:h + 4] = struct.pack("<i", 10 ** 6)
    elif bad == "truncated":
        data = data[:-1]
    elif bad == "k_above_n":
        data[:h] = SparseCodec.HEADER.pack(b"FK", 0, 32, 0, 64, 500, 501, bytes(data[h - 8:h]))
    elif bad == "other_layout":
        spec = Layout({"a": (30, 10), "b": (200,)})
    elif bad == "nan":
        data[-4:] = struct.pack("<f", float("nan"))
    with pytest.raises(UpdateRejected):
        codec.decode(bytes(data), spec)


@pytest.mark.parametrize("codec", [TopK(fraction=0.01), TopK(fraction=0.01, values="int8"), RandK(fraction=0.05)],
                         ids=["topk1%", "topk1%+int8", "randk5%"])
def test_with_error_feedback_the_sum_sent_converges_to_the_sum_of_true_updates(codec, tmp_path):
    """Σ_t sent_t = Σ_t Δ_t − e_T: the gap stays one residual while the sums grow, so their relative gap → 0; without
    feedback a biased codec's gap grows with the sum (the coordinates it never sends)."""
    dim = 2000
    spec = Layout({"w": (dim,)})
    store = ClientStateStore(cache_clients=1, state_dir=tmp_path)  # spills to disk: the residual survives it
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(dim, generator=g) * 0.1  # a persistent direction, as client updates have
    draws = torch.Generator().manual_seed(1)
    true_sum, sent_sum, plain_sum = torch.zeros(dim), torch.zeros(dim), torch.zeros(dim)
    gaps = {}
    for t in range(1, 801):
        delta = OrderedDict(w=mean + torch.randn(dim, generator=g) * 0.1)
        data = encode_with_feedback(codec, delta, spec, store, client_id=3, generator=draws)
        store.get(99) or store.put(99, {"x": torch.zeros(1)})  # another client evicts client 3 to disk
        sent_sum += codec.decode(data, spec)["w"]
        plain_sum += codec.decode(codec.encode(delta, draws), spec)["w"]
        true_sum += delta["w"]
        if t in (100, 800):
            residual = store.get(3)[RESIDUAL]
            assert torch.allclose(sent_sum + residual, true_sum, atol=1e-3)  # the identity, through the disk
            gaps[t] = float((sent_sum - true_sum).norm() / true_sum.norm())
    assert gaps[800] < gaps[100] / 4  # the gap falls like 1/T: the residual stays bounded
    assert gaps[800] < 0.1
    assert float((plain_sum - true_sum).norm() / true_sum.norm()) > 10 * gaps[800]
