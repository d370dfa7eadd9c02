"""int8 / int4 block codecs: the round-trip error bound, unbiased stochastic rounding, exact byte counts, and the
refusal of bytes that are not an update of this layout."""
import math
import struct
from collections import OrderedDict

import pytest
import torch

from fedfm.compression import make_codec
from fedfm.compression.quantize import BlockCodec, BlockQuantizer
from fedfm.errors import UpdateRejected
from fedfm.models.state import Layout


def _state(scale=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    # magnitudes that differ by block: what per-block scales are for
    return OrderedDict(a=torch.randn(8, 40, generator=g) * scale, b=torch.randn(40, 8, generator=g) * 100 * scale,
                       c=torch.randn(5, generator=g), z=torch.zeros(70))


def _spec(st):
    return Layout({n: tuple(t.shape) for n, t in st.items()})


def _flat(st):
    return torch.cat([t.reshape(-1) for t in st.values()])


@pytest.mark.parametrize("name,levels", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block", [16, 64, 100])
def test_deterministic_rounding_is_within_half_a_step_of_its_block(name, levels, block):
    st = _state()
    codec = type(make_codec(name))(block_size=block)
    back = _flat(codec.decode(codec.encode(st), _spec(st)))
    x = _flat(st)
    n = x.numel()
    padded = torch.zeros(math.ceil(n / block) * block)
    padded[:n] = x
    ideal = padded.view(-1, block).abs().amax(1) / levels  # the step absmax / L
    _, scale = BlockQuantizer(codec.bits, block).quantize(x)
    step = scale.float()
    # the stored step (bfloat16) is the ideal one rounded up, by at most bfloat16's relative spacing 2^-7
    assert (step >= ideal).all() and (step <= ideal * (1 + 2 ** -7)).all()
    assert ((back - x).abs() <= (step / 2).repeat_interleave(block)[:n]).all()
    assert (back[n - 70:] == 0).all()  # an all-zero tensor decodes to exact zeros


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased_over_many_draws(name):
    st = _state(seed=1)
    codec = type(make_codec(name))(block_size=32, stochastic=True)
    spec, x = _spec(st), _flat(st)
    g = torch.Generator().manual_seed(7)
    draws = 400
    mean = sum(_flat(codec.decode(codec.encode(st, g), spec)) for _ in range(draws)) / draws
    # per coordinate the rounding error is at most one step s; its mean over N draws has std ≤ s/(2√N)
    qz = BlockQuantizer(codec.bits, 32)
    _, scale = qz.quantize(x)
    s = scale.float().repeat_interleave(32)[:x.numel()]
    assert ((mean - x).abs() <= 4 * s / (2 * math.sqrt(draws)) + 1e-12).all()
    # while deterministic rounding keeps its bias: the same mean is far from x somewhere
    det = _flat(type(codec)(block_size=32).decode(type(codec)(block_size=32).encode(st), spec))
    assert (det - x).abs().max() > 10 * (mean - x).abs().max()


@pytest.mark.parametrize("name,per_value", [("int8", 1.0), ("int4", 0.5)])
@pytest.mark.parametrize("block", [1, 7, 64])
def test_byte_count_is_header_scales_and_values_exactly(name, per_value, block):
    st = _state()
    n = _flat(st).numel()
    codec = type(make_codec(name))(block_size=block)
    data = codec.encode(st)
    assert len(data) == BlockCodec.HEADER.size + 2 * math.ceil(n / block) + math.ceil(n * per_value)


def test_int8_and_int4_against_fp32_on_a_lora_shaped_state():
    """A LoRA r=8 state on q,v of 6 layers of hidden 384 with a 5-class head: within the NVFlare figures."""
    g = torch.Generator().manual_seed(0)
    st = OrderedDict()
    for i in range(6):
        for m in ("query", "value"):
            st[f"l{i}.{m}.lora_A"] = torch.randn(8, 384, generator=g)
            st[f"l{i}.{m}.lora_B"] = torch.randn(384, 8, generator=g) * 1e-3
    st["classifier.weight"], st["classifier.bias"] = torch.randn(5, 384, generator=g), torch.randn(5, generator=g)
    fp32 = len(make_codec("fp32").encode(st))
    assert len(make_codec("int8").encode(st)) / fp32 <= 0.26
    assert len(make_codec("int4").encode(st)) / fp32 <= 0.14


@pytest.mark.parametrize("bad", ["truncated", "other_layout", "magic", "bits", "nan_scale", "minus_128", "empty"])
def test_decode_refuses_what_is_not_an_update_of_this_layout(bad):
    st = _state()
    spec, codec = _spec(st), make_codec("int8")
    data = bytearray(codec.encode(st))
    h = BlockCodec.HEADER.size
    if bad == "truncated":
        data = data[:-3]
    elif bad == "other_layout":
        spec = Layout({"a": (8, 40), "b": (8, 40), "c": (5,), "z": (70,)})
    elif bad == "magic":
        data[0:2] = b"XX"
    elif bad == "bits":
        data = bytearray(make_codec("int4").encode(st))
    elif bad == "nan_scale":
        data[h:h + 2] = struct.pack("<H", 0x7FC0)  # bfloat16 NaN
    elif bad == "minus_128":
        data[-1] = 0x80
    elif bad == "empty":
        data = b""
    with pytest.raises(UpdateRejected):
        codec.decode(bytes(data), spec)


def test_decode_needs_the_layout():
    st = _state()
    with pytest.raises(TypeError, match="spec"):
        make_codec("int8").decode(make_codec("int8").encode(st))


def test_stochastic_rounding_without_a_generator_is_a_clear_error():
    with pytest.raises(ValueError, match="generator"):
        type(make_codec("int8"))(stochastic=True).encode(_state())
