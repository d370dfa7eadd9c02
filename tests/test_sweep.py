"""fedfm sweep: validation splits carved from the clients' training data, settings scored on them, the best setting
on several seeds, mean and 95% intervals, diverged runs reported, and bad specs refused before anything trains."""
import json
import math

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_overrides
from fedfm.cli import app
from fedfm.errors import ConfigError
from fedfm.simulation import Simulation, prepare
from fedfm.tuning import SweepSpec, interval, load_spec, render, run_sweep, score_rows, summarize


def _spec_overrides(tiny_csv, tmp_path, **extra) -> dict:
    """The tiny config's overrides as a dict a spec carries (output.dir is the sweep's own)."""
    ov = {}
    for item in tiny_overrides(tiny_csv, tmp_path, **extra):
        k, v = item.split("=", 1)
        ov[k] = yaml.safe_load(v)
    ov.pop("output.dir")
    return ov


# ---------------------------------------------------------------------- the validation split
def test_validation_is_carved_from_each_clients_training_data(tiny_config):
    plain = prepare(tiny_config()).data
    data = prepare(tiny_config(**{"partition.validation_fraction": 0.25})).data
    labels = data.examples.labels
    for before, c in zip(plain.clients, data.clients):
        assert len(c.val) > 0
        assert set(c.train) | set(c.val) == set(before.train)  # the training data, split: nothing else
        assert not set(c.train) & set(c.val)
        assert list(c.test) == list(before.test)  # the local test split and the server's test split are untouched
        for k in np.unique(labels[before.train]):  # stratified: each class keeps round(25%) of its examples
            n = int((labels[before.train] == k).sum())
            assert int((labels[c.val] == k).sum()) == int(round(0.25 * n))
    assert list(data.test) == list(plain.test)
    assert "n_val" in data.describe()["clients"][0]
    again = prepare(tiny_config(**{"partition.validation_fraction": 0.25})).data
    assert all(list(a.val) == list(b.val) for a, b in zip(again.clients, data.clients))


