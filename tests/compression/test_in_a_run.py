"""The codecs in a run: both directions counted in bytes, error feedback kept per client, bad combinations refused."""
import pytest
import torch

from fedfm.compression import make_codec, make_downlink
from fedfm.compression.feedback import RESIDUAL
from fedfm.config import load_config
from fedfm.errors import ConfigError
from fedfm.simulation import Simulation, prepare


def _run(cfg):
    sim = Simulation(prepare(cfg))
    return sim, sim.run()


def _sizes(sim, codec):
    """The bytes of one state of the run's layout through ``codec`` (fixed-size codecs: any values will do)."""
    return len(codec.encode(sim.spec.unflatten(sim.global_flat), torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("up,down", [("int8", "int8"), ("int4", "fp16"), ("int8", None)])
def test_quantized_both_ways_counts_exact_bytes_and_still_learns(tiny_config, up, down):
    over = {"federation.rounds": 3, "federation.clients_per_round": 4, "eval.initial": True, "client.epochs": 2,
            "codec.name": up, "codec.stochastic": True}
    if down:
        over["codec.downlink"] = down
    sim, rows = _run(tiny_config(**over))
    assert type(sim.downlink).__name__.lower() == (down or up)
    first, last = rows[0], rows[-1]
    assert last["bytes_up"] == 4 * _sizes(sim, sim.codec)
    assert last["bytes_down"] == 4 * _sizes(sim, sim.downlink)
    assert last["eval_loss"] < first["eval_loss"]


def test_topk_with_error_feedback_keeps_each_clients_residual_in_its_state(tiny_config):
    cfg = tiny_config(**{"federation.rounds": 2, "federation.clients_per_round": 4, "codec.name": "topk",
                         "codec.fraction": 0.02})
    sim, rows = _run(cfg)
    k = sim.codec.k(sim.spec.numel)
    header = type(sim.codec).HEADER.size
    assert rows[-1]["bytes_up"] == 4 * (header + 8 * k)  # 4 clients: header, indices and fp32 values
    assert rows[-1]["bytes_down"] == 4 * len(make_codec("fp32").encode(sim.spec.unflatten(sim.global_flat)))
    for cid in range(4):
        residual = sim.store.get(cid)[RESIDUAL]
        assert residual.numel() == sim.spec.numel and float(residual.norm()) > 0
    # and without feedback nothing is kept
    sim2, _ = _run(tiny_config(**{"federation.rounds": 1, "codec.name": "topk", "codec.fraction": 0.02,
                                  "codec.error_feedback": False}))
    assert all(RESIDUAL not in (sim2.store.get(c) or {}) for c in range(4))


def test_the_downlink_defaults_to_the_uplink_codec_when_it_carries_a_state(tiny_config):
    assert make_downlink(tiny_config(**{"codec.name": "int4"}).codec).name == "int4"
    assert make_downlink(tiny_config(**{"codec.name": "topk"}).codec).name == "fp32"
    assert make_downlink(tiny_config(**{"codec.name": "topk", "codec.downlink": "fp16"}).codec).name == "fp16"


@pytest.mark.parametrize("over,keys", [
    ({"codec.name": "topk", "secagg.enabled": True}, ["codec.name", "secagg.enabled"]),
    ({"codec.name": "randk", "secagg.enabled": True}, ["codec.name", "secagg.enabled"]),
    ({"codec.downlink": "topk"}, ["codec.downlink"]),
    ({"codec.name": "int8", "codec.fraction": 0.1}, ["codec.fraction"]),
    ({"codec.name": "topk", "codec.fraction": 0.1, "codec.count": 5}, ["codec.fraction", "codec.count"]),
    ({"codec.name": "fp16", "codec.stochastic": True}, ["codec.stochastic"]),
    ({"codec.name": "topk", "client.algorithm": "scaffold", "client.optimizer": "sgd"}, ["codec.name", "scaffold"]),
    ({"codec.downlink": "int9"}, ["codec.downlink", "int8"]),
    ({"codec.name": "topk", "runtime.name": "ray"}, ["runtime.name", "codec.name"]),
])
def test_combinations_that_cannot_work_are_refused_at_config_time_naming_the_keys(tiny_config, over, keys):
    with pytest.raises(ConfigError) as e:
        cfg = tiny_config(**over)
        prepare(cfg)  # a runtime's own checks (ray) run here, still before any model loads
    for key in keys:
        assert key in str(e.value)


def test_load_config_names_the_codec_values_field():
    with pytest.raises(ConfigError, match="codec.values"):
        load_config("bbc-lora", ["codec.name=topk", "codec.values=int3"])
