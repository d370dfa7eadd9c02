from collections import OrderedDict

import pytest
import torch

from fedfm.compression import CODECS, make_codec
from fedfm.errors import UpdateRejected
from fedfm.models.state import StateSpec


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(2, 1, bias=False)


def _state():
    torch.manual_seed(0)
    return OrderedDict(a=torch.randn(2, 3), b=torch.randn(5))


@pytest.mark.parametrize("name,tol", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 1e-2)])
def test_roundtrip_and_size(name, tol):
    codec = make_codec(name)
    st = _state()
    data = codec.encode(st)
    assert isinstance(data, bytes)
    back = codec.decode(data)
    for k in st:
        assert back[k].dtype == torch.float32
        assert torch.allclose(back[k], st[k], rtol=tol, atol=tol)
    if name != "fp32":
        assert len(data) < len(make_codec("fp32").encode(st))


def test_registry_lists_codecs():
    assert {"fp32", "fp16", "bf16"} <= set(CODECS.names())


def _spec():
    return StateSpec(Two())


def _good(spec):
    return OrderedDict((n, torch.ones(spec.shapes[n])) for n in spec.names)


@pytest.mark.parametrize("bad", ["wrong_name", "wrong_shape", "nan", "inf", "truncated", "wrong_dtype"])
def test_decode_rejects_bad_updates(bad):
    codec, spec = make_codec("fp32"), _spec()
    st = _good(spec)
    if bad == "wrong_name":
        st["c.weight"] = st.pop("b.weight")
    elif bad == "wrong_shape":
        st["a.weight"] = torch.ones(3, 3)
    elif bad == "nan":
        st["a.bias"][0] = float("nan")
    elif bad == "inf":
        st["a.bias"][1] = float("inf")
    data = codec.encode(st)
    if bad == "truncated":
        data = data[: len(data) // 2]
    if bad == "wrong_dtype":
        data = make_codec("fp16").encode(st)
    with pytest.raises(UpdateRejected):
        codec.decode(data, spec)
    codec.decode(codec.encode(_good(spec)), spec)  # a good update passes
