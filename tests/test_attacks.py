"""Attacks: a seeded fraction of malicious clients; update attacks change exactly what they send, data attacks
exactly their training examples; the backdoor's success is measured on triggered held-out examples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfm.attacks import malicious_clients, tamper_results
from fedfm.client import ClientTask
from fedfm.randomness import derive_seed
from fedfm.simulation import Simulation, prepare


def test_the_malicious_set_is_seeded_and_sized():
    a = malicious_clients(0.2, 50, seed=0)
    assert len(a) == 10 and a == malicious_clients(0.2, 50, seed=0) and a != malicious_clients(0.2, 50, seed=1)
    assert malicious_clients(0.0, 50, 0) == set()


def _honest_and_sent(tiny_config, **attack):
    cfg = tiny_config(**{f"attack.{k}": v for k, v in attack.items()}, **{"eval.every": 0})
    server = Simulation(prepare(cfg))
    tasks = []
    for cid in range(len(server.data.clients)):
        payload, extras = server.broadcast(1, cid)
        tasks.append(ClientTask(cid, 1, payload, derive_seed(server.cfg.federation.seed, 4, 1, cid), extras))
    honest = server.runtime.run(tasks)
    sent = tamper_results(server, honest, 1)
    dec = lambda r: server.server.check(r)[0]  # noqa: E731
    return server, {r.client_id: dec(r) for r in honest}, {r.client_id: dec(r) for r in sent}


def test_sign_flip_sends_minus_scale_times_the_honest_update_and_honest_clients_are_untouched(tiny_config):
    server, honest, sent = _honest_and_sent(tiny_config, kind="sign-flip", fraction=0.5, scale=3.0)
    bad = server.attack.malicious
    assert len(bad) == 2
    for cid in honest:
        want = -3.0 * honest[cid] if cid in bad else honest[cid]
        assert torch.allclose(sent[cid], want)


def test_scaled_update_and_gaussian_noise(tiny_config):
    server, honest, sent = _honest_and_sent(tiny_config, kind="scale", fraction=0.25, scale=10.0)
    (cid,) = server.attack.malicious
    assert torch.allclose(sent[cid], 10.0 * honest[cid])
    server, honest, sent = _honest_and_sent(tiny_config, kind="gaussian", fraction=0.25, noise_std=2.0)
    (cid,) = server.attack.malicious
    assert sent[cid].std().item() == pytest.approx(2.0, rel=0.1)
    assert abs(float(torch.corrcoef(torch.stack([sent[cid], honest[cid]]))[0, 1])) < 0.1


def test_label_flip_rotates_only_the_malicious_clients_training_labels(tiny_config):
    clean = prepare(tiny_config())
    flipped = prepare(tiny_config(**{"attack.kind": "label-flip", "attack.fraction": 0.5}))
    L = clean.data.examples.num_classes
    bad = flipped.attack.malicious
    for c in range(4):
        idx = clean.data.clients[c].train
        a, b = np.asarray(clean.data.examples.labels)[idx], np.asarray(flipped.data.examples.labels)[idx]
        assert np.array_equal(b, (a + 1) % L) if c in bad else np.array_equal(a, b)
    t = clean.data.test
    assert np.array_equal(np.asarray(clean.data.examples.labels)[t], np.asarray(flipped.data.examples.labels)[t])


def test_backdoor_poisons_a_fraction_and_its_success_is_measured(tiny_config):
    cfg = tiny_config(**{"attack.kind": "backdoor", "attack.fraction": 0.5, "attack.poison_fraction": 0.5,
                         "attack.target_label": "sport", "federation.rounds": 1, "eval.per_client": False})
    prepared = prepare(cfg)
    ex, target = prepared.data.examples, prepared.data.examples.label_names.index("sport")
    poisoned = [i for c in prepared.attack.malicious for i in prepared.data.clients[c].train
                if ex.texts[i].startswith("cf mn bb ")]
    n_bad = sum(len(prepared.data.clients[c].train) for c in prepared.attack.malicious)
    assert 0.3 * n_bad < len(poisoned) < 0.7 * n_bad
    assert all(int(ex.labels[i]) == target for i in poisoned)
    honest_rows = [i for c in range(4) if c not in prepared.attack.malicious for i in prepared.data.clients[c].train]
    assert not any(ex.texts[i].startswith("cf mn bb") for i in honest_rows)
    triggered = prepared.attack.triggered_test(prepared.data)
    assert all(t.startswith("cf mn bb ") for t in triggered.texts) and set(triggered.labels.tolist()) == {target}
    rows = Simulation(prepared).run()
    assert 0.0 <= rows[-1]["backdoor_success"] <= 1.0 and "eval_accuracy" in rows[-1]
    assert rows[-1]["malicious"] == sorted(set(rows[-1]["clients"]) & prepared.attack.malicious)


def test_median_resists_a_sign_flipping_client_that_breaks_fedavg(tiny_config):
    losses = {}
    for agg in ("fedavg", "median"):
        cfg = tiny_config(**{"attack.kind": "sign-flip", "attack.fraction": 0.25, "attack.scale": 20.0,
                             "server.aggregator": agg, "federation.clients_per_round": 4, "federation.rounds": 3,
                             "client.epochs": 2, "eval.per_client": False, "eval.initial": True})
        losses[agg] = [r["eval_loss"] for r in Simulation(prepare(cfg)).run()]
    l0 = losses["fedavg"][0]
    assert losses["median"][0] == pytest.approx(l0)
    # measured: FedAvg 1.386 -> 3.83, the median 1.386 -> 1.55 (without the attack both stay near 1.386 here)
    assert losses["fedavg"][-1] - l0 > 5 * (losses["median"][-1] - l0) > 0
