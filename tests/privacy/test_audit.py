"""The membership-inference audit: the AUC by hand and against a pairwise count, and a model that memorised its
clients' data is caught while the report shows the number."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fedfm.privacy.audit import roc_auc
from fedfm.simulation import Simulation, prepare
from fedfm.tracking import RunDir


def test_auc_by_hand_and_against_the_pairwise_definition():
    assert roc_auc(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairwise = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert roc_auc(a, b) == pytest.approx(pairwise)


def test_a_memorising_model_is_caught_and_the_report_shows_the_auc(tiny_config, tmp_path):
    from fedfm.tracking.report import make_report

    import random

    from ..conftest import FILLER, TOPICS, write_csv  # noqa: TID252

    # labels carry no signal: whatever the model learns about its training examples is memorisation
    rng = random.Random(0)
    words = FILLER + [w for ws in TOPICS.values() for w in ws]
    rows = [{"text": " ".join(rng.choice(words) for _ in range(8)), "label": rng.choice(sorted(TOPICS)),
             "site": f"s{i % 4}"} for i in range(120)]
    cfg = tiny_config(**{"data.source": str(write_csv(tmp_path / "noise.csv", rows)), "eval.membership_audit": True,
                         "federation.rounds": 8, "federation.clients_per_round": 4, "client.epochs": 10,
                         "client.lr": 0.01, "adapter.method": "full", "eval.per_client": False})
    run_dir = RunDir(tmp_path / "run")
    run_dir.create(overwrite=False)
    run_dir.write_config(cfg.to_yaml())
    server = Simulation(prepare(cfg), run_dir)
    server.run()
    audit = json.loads((run_dir.path / "privacy_audit.json").read_text())
    assert audit["mia_member_loss"] < audit["mia_nonmember_loss"]
    assert audit["mia_auc"] > 0.6, audit
    make_report(run_dir.path)
    summary = (run_dir.path / "report" / "summary.md").read_text()
    assert "Membership inference" in summary and f"{audit['mia_auc']:.3f}" in summary
