"""client.algorithm fedmd (FedMD, Li & Wang 2019; FedDF, Lin et al. 2020): clients running two different
architectures (a tiny BERT and a tiny Llama classifier) exchange only logits of the public set; the server distils
their consensus into its foundation model and sends its logits back."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fedfm.config import load_config
from fedfm.errors import ConfigError, UpdateRejected
from fedfm.ownership.transfer import consensus, distill, kd_loss, pack, public_logits, unpack
from tests.conftest import TINY_BERT, make_rows, tiny_overrides, write_csv

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 64}
GROUPS = [{"model": {"name_or_path": None, "from_config": TINY_BERT, "tokenizer": "minilm"}, "clients": 2},
          {"model": {"name_or_path": None, "from_config": TINY_LLAMA, "tokenizer": "minilm"},
           "adapter": {"method": "lora", "target_modules": ["q_proj", "v_proj"]}, "clients": 2}]
FEDMD = {"client.algorithm": "fedmd", "transfer.public_fraction": 0.2, "transfer.groups": GROUPS,
         "client.steps": 3, "client.epochs": None, "federation.clients_per_round": 4, "eval.max_examples": 32,
         "transfer.server_distill_steps": 8, "transfer.client_distill_steps": 4}


@pytest.fixture(scope="module")
def make_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fedmd")
    csv = write_csv(tmp / "tiny.csv", make_rows())

    def make(**extra):
        return load_config("bbc-lora", tiny_overrides(csv, tmp, **{**FEDMD, **extra}))

    return make


@pytest.fixture(scope="module")
def run(make_cfg):
    """Two rounds of fedmd, with every task and result as it crossed the wire."""
    import fedfm.hetero as hetero

    sent = {"tasks": [], "results": []}
    to_task, to_result = hetero.task_to_bytes, hetero.result_to_bytes
    hetero.task_to_bytes = lambda t: sent["tasks"].append(to_task(t)) or sent["tasks"][-1]
    hetero.result_to_bytes = lambda r: sent["results"].append(to_result(r)) or sent["results"][-1]
    try:
        sim = hetero.HeteroSimulation(hetero.prepare_transfer(make_cfg()))
        rows = sim.run()
    finally:
        hetero.task_to_bytes, hetero.result_to_bytes = to_task, to_result
    return sim, rows, sent


# ---------------------------------------------------------------------------------------------- the math

def test_the_distillation_loss_is_the_hand_computed_kl_at_temperature():
    z_t = torch.tensor([[math.log(3.0), 0.0]])  # teacher softmax at T=1: (3/4, 1/4)
    z_s = torch.tensor([[0.0, 0.0]])  # student: (1/2, 1/2)
    by_hand = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kd_loss(z_s, z_t, 1.0)) == pytest.approx(by_hand, abs=1e-6)
    p = math.sqrt(3) / (math.sqrt(3) + 1)  # at T=2 the teacher is softmax(ln3/2, 0) = (√3, 1)/(√3 + 1)
    by_hand_t2 = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert float(kd_loss(z_s, z_t, 2.0)) == pytest.approx(by_hand_t2, abs=1e-6)
    assert float(kd_loss(z_t, z_t, 2.0)) == pytest.approx(0.0, abs=1e-7)
    assert consensus([torch.tensor([[1.0, 3.0]]), torch.tensor([[3.0, -1.0]])]).tolist() == [[2.0, 1.0]]


@pytest.mark.parametrize("codec,size", [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_logits_travel_as_exactly_rows_times_classes_times_bytes(codec, size):
    z = torch.randn(7, 5)
    data = pack(z, codec)
    assert len(data) == 7 * 5 * size
    back = unpack(data, (7, 5), codec)
    assert back.shape == (7, 5) and back.dtype == torch.float32
    assert torch.allclose(back, z, atol={"fp32": 0, "fp16": 1e-2, "bf16": 3e-2}[codec])
    with pytest.raises(UpdateRejected, match="7 public rows × 5 classes"):
        unpack(data[:-1], (7, 5), codec)
    with pytest.raises(UpdateRejected, match="non-finite"):
        unpack(pack(torch.full((7, 5), float("nan")), codec), (7, 5), codec)


# ---------------------------------------------------------------------------------------------- a run

def test_each_architecture_is_loaded_once_and_each_client_keeps_its_own_state(run):
    sim, rows, _ = run
    kinds = {type(g.ctx.model.base_model.model if hasattr(g.ctx.model, "base_model") else g.ctx.model).__name__
             for g in sim.groups}
    assert kinds == {"BertForSequenceClassification", "LlamaForSequenceClassification"}
    assert sim.bases_loaded == 2  # the server's foundation model (the model section: the tiny BERT) shares a base
    states = [sim.store.get(cid)["fedmd.state"] for cid in range(4)]
    assert not torch.equal(states[0], states[1]) and not torch.equal(states[2], states[3])
    assert states[0].numel() != states[2].numel()  # two architectures, two trainable states


def test_every_message_is_logits_of_the_public_set_and_nothing_else(run):
    from safetensors.torch import load

    sim, rows, sent = run
    P, C = len(sim.data.public), sim.num_classes
    assert P == round(0.2 * 240) and C == 4
    names = {n for g in sim.groups for n in g.ctx.spec.names} | set(sim.fm.spec.names)
    for kind, messages in sent.items():
        assert len(messages) == 8  # 4 clients × 2 rounds
        for i, data in enumerate(messages):
            tensors = load(data)
            assert set(tensors) == {"payload"} and tensors["payload"].dtype == torch.uint8
            size = tensors["payload"].numel()
            first_round = kind == "tasks" and i < 4
            assert size == (0 if first_round else P * C * 4)  # fp32 logits of the public set (none in round 1)
            header = data[8:8 + int.from_bytes(data[:8], "little")].decode()
            assert not any(n in header for n in names)  # no parameter name crosses
            if size:
                assert unpack(tensors["payload"].numpy().tobytes(), (P, C), "fp32").shape == (P, C)


def test_bytes_are_counted_exactly(run):
    sim, rows, _ = run
    P, C = len(sim.data.public), sim.num_classes
    r1, r2 = rows[1], rows[2]
    assert r1["bytes_up"] == 4 * P * C * 4 and r1["bytes_down"] == 0
    assert r2["bytes_up"] == r2["bytes_down"] == 4 * P * C * 4


def test_the_foundation_model_moves_toward_the_consensus(run):
    _, rows, _ = run
    for r in rows[1:]:
        assert r["consensus_clients"] == 4
        assert r["server_kl_after"] < r["server_kl_before"], r
    assert math.isfinite(rows[-1]["fm_accuracy"])


def test_a_client_moves_toward_what_the_server_sends(run):
    sim, _, _ = run
    g = sim.groups[1]  # the Llama clients
    algo, cid = g.algo, g.clients[0]
    algo.load(cid)
    public = algo.public
    teacher = unpack(sim.server.back, algo.shape, "fp32")  # F's logits after round 2
    before = float(kd_loss(public_logits(g.ctx.model, g.ctx.task, public.encoded, public.rows, 64), teacher, 1.0))
    distill(g.ctx.model, g.ctx.train_params(), g.ctx.task, public.encoded, public.rows, teacher, 1.0, 20, 0.01, 8,
            torch.Generator().manual_seed(0))
    after = float(kd_loss(public_logits(g.ctx.model, g.ctx.task, public.encoded, public.rows, 64), teacher, 1.0))
    assert after < before


def test_a_client_digests_the_servers_logits_before_it_trains(run):
    sim, rows, _ = run
    assert "distill_loss" not in rows[1] and math.isfinite(rows[2]["distill_loss"])  # round 1: nothing to digest


def test_the_comparison_arms_alone_and_fedavg_within_an_architecture(make_cfg):
    from fedfm.hetero import HeteroSimulation, prepare_transfer

    prepared = prepare_transfer(make_cfg(**{"federation.rounds": 1}))
    fedavg = HeteroSimulation(prepared, mode="fedavg")
    row = fedavg.run()[-1]
    numel = sum(g.ctx.spec.numel for g in fedavg.groups for _ in g.clients)
    assert row["bytes_up"] == row["bytes_down"] == 4 * numel  # each client's fp32 state, down and up
    g = fedavg.groups[0]
    mine = [g.ctx.local[c] for c in g.clients]
    assert len({len(m.train) for m in mine}) >= 1 and "fm_accuracy" not in row
    alone = HeteroSimulation(prepared, mode="alone")
    row = alone.run()[-1]
    assert row["bytes_up"] == row["bytes_down"] == 0
    assert all(alone.store.get(c) is not None for c in range(4))


def test_the_public_set_is_carved_before_partitioning_and_is_no_clients_data(make_cfg):
    from fedfm.hetero import prepare_transfer
    import numpy as np

    data = prepare_transfer(make_cfg()).data
    clients = np.concatenate([np.concatenate([c.train, c.test]) for c in data.clients])
    assert len(data.public) == 48
    assert not set(data.public) & set(clients) and not set(data.public) & set(data.test)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra,key", [
    ({"transfer.public_fraction": 0.0}, "transfer.public_fraction"),
    ({"transfer.groups": [{**GROUPS[0], "model": {"name_or_path": "./no/such/model"}}, GROUPS[1]]},
     "transfer.groups[0].model.name_or_path"),
    ({"transfer.groups": [{**GROUPS[0], "model": {"name_or_path": "nobody/not-cached-model"}}, GROUPS[1]]},
     "transfer.groups[0].model.name_or_path"),
    ({"transfer.groups": [GROUPS[0], {**GROUPS[1], "clients": 0}]}, "transfer.groups[1].clients"),
    ({"transfer.groups": [GROUPS[0], {**GROUPS[1], "clients": []}]}, "transfer.groups[1].clients"),
    ({"transfer.groups": [GROUPS[0], {**GROUPS[1], "clients": 1}]}, "transfer.groups"),
    ({"transfer.groups": [{**GROUPS[0], "clients": [0, 1]}, {**GROUPS[1], "clients": [1, 2, 3]}]},
     "transfer.groups[1].clients"),
    ({"task.name": "lm", "partition.method": "iid"}, "task.name"),
    ({"codec.name": "int8"}, "codec.name"),
    ({"codec.name": "topk", "codec.fraction": 0.1}, "codec.name"),
    ({"codec.downlink": "int4"}, "codec.downlink"),
    ({"secagg.enabled": True}, "secagg.enabled"),
    ({"privacy.mode": "client", "privacy.noise_multiplier": 1.0}, "privacy.mode"),
    ({"privacy.mode": "sample", "privacy.noise_multiplier": 1.0}, "privacy.mode"),
    ({"adapter.method": "prefix"}, "adapter.method"),
    ({"transfer.groups": [GROUPS[0], {**GROUPS[1], "adapter": {"method": "ia3"}}]},
     "transfer.groups[1].adapter.method"),
    ({"transfer.server_adapter": {"method": "full"}}, "transfer.server_adapter.method"),
    ({"runtime.name": "batched"}, "runtime.name"),
    ({"server.aggregator": "median"}, "server.aggregator"),
    ({"server.optimizer": "fedadam"}, "server.optimizer"),
    ({"federation.schedule": "fedbuff", "federation.buffer_size": 2}, "federation.schedule"),
    ({"adapter.personal": ["classifier"]}, "adapter.personal"),
    ({"federation.byte_budget": 10**6}, "federation.byte_budget"),
    ({"transfer.public_fraction": 0.5, "data.test_fraction": 0.5}, "transfer.public_fraction"),
])
def test_what_fedmd_cannot_do_is_refused_at_config_time_naming_the_key(make_cfg, monkeypatch, extra, key):
    import fedfm.models

    monkeypatch.setattr(fedfm.models, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError) as err:
        make_cfg(**extra)
    assert key in str(err.value)


def test_a_one_model_simulation_refuses_fedmd_naming_its_driver_before_any_model_loads(make_cfg, monkeypatch):
    import fedfm.models
    from fedfm.simulation import Simulation, prepare

    monkeypatch.setattr(fedfm.models, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match="fedfm.hetero.HeteroSimulation"):
        Simulation(prepare(make_cfg(**{"transfer.groups": []})))


def test_a_group_asking_for_more_clients_than_the_data_has_is_refused_before_any_model_loads(make_cfg, monkeypatch):
    import fedfm.models
    from fedfm.hetero import prepare_transfer

    monkeypatch.setattr(fedfm.models, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = make_cfg(**{"partition.method": "by_column", "data.client_column": "site",
                      "transfer.groups": [{**GROUPS[0], "clients": 3}, {**GROUPS[1], "clients": 3}]})
    with pytest.raises(ConfigError, match=r"transfer.groups\[1\].clients"):
        prepare_transfer(cfg)
    assert json.dumps(cfg.transfer.groups[0].clients) == "3"


def test_the_server_half_averages_the_clients_logits_drops_a_bad_one_and_can_send_the_consensus(run, make_cfg):
    from fedfm.client import ClientResult
    from fedfm.client.fedmd import FedMDServer

    sim, _, _ = run
    P, C = len(sim.data.public), sim.num_classes
    server = FedMDServer(None, None, 4, make_cfg(**{"transfer.send": "consensus"}))
    server.attach(sim.fm, C)
    a, b = torch.randn(P, C), torch.randn(P, C)
    results = [ClientResult(client_id=0, update=pack(a, "fp32"), num_examples=5),
               ClientResult(client_id=1, update=pack(b, "fp32"), num_examples=50),
               ClientResult(client_id=2, update=pack(a, "fp32")[:-4], num_examples=5)]
    accepted, m = server.complete(3, results)
    assert [r.client_id for r in accepted] == [0, 1] and m["consensus_clients"] == 2
    assert m["dropped"][0]["client"] == 2 and "public rows" in m["dropped"][0]["error"]
    assert torch.allclose(unpack(server.payload(4, 0), (P, C), "fp32"), (a + b) / 2)  # the plain mean, as FedMD's


# ---------------------------------------------------------------------------------------------- fedfm run

def test_fedfm_run_drives_fedmd_into_a_run_directory_and_refuses_to_resume_it(tmp_path):
    """`fedfm run` with client.algorithm fedmd runs the algorithm's own driver: the run directory holds the config,
    the partition and one metrics row a round with the logits' bytes; it keeps no checkpoint, so --resume is refused
    naming the driver, and the run directory is left as it was."""
    from typer.testing import CliRunner

    from fedfm.cli import app

    csv = write_csv(tmp_path / "tiny.csv", make_rows())
    ov = tiny_overrides(csv, tmp_path, **{**FEDMD, "eval.initial": True})
    res = CliRunner().invoke(app, ["run", "bbc-lora", *ov])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] == 0  # round 1: nothing to send back yet
    assert rows[2]["bytes_down"] == rows[2]["bytes_up"]  # the foundation model's logits, same shape as the clients'
    assert 0.0 <= rows[2]["fm_accuracy"] <= 1.0 and rows[2]["client_acc"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "partition.json").is_file()
    before = (run_dir / "metrics.jsonl").read_bytes()
    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert res.exit_code != 0 and "HeteroSimulation" in res.output and "--resume" in res.output, res.output
    assert (run_dir / "metrics.jsonl").read_bytes() == before