def test_conversations_keep_each_prompt_on_one_side():
    from fedfm.data import prompt_groups, validation_split
    from fedfm.data.sources import Examples

    convs = [[{"role": "user", "content": f"q{i % 7}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(60)]
    ex = Examples(texts=None, labels=None, label_names=None, messages=convs)
    groups = prompt_groups(convs)
    train, val = validation_split(np.arange(60), 0.3, ex, groups, np.random.default_rng(0))
    assert len(val) and not set(groups[train]) & set(groups[val])


def test_the_rows_score_the_validation_splits_and_not_the_test_split(tiny_config, tmp_path):
    cfg = tiny_config(**{"partition.validation_fraction": 0.25, "eval.held_out": False, "eval.per_client": False,
                         "federation.rounds": 1})
    sim = Simulation(prepare(cfg))
    rows = sim.run()
    row = rows[-1]
    assert not any(k.startswith("eval_") for k in row)  # the test split is never scored
    sim._load_global()
    n, correct = 0, 0.0
    for c in sim.data.clients:  # by hand: each client's own validation split, pooled
        own = sim.local[c.id]
        acc = sim.task.evaluate(sim.model, own.encoded, own.val, 64)["accuracy"]
        correct += acc * len(own.val)
        n += len(own.val)
    assert row["val_examples"] == n == sum(len(c.val) for c in sim.data.clients)
    assert row["val_accuracy"] == pytest.approx(correct / n)
    assert math.isfinite(row["val_loss"])



def test_with_personal_parameters_each_client_scores_its_own_model(tiny_config):
    """FedSA-LoRA keeps lora_B on the clients: a client's validation score is its personalized model's."""
    cfg = tiny_config(**{"partition.validation_fraction": 0.25, "eval.held_out": False, "eval.per_client": False,
                         "federation.rounds": 2, "adapter.method": "fedsa-lora", "client.lr": 0.01})
    sim = Simulation(prepare(cfg))
    row = sim.run()[-1]
    n, correct, loss, loss_global = 0, 0.0, 0.0, 0.0
    for i, c in enumerate(sim.data.clients):  # by hand: each client's own model on its own validation split
        own = sim.local[c.id]
        sim._load_global()
        loss_global += sim.task.evaluate(sim.model, own.encoded, own.val, 64)["loss"] * len(own.val)
        sim.ctx.load_personal(i)
        scores = sim.task.evaluate(sim.model, own.encoded, own.val, 64)
        correct += scores["accuracy"] * len(own.val)
        loss += scores["loss"] * len(own.val)
        n += len(own.val)
    assert row["val_accuracy"] == pytest.approx(correct / n) and row["val_loss"] == pytest.approx(loss / n)
    assert abs(loss - loss_global) / n > 1e-4  # the personal lora_B changed the scores: the global model is not it

def test_where_validation_splits_are_not_scored_they_are_refused(tiny_config):
    from fedfm.deploy import check_config

    with pytest.raises(ConfigError, match=r"deployment: partition\.validation_fraction"):
        check_config(tiny_config(**{"partition.validation_fraction": 0.2}))
    stages = [{"name": "a", "classes": ["money", "music"], "rounds": 1},
              {"name": "b", "classes": ["sport", "tech"], "rounds": 1}]
    with pytest.raises(ConfigError, match=r"partition\.validation_fraction: the validation splits are scored in a "
                                          r"simulation of one shared model"):
        prepare(tiny_config(**{"partition.validation_fraction": 0.2, "continual.stages": stages,
                               "partition.method": "iid"}))


# ---------------------------------------------------------------------- scoring one run
SPEC = SweepSpec(name="t", target=0.5, arms={"a": {}})


def _rows(accs, key="eval_accuracy", loss=1.0):
    return [{"round": i + 1, key: a, "train_loss": loss, "bytes_up": 100, "bytes_down": 50} for i, a in enumerate(accs)]


def test_score_by_hand():
    rec = score_rows(_rows([0.4, 0.6, 0.5, 0.7]), SPEC, "final", classes=4)
    assert rec["status"] == "ok" and rec["final"] == 0.7
    assert rec["last3"] == pytest.approx((0.6 + 0.5 + 0.7) / 3) and rec["score"] == rec["last3"]
    assert rec["rounds_to_target"] == 2 and rec["bytes"] == 600
    assert score_rows(_rows([0.4, 0.45]), SPEC, "final", 4)["rounds_to_target"] is None
    tune = score_rows(_rows([0.4, 0.6], key="val_accuracy"), SPEC, "tune", 4)
    assert tune["metric"] == "val_accuracy" and tune["final"] == 0.6 and "rounds_to_target" not in tune


def test_diverged_runs_are_named_not_dropped():
    nan = score_rows(_rows([0.5, 0.6], loss=float("nan")), SPEC, "final", 4)
    assert nan["status"] == "diverged" and "non-finite" in nan["reason"]
    chance = score_rows(_rows([0.7, 0.29]), SPEC, "final", 4)  # 0.29 <= 1/4 + 0.05
    assert chance["status"] == "diverged" and "chance" in chance["reason"]
    assert score_rows(_rows([0.7, 0.31]), SPEC, "final", 4)["status"] == "ok"
    summary = summarize(SPEC, [dict(chance, arm="a", phase="final", seed=0, params={}),
                               dict(score_rows(_rows([0.7, 0.9]), SPEC, "final", 4), arm="a", phase="final", seed=1,
                                    params={})], {"a": {}})
    a = summary["arms"][0]
    assert a["diverged"] == 1 and a["final"][0] == pytest.approx((0.29 + 0.9) / 2)  # it counts in the mean


def test_interval_is_students_t():
    mean, half = interval([0.8, 0.85, 0.9])
    assert mean == pytest.approx(0.85)
    assert half == pytest.approx(4.302652729 * 0.05 / math.sqrt(3), rel=1e-6)  # t(0.975, 2 df) × s / √n
    assert interval([0.8]) == (0.8, None) and interval([]) == (None, None)


def test_lower_is_better_for_a_loss():
    spec = SweepSpec(name="t", metric="loss", arms={"x": {}, "y": {}})
    assert not spec.better_high
    recs = [dict(score_rows(_rows([v], key="eval_loss"), spec, "final", None), arm=arm, phase="final", seed=s,
                 params={}) for arm, vals in (("x", [2.0, 2.1]), ("y", [1.0, 1.2])) for s, v in enumerate(vals)]
    summary = summarize(spec, recs, {"x": {}, "y": {}})
    assert [a["arm"] for a in summary["arms"]] == ["y", "x"]  # ranked by the lower mean loss
    assert "| 1 | y |" in render(summary, spec)


def test_a_difference_hidden_by_the_seeds_is_resolved_seed_by_seed():
    """Seeds that move every arm alike widen each arm's interval; the paired difference removes what they share."""
    spec = SweepSpec(name="t", arms={"x": {}, "y": {}})
    vals = {"x": [0.5, 0.7, 0.9], "y": [0.52, 0.725, 0.93]}  # y is better by 0.02, 0.025, 0.03 on every seed
    recs = [dict(score_rows(_rows([v]), spec, "final", None), arm=arm, phase="final", seed=s, params={})
            for arm, vs in vals.items() for s, v in enumerate(vs)]
    summary = summarize(spec, recs, {"x": {}, "y": {}})
    y, x = summary["arms"]
    assert y["best"] and x["overlaps_best"] is True  # unpaired: inside the best's interval
    mean, half = x["paired_vs_best"]
    assert mean == pytest.approx(-0.025)
    assert half == pytest.approx(4.302652729 * 0.005 / math.sqrt(3), rel=1e-6) and half < 0.025
    row = next(line for line in render(summary, spec).splitlines() if line.startswith("| 2 | x |"))
    assert row.endswith("| yes | -0.025 ± 0.012 (resolved) |")


def test_a_band_is_drawn_within_the_values_the_metric_can_take():
    """Three seeds far apart give a t-interval wider than [0, 1]; an accuracy band stops at 0 and 1, a loss band at 0
    only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedfm.tuning import draw_curves, metric_bounds

    assert metric_bounds("accuracy") == (0.0, 1.0) and metric_bounds("loss") == (0.0, None)
    assert metric_bounds("perplexity") == (1.0, None) and metric_bounds("tokens") == (None, None)
    for metric, vals, lo, hi in (("accuracy", [0.2, 0.9, 0.95], 0.0, 1.0), ("loss", [0.1, 3.0, 0.2], 0.0, None)):
        spec = SweepSpec(name="t", metric=metric, arms={"x": {}, "ref": {}})
        recs = [dict(score_rows(_rows([v, v], key=f"eval_{metric}"), spec, "final", None), arm=arm, phase="final",
                     seed=s, params={}) for arm in ("x", "ref") for s, v in enumerate(vals)]
        summary = summarize(spec, recs, {"x": {}, "ref": {}})
        fig, ax = plt.subplots()
        assert draw_curves(summary, spec, ax, arms=["x"], reference="ref")
        band = np.concatenate([c.get_paths()[0].vertices[:, 1] for c in ax.collections])
        assert band.min() == pytest.approx(lo)
        if hi is None:
            assert band.max() > np.mean(vals) + 1  # unbounded above: the whole half-width
        else:
            assert band.max() == pytest.approx(hi)
        assert sorted(line.get_label() for line in ax.get_lines()) == ["ref (mean)", "x"]  # the reference: a mean
        plt.close(fig)



def test_a_personalized_arm_is_scored_on_its_clients_own_models_and_ranked_apart():
    from fedfm.tuning import score_key

    spec = SweepSpec(name="p", arms={"g1": {}, "g2": {}, "own": {"personalized": True}})
    assert score_key(spec, "tune", True) == "val_accuracy"
    assert score_key(spec, "final", True) == "client_acc_personal_mean"
    assert score_key(spec, "final", False) == "eval_accuracy"
    rows = [{"round": 1, "eval_accuracy": 0.3, "client_acc_personal_mean": 0.95, "train_loss": 1.0}]
    assert score_rows(rows, spec, "final", 4, personalized=True)["final"] == 0.95
    recs = [dict(score_rows(_rows([v]) if arm != "own" else [{"round": 1, "client_acc_personal_mean": v,
                                                               "train_loss": 1.0}], spec, "final", 4,
                            personalized=arm == "own"), arm=arm, phase="final", seed=s, params={})
            for arm, vals in (("g1", [0.8, 0.82]), ("g2", [0.7, 0.71]), ("own", [0.97, 0.98])) for s, v in enumerate(vals)]
    summary = summarize(spec, recs, {"g1": {}, "g2": {}, "own": {}})
    assert [a["arm"] for a in summary["arms"]] == ["g1", "g2", "own"]  # 0.975 does not outrank the global models
    assert [a["best"] for a in summary["arms"]] == [True, False, True]
    md = render(summary, spec)
    assert "| 1 | g1 |" in md and "| 2 | g2 |" in md and "| P1 | own |" in md and "client_acc_personal_mean" in md

# ---------------------------------------------------------------------- bad specs: refused before anything trains
@pytest.mark.parametrize("arms, extra, says", [
    ({"a": {"grid": {"client.lrr": [0.1]}}}, {}, "client.lrr"),
    ({"a": {"overrides": {"server.optimiser": "fedadam"}}}, {}, "server.optimiser"),
    ({"a": {"grid": {"client.lr": []}}}, {}, "arms.a.grid.client.lr: an empty list"),
    ({"a": {"grid": []}}, {}, "arms.a.grid: an empty grid in the list"),
    ({"a": {"grid": [{"client.lr": [0.1]}, {}]}}, {}, "arms.a.grid: an empty grid in the list"),
    ({"a": {"grid": [{"client.lr": [0.1]}, {"client.lrr": [1]}]}}, {}, "client.lrr"),
    ({"a": {"grid": [{"client.lr": [0.1]}, {"client.lr": [0.2]}]}}, {"search": "random", "budget": 2},
     "arms.a.grid: a list of grids is joined in search: grid"),
    ({}, {}, "no arms"),
    ({"a": {"grid": {"client.lr": [0.1]}}}, {"validation_fraction": 0}, "validation_fraction"),
    ({"a": {"grid": {"client.lr": [0.1]}}}, {"search": "random"}, "budget"),
    ({"a": {"grid": {"client.lr": [0.1, 0.2, 0.3]}}}, {"budget": 2}, "budget 2"),
    ({"a": {"grid": {"client.lr": {"log_uniform": [0.001, 0.1]}}}}, {}, "search: random"),
    ({"a": {}}, {"bogus": 1}, "bogus"),
    ({"a": {}}, {"overrides": {"client.lrr": 1}}, "overrides: invalid config: unknown key 'client.lrr'"),
    ({"a": {}}, {"base": "no-such-config"}, "base: "),
    ({"a": {"grid": {"federation.seed": [1, 2]}}}, {}, "arms.a.grid.federation.seed: the sweep sets it"),
    ({"a": {"overrides": {"eval.held_out": True}}}, {}, "arms.a.overrides.eval.held_out: the sweep sets it"),
    ({"a": {"personalized": True}}, {}, "arms.a.personalized: its adapter .* keeps no parameters on the clients"),
])
def test_bad_specs_name_the_key(tiny_csv, tmp_path, arms, extra, says):
    extra = dict(extra)
    spec = {"name": "bad", "overrides": {**_spec_overrides(tiny_csv, tmp_path), **extra.pop("overrides", {})},
            "arms": arms, **extra}
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        run_sweep(spec, out=tmp_path / "sw")
    assert not (tmp_path / "sw").exists()  # nothing written, nothing trained


def test_a_validation_split_too_small_is_refused(tiny_csv, tmp_path):
    spec = {"name": "small", "overrides": _spec_overrides(tiny_csv, tmp_path), "validation_fraction": 0.01,
            "arms": {"a": {"grid": {"client.lr": [0.01]}}}}
    with pytest.raises(ConfigError, match=r"validation_fraction: 0.01 .* 0 example\(s\) .* fewer than the 4 classes"):
        run_sweep(spec, out=tmp_path / "sw")


def test_the_cli_refuses_a_bad_spec_with_exit_2(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\narms: {a: {grid: {client.lrr: [1]}}}\n")
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "s.yaml")])
    assert r.exit_code == 2 and "client.lrr" in r.output
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "no such file" in r.output


def test_an_arm_without_a_grid_runs_as_given_and_a_tuned_one_waits_for_its_runs(tmp_path):
    from fedfm.tuning import Sweep

    spec, base = load_spec({"name": "g", "arms": {"given": {"overrides": {"client.lr": 0.01}},
                                                   "tuned": {"grid": {"client.lr": [0.01, 0.02]}}}})
    sweep = Sweep(spec, base, tmp_path)
    assert [t.arm for t in sweep.tuning_trials()] == ["tuned", "tuned"]
    assert sweep.chosen() == {"given": {}, "tuned": None} and sweep.pending() == {"given", "tuned"}
    given = sweep.final_trials(sweep.chosen())
    assert [(t.arm, t.seed) for t in given] == [("given", 0), ("given", 1), ("given", 2)]
    assert given[0].overrides["client.lr"] == 0.01 and given[0].overrides["eval.held_out"] is True
    ok = {"status": "ok", "phase": "tune", "arm": "tuned"}
    sweep.records = [dict(ok, trial=t.id, score=s) for t, s in zip(sweep.tuning_trials(), (0.7, 0.8))]
    assert sweep.chosen()["tuned"] == {"client.lr": 0.02}
    sweep.records[1]["status"] = "diverged"  # never chosen, whatever its score
    assert sweep.chosen()["tuned"] == {"client.lr": 0.01}
    sweep.records[1]["status"] = "ok"  # a tie (the same accuracies averaged in another order) goes to the first
    sweep.records[0]["score"], sweep.records[1]["score"] = 0.9408983451536642, 0.9408983451536644
    assert sweep.chosen()["tuned"] == {"client.lr": 0.01}
    from fedfm.tuning import grid_edges

    arm = spec.arms["tuned"].model_copy(update={"grid": {"client.lr": [0.01, 0.02, 0.03], "client.optimizer":
                                                         ["sgd", "adamw"]}})
    assert grid_edges(arm, {"client.lr": 0.01, "client.optimizer": "sgd"}) == ["client.lr"]  # a choice, no edge
    assert grid_edges(arm, {"client.lr": 0.02, "client.optimizer": "sgd"}) == [] and grid_edges(arm, None) == []


def test_a_grid_widened_along_one_key_adds_only_its_new_points_and_keeps_the_recorded_ones(tmp_path):
    from fedfm.tuning import Sweep, grid_edges

    first = {"server.lr": [0.125, 0.25, 0.5], "server.momentum": [0.5, 0.9]}
    spec, base = load_spec({"name": "w", "arms": {"m": {"grid": first}}})
    before = Sweep(spec, base, tmp_path)
    assert grid_edges(spec.arms["m"], {"server.lr": 0.25, "server.momentum": 0.9}) == ["server.momentum"]
    widened = [first, {"server.lr": [0.0625, 0.125, 0.25], "server.momentum": [0.9, 0.95]}]
    spec, base = load_spec({"name": "w", "arms": {"m": {"grid": widened}}})
    after = Sweep(spec, base, tmp_path)
    old_ids = [t.id for t in before.tuning_trials()]
    new = [t for t in after.tuning_trials() if t.id not in old_ids]
    assert [t.id for t in after.tuning_trials()][:6] == old_ids  # the recorded runs are not run again
    assert [t.params for t in new] == [{"server.lr": 0.0625, "server.momentum": 0.9},  # shared points run once
                                       {"server.lr": 0.0625, "server.momentum": 0.95},
                                       {"server.lr": 0.125, "server.momentum": 0.95},
                                       {"server.lr": 0.25, "server.momentum": 0.95}]
    arm = spec.arms["m"]
    # the edge is read along each key through the chosen setting: beta 0.9 is now inside (0.5 .. 0.95) ...
    assert grid_edges(arm, {"server.lr": 0.25, "server.momentum": 0.9}) == []
    # ... but at lr 0.5 the line along beta is the first grid's (0.5, 0.9), and 0.95 is the top wherever it is
    assert grid_edges(arm, {"server.lr": 0.5, "server.momentum": 0.9}) == ["server.lr", "server.momentum"]
    assert grid_edges(arm, {"server.lr": 0.125, "server.momentum": 0.95}) == ["server.momentum"]
    assert grid_edges(arm, {"server.lr": 0.0625, "server.momentum": 0.95}) == ["server.lr", "server.momentum"]


def test_an_arms_seeds_start_as_soon_as_its_own_tuning_is_recorded(tmp_path):
    from fedfm.tuning import Sweep

    spec, base = load_spec({"name": "p", "seeds": [0, 1],
                            "arms": {"slow": {"grid": {"client.lr": [0.01, 0.02]}},
                                     "quick": {"grid": {"client.lr": [0.05]}},
                                     "given": {"overrides": {"client.lr": 0.01}}}})
    sweep = Sweep(spec, base, tmp_path)
    slow1, slow2, quick = sweep.tuning_trials()
    started: set[str] = set()

    def start(running=()):
        t = sweep.next_trial(started, set(running))
        if t is not None:
            started.add(t.id)
        return t and (t.arm, t.phase, t.seed)

    def record(t, score, status="ok"):
        sweep.records.append({"trial": t.id, "arm": t.arm, "phase": t.phase, "status": status, "score": score})

    assert [start(), start(), start()] == [("slow", "tune", 0), ("slow", "tune", 0), ("quick", "tune", 0)]
    # every tuning run started: an arm run as given goes on while the others tune
    assert start({slow1.id, slow2.id, quick.id}) == ("given", "final", 0)
    record(quick, 0.9)  # quick's tuning is over: its seeds go before the slow arm's tuning ends
    assert [start({slow1.id, slow2.id}) for _ in range(3)] == [("quick", "final", 0), ("quick", "final", 1),
                                                                ("given", "final", 1)]  # in the spec's order
    assert start({slow1.id, slow2.id}) is None  # slow's seeds wait for its choice
    record(slow1, 0.5)
    assert start({slow2.id}) is None
    record(slow2, None, status="failed")  # a run that failed is tried once a sweep: slow chooses without it
    assert [start(), start(), start()] == [("slow", "final", 0), ("slow", "final", 1), None]
    assert sweep.trial("slow", "final", 0, {"client.lr": 0.01}).id in started


def test_random_search_draws_budget_settings_in_range(tmp_path):
    from fedfm.tuning import Sweep

    spec, base = load_spec({"name": "r", "search": "random", "budget": 5,
                            "arms": {"a": {"grid": {"client.lr": {"log_uniform": [1e-4, 1e-2]},
                                                    "client.optimizer": ["sgd", "adamw"]}}}})
    settings = Sweep(spec, base, tmp_path).settings("a")
    assert len(settings) == 5 and len({s["client.lr"] for s in settings}) == 5
    assert all(1e-4 <= s["client.lr"] <= 1e-2 and s["client.optimizer"] in ("sgd", "adamw") for s in settings)
    assert settings == Sweep(spec, base, tmp_path).settings("a")  # seeded by tune_seed and the arm


# ---------------------------------------------------------------------- a whole sweep
def test_a_tiny_sweep_end_to_end(tiny_csv, tmp_path):
    """One arm tuned over two client learning rates on validation data, then the chosen one on two seeds; run
    again, nothing is rerun."""
    fixed = {"federation.rounds": 3, "federation.clients_per_round": 4, "eval.per_client": False,
             "adapter.method": "full", "client.epochs": 3}
    spec = {"name": "tiny", "overrides": _spec_overrides(tiny_csv, tmp_path, **fixed),
            "validation_fraction": 0.25, "target": 0.5, "seeds": [0, 1],
            "arms": {"FedAvg (r/8)": {"grid": {"client.lr": [1e-5, 0.003]}}}}  # 1e-5 stays at chance in 3 rounds
    out = tmp_path / "sw"
    lines: list[str] = []
    result = run_sweep(spec, out=out, parallel=2, threads=1, log=lines.append)
    recs = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(recs) == 2 + 2  # two tuning runs, then two seeds
    for r in recs:
        rows = [json.loads(line) for line in (out / r["run"] / "metrics.jsonl").read_text().splitlines()]
        assert r["rc"] == 0 and len(rows) == 3
        if r["phase"] == "tune":  # scored on validation data; the test split never read
            assert r["metric"] == "val_accuracy" and not any(k.startswith("eval_") for row in rows for k in row)
            assert r["score"] == pytest.approx(np.mean([row["val_accuracy"] for row in rows]))
        else:
            assert r["metric"] == "eval_accuracy" and r["final"] == rows[-1]["eval_accuracy"]
    tuned = {r["params"]["client.lr"]: r for r in recs if r["phase"] == "tune"}
    assert tuned[1e-5]["status"] == "diverged" and "chance" in tuned[1e-5]["reason"]  # reported, never chosen
    assert tuned[0.003]["status"] == "ok" and tuned[0.003]["score"] > 0.5
    assert result.chosen == {"FedAvg (r/8)": {"client.lr": 0.003}}  # any name: its files are named apart
    summary = json.loads((out / "summary.json").read_text())
    fedavg = next(a for a in summary["arms"] if a["arm"] == "FedAvg (r/8)")
    finals = [r["final"] for r in recs if r["arm"] == "FedAvg (r/8)" and r["phase"] == "final"]
    assert fedavg["seeds"] == 2 and fedavg["final"][0] == pytest.approx(np.mean(finals))
    assert fedavg["final"][1] == pytest.approx(12.7062047 * np.std(finals, ddof=1) / math.sqrt(2))  # t(0.975, 1 df)
    assert (out / "curves.png").stat().st_size > 1000
    md = (out / "summary.md").read_text()
    assert "rounds to 0.5" in md and "| 1 | FedAvg (r/8) | client.lr=0.003 (grid's edge) |" in md
    assert "client.lr=1e-05: diverged" in md
    again: list[str] = []
    run_sweep(spec, out=out, parallel=2, threads=1, log=again.append)
    assert again == ["4 of 4 already recorded; 0 to run"]
    assert len((out / "trials.jsonl").read_text().splitlines()) == len(recs)



def test_a_run_past_timeout_s_is_stopped_and_recorded_failed(tiny_csv, tmp_path):
    """A hung run must not hang the sweep: past the spec's timeout_s it is killed and recorded, and a rerun retries."""
    spec = {"name": "late", "overrides": _spec_overrides(tiny_csv, tmp_path), "seeds": [0], "timeout_s": 1,
            "arms": {"a": {}}}  # importing torch alone takes longer than 1 s
    out = tmp_path / "sw"
    run_sweep(spec, out=out, parallel=1, threads=1, log=lambda m: None)
    [rec] = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert rec["status"] == "failed" and rec["reason"] == "timed out: still running after timeout_s 1 s"
    assert rec["rc"] != 0 and 1 <= rec["wall_s"] < 30
    lines: list[str] = []
    run_sweep(spec, out=out, parallel=1, threads=1, log=lines.append)
    assert "0 of 1 already recorded; 1 to run" in lines

def test_the_cli_checks_a_spec_without_training(tiny_csv, tmp_path):
    spec = {"name": "ok", "overrides": _spec_overrides(tiny_csv, tmp_path), "validation_fraction": 0.25,
            "arms": {"FedAvg": {"grid": {"client.lr": [0.01, 0.03]}}, "FedProx": {"overrides": {
                "client.algorithm": "fedprox"}}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "s.yaml"), "--check", "--out", str(tmp_path / "sw")])
    assert r.exit_code == 0, r.output
    assert "every setting of every arm is a valid config and the validation splits" in r.output
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("spec", ["benchmarks/sweeps/algorithms-dir0.1.yaml",
                                  "benchmarks/sweeps/algorithms-dir1.0.yaml",
                                  "benchmarks/boards/chatterbot-cpu.yaml", "benchmarks/boards/chatterbot-gpu.yaml"])
def test_the_shipped_specs_check(spec):
    """The specs behind docs/algorithms.md and the instruction-tuning board: every setting a valid config."""
    from pathlib import Path

    assert run_sweep(Path(__file__).resolve().parents[1] / spec, check_only=True) is None
