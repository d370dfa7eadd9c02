"""Lifelong federations (fedfm.continual): stages, the accuracy-matrix metrics, the mitigations, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedfm.config import load_config
from fedfm.continual import ContinualSimulation, prepare_continual, stage_metrics
from fedfm.errors import ConfigError

from tests.conftest import tiny_overrides

TWO_STAGES = [{"name": "a", "classes": ["money", "music"], "rounds": 2},
              {"name": "b", "classes": ["sport", "tech"], "rounds": 2}]


@pytest.fixture
def continual_config(tiny_csv, tmp_path):
    def make(stages=TWO_STAGES, mitigations=(), **extra):
        ov = {"continual.stages": stages, "continual.mitigations": list(mitigations), "eval.every": 0,
              "eval.per_client": False, "partition.method": "iid", **extra}
        return load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path, **ov))

    return make


def recording(sim):
    """Record, for every local training, (stage, client, the label names of the rows it trains on)."""
    seen = []
    inner = sim.ctx.continual.prepare
    names = sim.data.examples.label_names

    def prepare(cid, own, hook):
        own, hook = inner(cid, own, hook)
        labels = own.encoded["labels"][torch.as_tensor(own.train)]
        seen.append((sim.stage, cid, {names[i] for i in labels.tolist()}))
        return own, hook

    sim.ctx.continual.prepare = prepare
    return seen


# ---------------------------------------------------------------- metrics, against hand-computed values
def test_metrics_of_an_accuracy_matrix():
    R = [[0.9, 0.1, 0.2],
         [0.6, 0.8, 0.3],
         [0.5, 0.7, 0.9]]
    m = stage_metrics(R, baseline=[0.3, 0.2, 0.1])
    assert m["average"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    # f_0 = max(0.9, 0.6) - 0.5 = 0.4; f_1 = 0.8 - 0.7 = 0.1
    assert m["forgetting"] == pytest.approx((0.4 + 0.1) / 2)
    # BWT = ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    assert m["bwt"] == pytest.approx(-0.25)
    # FWT = ((R[0,1] - b_1) + (R[1,2] - b_2)) / 2 = ((0.1 - 0.2) + (0.3 - 0.1)) / 2
    assert m["fwt"] == pytest.approx(0.05)
    first = stage_metrics(R[:1])
    assert first["average"] == pytest.approx(0.9) and first["forgetting"] is None and first["bwt"] is None
    mid = stage_metrics(R[:2])
    assert mid["average"] == pytest.approx(0.7) and mid["forgetting"] == pytest.approx(0.3)


def test_metrics_of_a_loss_matrix_are_signed_like_accuracy():
    L = [[1.0, 3.0],
         [2.5, 1.2]]
    m = stage_metrics(L, higher_is_better=False)
    assert m["average"] == pytest.approx((2.5 + 1.2) / 2)
    assert m["forgetting"] == pytest.approx(1.5)  # the loss rose by 1.5 since its best
    assert m["bwt"] == pytest.approx(-1.5)  # negative: the earlier stage got worse


def test_metrics_refuse_a_matrix_of_the_wrong_shape():
    with pytest.raises(ValueError, match="needs 2 rows of at least 2 columns"):
        stage_metrics([[0.5], [0.4]])


# ---------------------------------------------------------------- stages
def test_class_incremental_clients_train_only_on_the_stage_rows(continual_config):
    cfg = continual_config(**{"federation.clients_per_round": 4})
    sim = ContinualSimulation(prepare_continual(cfg))
    seen = recording(sim)
    rows = sim.run()
    assert [r["stage"] for r in rows] == [0, 0, 1, 1]
    assert {c for s, c, _ in seen} == {0, 1, 2, 3}
    for stage, _, labels in seen:
        assert labels and labels <= set(TWO_STAGES[stage]["classes"])  # never a later (or earlier) stage's rows
    assert set().union(*(lab for s, _, lab in seen if s == 1)) == {"sport", "tech"}
    assert len(sim.R) == 2 and all(len(r) == 2 for r in sim.R)


def test_joining_clients_are_absent_before_their_stage(continual_config):
    stages = [TWO_STAGES[0], {**TWO_STAGES[1], "join": [2, 3]}]
    cfg = continual_config(stages, **{"federation.clients_per_round": 4})
    sim = ContinualSimulation(prepare_continual(cfg))
    seen = recording(sim)
    sim.run()
    assert {c for s, c, _ in seen if s == 0} == {0, 1}
    assert {c for s, c, _ in seen if s == 1} == {0, 1, 2, 3}
    assert sim.plan.present == [[0, 1], [0, 1, 2, 3]]


def test_a_drifting_client_trains_on_its_new_distribution(continual_config):
    stages = [TWO_STAGES[0], {**TWO_STAGES[1], "drift": [{"clients": [1], "classes": ["money"]}]}]
    cfg = continual_config(stages, **{"federation.clients_per_round": 4})
    sim = ContinualSimulation(prepare_continual(cfg))
    seen = recording(sim)
    sim.run()
    assert {frozenset(lab) for s, c, lab in seen if s == 1 and c == 1} == {frozenset({"money"})}
    assert all(lab <= {"sport", "tech"} for s, c, lab in seen if s == 1 and c != 1)


def test_domain_incremental_stages_cut_rows_by_the_domain_column(continual_config):
    stages = [{"domains": ["site0", "site1"], "rounds": 1}, {"domains": ["site2"], "rounds": 1}]
    cfg = continual_config(stages, **{"continual.domain_column": "site"})
    plan = prepare_continual(cfg).plan
    import csv

    with open(cfg.data.source) as f:
        site = np.array([r["site"] for r in csv.DictReader(f)])
    for s, want in enumerate([{"site0", "site1"}, {"site2"}]):
        for idx in plan.train[s].values():
            assert set(site[idx]) <= want
        assert set(site[plan.held_out[s]]) == want


# ---------------------------------------------------------------- the run directory
def test_a_run_writes_the_stage_rows_and_the_accuracy_matrix_plot(continual_config, tmp_path):
    from typer.testing import CliRunner

    from fedfm.cli import app

    path = tmp_path / "c.yaml"
    path.write_text(continual_config().to_yaml())
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    stages = [json.loads(line) for line in (run / "continual.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == [0, 1] and len(stages[1]["R"]) == 2
    assert stages[1]["forgetting"] == pytest.approx(stage_metrics(stages[1]["R"])["forgetting"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage_name"] for m in metrics if m["round"] > 0] == ["a", "a", "b", "b"]
    png = run / "report" / "accuracy_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()  # `fedfm report` draws it again from continual.jsonl
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- mitigations
def test_the_replay_buffer_is_bounded_and_holds_only_the_clients_own_rows(continual_config):
    from fedfm.client.continual import Replay

    cfg = continual_config(mitigations=["replay"], **{"continual.replay.size": 5, "federation.clients_per_round": 4})
    sim = ContinualSimulation(prepare_continual(cfg))
    seen = recording(sim)
    sim.run()
    replay = sim.ctx.continual.get(Replay)
    enc = sim._encoded
    for c in sim.data.clients:
        buf = replay.buffer(c.id)
        assert len(buf["input_ids"]) == 5  # bounded, although each client had more rows of each stage
        own = {tuple(r) for r in enc["input_ids"][torch.as_tensor(c.train)].tolist()}
        assert {tuple(r) for r in buf["input_ids"].tolist()} <= own
        assert int(sim.store.get(c.id)[Replay.SEEN][0]) == sum(len(sim.plan.train[s][c.id]) for s in range(2))
    # at stage b the replayed rows of stage a are mixed into the local batches
    assert any(lab & {"money", "music"} for s, _, lab in seen if s == 1)


def test_reservoir_keeps_each_row_with_probability_m_over_n(continual_config):
    """Algorithm R: after n offered rows, each is in the buffer of m with probability m/n (over seeds)."""
    from fedfm.client.continual import Replay
    from fedfm.client.data import LocalData

    class Store(dict):
        def get(self, cid):
            return dict.get(self, cid)

        def put(self, cid, state):
            self[cid] = state

    class Ctx:
        cfg = continual_config(mitigations=["replay"], **{"continual.replay.size": 3})
        store = Store()

    counts = np.zeros(12)
    for seed in range(300):
        ctx = Ctx()
        ctx.store = Store()
        ctx.cfg = ctx.cfg.model_copy(update={"federation": ctx.cfg.federation.model_copy(update={"seed": seed})})
        r = Replay(ctx)
        for stage, rows in enumerate([np.arange(0, 6), np.arange(6, 12)]):
            own = LocalData({"x": torch.arange(12).view(12, 1)}, rows, np.zeros(0, dtype=np.int64))
            r.end_stage(0, own, stage)
        kept = r.buffer(0)["x"].view(-1).tolist()
        assert len(kept) == 3 and len(set(kept)) == 3
        counts[kept] += 1
    assert np.allclose(counts / 300, 3 / 12, atol=0.09)  # stage 0's rows as likely as stage 1's


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it(continual_config):
    from fedfm.client.continual import EWC

    cfg = continual_config(mitigations=["ewc"], **{"continual.ewc.lam": 3.0})
    sim = ContinualSimulation(prepare_continual(cfg))
    ewc = sim.ctx.continual.get(EWC)
    assert ewc.grad_hook(0) is None and ewc.penalty(0) == 0.0  # nothing to anchor to before a stage ends
    sim._load_global()
    ewc.end_stage(0, sim.local[0], 0)
    (F, theta), = ewc.anchors(0)
    assert F.shape == theta.shape == (sim.spec.numel,) and (F >= 0).all() and F.sum() > 0
    assert ewc.penalty(0) == 0.0
    moved = theta + 0.1 * torch.randn_like(theta)
    sim.spec.load_flat(moved)
    assert ewc.penalty(0) == pytest.approx(float(0.5 * 3.0 * (F * (moved - theta) ** 2).sum()), rel=1e-5)
    sim.spec.load_flat(theta + 2 * (moved - theta))
    assert ewc.penalty(0) == pytest.approx(4 * float(0.5 * 3.0 * (F * (moved - theta) ** 2).sum()), rel=1e-4)
    # its gradient λ F (θ − θ*) is what the hook adds
    params = list(sim.spec.params.values())
    for p in params:
        p.grad = torch.zeros_like(p)
    ewc.grad_hook(0)(params)
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(grad, 3.0 * F * 2 * (moved - theta), atol=1e-6)


def test_olora_freezes_the_stage_lora_and_penalises_overlap_with_it(continual_config):
    from fedfm.client.continual import OLoRA

    cfg = continual_config(mitigations=["olora"], **{"continual.olora.lam": 0.5})
    sim = ContinualSimulation(prepare_continual(cfg))
    olora = sim.ctx.continual.get(OLoRA)
    sim.run_round(1)
    sim.run_round(2)
    names = [n for n in sim.spec.names if ".lora_A." in n]
    A0 = {n: sim.spec.params[n].detach().clone() for n in names}
    sim.run_round(3)  # stage b begins: the LoRA of stage a is merged as a frozen delta and a new one starts
    assert [torch.equal(olora.frozen[n][0], A0[n]) for n in names] == [True] * len(names)
    base = {n: sim.model.get_submodule(n.split(".lora_A.")[0]).get_base_layer().weight.detach().clone()
            for n in names}
    sim.run_round(4)
    for n in names:  # the frozen delta stays as merged while the new LoRA trains
        assert torch.equal(sim.model.get_submodule(n.split(".lora_A.")[0]).get_base_layer().weight, base[n])
    # the orthogonality loss and its gradient, against autograd of λ Σ ‖A_s A_tᵀ‖²
    want = sum(float((A0[n] @ sim.spec.params[n].detach().T).pow(2).sum()) for n in names)
    assert olora.orthogonality() == pytest.approx(want, rel=1e-5) and want > 0
    params = list(sim.spec.params.values())
    for p in params:
        p.grad = torch.zeros_like(p)
    olora.grad_hook(0)(params)
    n = names[0]
    A_t = sim.spec.params[n].detach().clone().requires_grad_(True)
    (0.5 * (A0[n] @ A_t.T).pow(2).sum()).backward()
    assert torch.allclose(sim.spec.params[n].grad, A_t.grad, atol=1e-6)
    assert not sim.spec.params[names[0]].grad.equal(torch.zeros_like(A_t))



def test_an_olora_runs_adapter_holds_every_stages_lora(continual_config, tmp_path):
    """The written adapter is the whole final model: every stage's LoRA stacked (rank 2r for two stages), so a fresh
    base with it computes what the run's own model computes (the earlier LoRAs were merged in memory only)."""
    import json

    import fedfm
    from fedfm.trained import load_trained

    cfg = continual_config(mitigations=["olora"], **{"continual.olora.lam": 0.5})
    result = fedfm.run(cfg, report=False)
    conf = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"]) == (2 * cfg.adapter.r, 2 * cfg.adapter.alpha)
    sim = ContinualSimulation(prepare_continual(cfg))  # the same seeded run, in memory
    sim.run()
    sim._load_global()
    _, model, _ = load_trained(result.run_dir)
    own = sim.local[0]
    batch = next(iter(sim.task.batches(own.encoded, np.arange(len(own.encoded["labels"]))[:8], 8)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    sim.model.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, sim.model(**inputs).logits, atol=1e-5)

def test_olora_start_of_a_stage_keeps_the_model_function(continual_config):
    cfg = continual_config(mitigations=["olora"])
    sim = ContinualSimulation(prepare_continual(cfg))
    sim.run_round(1)
    sim.run_round(2)
    held = sim.held[0]
    batch = next(sim.task.batches(held.encoded, held.train, 8))
    sim._load_global()
    sim.model.eval()
    with torch.no_grad():
        before = sim.model(**batch).logits
    sim._end_stage(0)
    sim._begin_stage(1)
    sim.model.eval()
    with torch.no_grad():
        after = sim.model(**batch).logits
    assert torch.allclose(before, after, atol=1e-5)
    lora_b = [p for n, p in sim.spec.params.items() if ".lora_B." in n]
    assert lora_b and all(float(p.detach().abs().sum()) == 0.0 for p in lora_b)


# ---------------------------------------------------------------- bad input, named, before any model loads
def test_an_unknown_class_names_the_stage_key_and_the_value(continual_config, monkeypatch):
    import fedfm.models

    monkeypatch.setattr(fedfm.models, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    stages = [TWO_STAGES[0], {"classes": ["sport", "weather"], "rounds": 1}]
    with pytest.raises(ConfigError, match=r"continual\.stages\[1\]\.classes: 'weather' is not a class of the data"):
        prepare_continual(continual_config(stages))
    stages = [{"domains": ["site0"], "rounds": 1}, {"domains": ["site9"], "rounds": 1}]
    with pytest.raises(ConfigError, match=r"continual\.stages\[1\]\.domains: 'site9' is not a domain"):
        prepare_continual(continual_config(stages, **{"continual.domain_column": "site"}))
    with pytest.raises(ConfigError, match=r"continual\.domain_column: column 'region' not found"):
        prepare_continual(continual_config(stages, **{"continual.domain_column": "region"}))
    stages = [TWO_STAGES[0], {**TWO_STAGES[1], "join": [7]}]
    with pytest.raises(ConfigError, match=r"continual\.stages\[1\]\.join: client 7 does not exist"):
        prepare_continual(continual_config(stages))
    stages = [TWO_STAGES[0], {**TWO_STAGES[1], "join": [3]}]
    with pytest.raises(ConfigError, match=r"continual\.stages\[0\]: privacy\.mode client: 3 of the 4 clients"):
        prepare_continual(continual_config(stages, **{"privacy.mode": "client", "privacy.noise_multiplier": 1.0}))


@pytest.mark.parametrize("extra, message", [
    ({"continual.mitigations": ["reply"]},
     r"continual\.mitigations\[0\]: unknown continual mitigation 'reply'.*did you mean 'replay'"),
    ({"continual.stages": [{"classes": ["sport"], "rounds": 0}]}, r"continual\.stages\.0\.rounds"),
    ({"continual.stages": [{"classes": ["sport"], "rounds": 1}, {"rounds": 1}]},
     r"continual\.stages\[1\]: nothing arrives"),
    ({"continual.stages": [{"classes": [], "rounds": 1}]}, r"continual\.stages\.0\.classes"),
    ({"continual.mitigations": ["ewc", "olora"]}, r"ewc anchors the LoRA that olora restarts"),
    ({"runtime.name": "batched"}, r"runtime\.name 'batched' is not covered"),
    ({"continual.mitigations": ["olora"], "adapter.method": "ia3"}, r"adapter\.method 'ia3' is not covered"),
])
def test_bad_continual_config_is_refused_naming_the_key(continual_config, extra, message):
    with pytest.raises(ConfigError, match=message):
        continual_config(**extra)


def test_stages_set_the_rounds_of_the_run(continual_config):
    assert continual_config(**{"federation.rounds": 50}).federation.rounds == 4


@pytest.mark.parametrize("name, kind", [("bbc-continual", "classes"), ("chatterbot-continual", "domains")])
def test_the_built_in_continual_configs_plan_three_stages(name, kind):
    cfg = load_config(name)
    prepared = prepare_continual(cfg)
    plan, ex = prepared.plan, prepared.data.examples
    assert len(plan.names) == 3 and cfg.federation.rounds == sum(plan.rounds)
    if kind == "classes":
        labels = np.asarray(ex.label_names)[ex.labels]
        for s, st in enumerate(cfg.continual.stages):
            assert set(labels[np.concatenate(list(plan.train[s].values()))]) == set(st.classes)
            assert set(labels[plan.held_out[s]]) == set(st.classes)
    assert all(len(h) for h in plan.held_out)


def test_a_deployment_refuses_stages(continual_config):
    from fedfm.deploy import check_config

    with pytest.raises(ConfigError, match=r"deployment: continual\.stages: a lifelong federation runs in a simulation"):
        check_config(continual_config())


def test_mitigations_compose_with_the_algorithms_own_gradient_hook(continual_config):
    """FedProx's (or SCAFFOLD's) hook still runs, and each mitigation's term is added after it."""
    from fedfm.client.continual import EWC

    cfg = continual_config(mitigations=["replay", "ewc"], **{"client.algorithm": "fedprox"})
    sim = ContinualSimulation(prepare_continual(cfg))
    sim._load_global()
    sim.ctx.continual.end_stage(0, sim.local[0], 0)
    calls = []
    own, hook = sim.ctx.continual.prepare(0, sim.local[0], lambda params: calls.append(len(params)))
    assert len(own.train) == len(sim.local[0].train) + len(sim.ctx.continual.mitigations[0].buffer(0)["labels"])
    params = list(sim.spec.params.values())
    (F, theta), = sim.ctx.continual.get(EWC).anchors(0)
    sim.spec.load_flat(theta + 1.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    hook(params)
    assert calls == [len(params)]
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in params]), cfg.continual.ewc.lam * F, atol=1e-5)
