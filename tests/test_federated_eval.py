"""Federated evaluation: each sampled client scores the global model on its own test split and sends the metrics;
the server logs the example-weighted mean and the worst 10%."""
import json

import pytest

from fedfm.client import ClientResult
from fedfm.server import federated_evaluation
from fedfm.simulation import Simulation, prepare
from fedfm.tracking import RunDir


def _scored(cid, acc, loss, n):
    return ClientResult(client_id=cid, update=b"x", num_examples=10,
                        metrics={"train_loss": 1.0, "fed_accuracy": acc, "fed_loss": loss, "fed_examples": n})


def test_weighted_mean_and_worst_decile_by_hand():
    results = [_scored(0, 0.9, 0.2, 10), _scored(1, 0.5, 1.0, 30), _scored(2, 0.7, 0.6, 20),
               ClientResult(client_id=3, error="dropped out"),
               ClientResult(client_id=4, update=b"x", num_examples=5, metrics={"train_loss": 2.0})]  # did not score
    out = federated_evaluation(results)
    assert out["fed_clients"] == 3 and out["fed_examples"] == 60
    assert out["fed_accuracy"] == pytest.approx((0.9 * 10 + 0.5 * 30 + 0.7 * 20) / 60)
    assert out["fed_loss"] == pytest.approx((0.2 * 10 + 1.0 * 30 + 0.6 * 20) / 60)
    assert out["fed_accuracy_worst10"] == pytest.approx(0.5)  # ceil(10% of 3) = 1 client: the lowest accuracy
    assert out["fed_loss_worst10"] == pytest.approx(1.0)  # and the highest loss
    assert federated_evaluation([ClientResult(client_id=0, error="x")]) == {}


def test_a_run_without_a_server_test_set_still_reports_accuracy(tiny_config, tmp_path):
    cfg = tiny_config(**{"data.test_fraction": 0, "eval.federated": True, "eval.per_client": False,
                         "federation.rounds": 3, "federation.clients_per_round": 3, "eval.every": 1})
    run_dir = RunDir(tmp_path / "run")
    run_dir.create(overwrite=False)
    run_dir.write_config(cfg.to_yaml())
    sim = Simulation(prepare(cfg), run_dir)
    assert len(sim.data.test) == 0 and sim.server.model.held_out is None
    rows = sim.run()
    for row in rows:
        assert "eval_accuracy" not in row
        assert row["fed_clients"] == 3
        assert 0.0 <= row["fed_accuracy"] <= 1.0 and row["fed_accuracy_worst10"] <= row["fed_accuracy"]
        # the clients scored on their own test splits: the examples counted are theirs
        assert row["fed_examples"] == sum(len(sim.local[c].test) for c in row["clients"])
    logged = [json.loads(x) for x in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["fed_accuracy"] for r in logged] == [r["fed_accuracy"] for r in rows]
    assert (run_dir.adapter / "adapter_config.json").exists()  # the final adapter is still written


def test_the_clients_score_the_model_they_received_before_training(tiny_config):
    """Client k's fed_accuracy is the global model's accuracy on k's own test split (as the per-client diagnostic
    computes it for every client), not its model after local training."""
    cfg = tiny_config(**{"eval.federated": True, "eval.per_client": True, "federation.rounds": 1,
                         "federation.clients_per_round": 4, "eval.every": 1, "client.epochs": 3})
    sim = Simulation(prepare(cfg))
    start = sim.global_flat.clone()
    tasks_seen = []
    real = sim.runtime.client_fn

    def spy(task):
        tasks_seen.append(task.evaluate)
        res = real(task)
        spy.results.append(res)
        return res

    spy.results = []
    sim.runtime.client_fn = spy
    sim.global_flat = start
    per_client_before = sim.evaluate_clients(0)["client_acc"]  # each client's own test split, the global model
    row = sim.run_round(1)
    assert tasks_seen == [True] * 4
    for res in spy.results:
        assert res.metrics["fed_accuracy"] == pytest.approx(per_client_before[str(res.client_id)])
    assert row["fed_clients"] == 4


def test_batched_clients_report_the_same_scores(tiny_config):
    over = {"eval.federated": True, "eval.per_client": False, "federation.rounds": 1,
            "federation.clients_per_round": 4, "client.optimizer": "sgd"}
    seq = Simulation(prepare(tiny_config(**over))).run()[-1]
    bat = Simulation(prepare(tiny_config(**{**over, "runtime.name": "batched"}))).run()[-1]
    assert bat["fed_accuracy"] == pytest.approx(seq["fed_accuracy"], abs=1e-6)
    assert bat["fed_loss"] == pytest.approx(seq["fed_loss"], rel=1e-5)
