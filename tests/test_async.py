"""The simulated clock, client sampling modes, stragglers and drop-outs, and FedBuff worked by hand."""
import math

import numpy as np
import pytest
import torch

from fedfm.client import ClientResult
from fedfm.clock import SimClock
from fedfm.config import ClockConfig
from fedfm.sampling import make_sampler
from fedfm.simulation import Simulation, prepare


def test_clock_speeds_availability_and_dropouts_are_seeded():
    cfg = ClockConfig(speed_distribution="lognormal", speed_sigma=0.5, availability=0.5, period_s=10.0, dropout=0.2)
    a, b = SimClock(cfg, 50, seed=1), SimClock(cfg, 50, seed=1)
    assert np.array_equal(a.speed, b.speed) and a.speed.std() > 0.1
    assert a.duration(3, 4) == pytest.approx(4 * a.speed[3])
    online = [a.online(c, 5.0) for c in range(50)]
    assert online == [b.online(c, 9.9) for c in range(50)]  # same period
    assert 10 < sum(online) < 40
    assert [a.online(c, 15.0) for c in range(50)] != online  # next period is a new draw
    drops = [a.drops_out(c, j) for c in range(50) for j in range(4)]
    assert 0.1 < np.mean(drops) < 0.3
    assert a.next_period(12.0) == 20.0
    fixed = SimClock(ClockConfig(speeds=[1.0, 3.0]), 2, seed=0)
    assert fixed.duration(1, 2) == 6.0


def test_size_sampling_prefers_big_clients_and_available_sampling_only_online():
    rng = np.random.default_rng(0)
    sizes = np.array([1, 1, 1, 97])
    picks = [int(make_sampler("size")(rng, 1, np.arange(4), sizes)[0]) for _ in range(400)]
    assert picks.count(3) > 340
    uni = [int(make_sampler("uniform")(rng, 1, np.arange(4), sizes)[0]) for _ in range(400)]
    assert 60 < uni.count(3) < 140
    two = make_sampler("size")(rng, 2, np.arange(4), sizes)
    assert len(set(two.tolist())) == 2  # without replacement


def test_available_sampling_draws_only_online_clients(tiny_config):
    cfg = tiny_config(**{"federation.sampling": "available", "clock.availability": 0.5, "clock.period_s": 3.0,
                         "client.steps": 1, "client.epochs": None, "federation.rounds": 4})
    server = Simulation(prepare(cfg))
    rows = server.run()
    for r in rows:
        assert not any("offline" in d["error"] for d in r["dropped"])
    # uniform sampling under the same availability draws offline clients, which then do not answer
    cfg_u = tiny_config(**{"clock.availability": 0.3, "clock.period_s": 3.0, "client.steps": 1, "client.epochs": None,
                           "federation.rounds": 4, "federation.clients_per_round": 3})
    rows_u = Simulation(prepare(cfg_u)).run()
    assert any("offline" in d["error"] for r in rows_u for d in r["dropped"])


def test_sync_deadline_drops_stragglers_and_round_time_is_the_deadline(tiny_config):
    cfg = tiny_config(**{"clock.speeds": [1.0, 1.0, 10.0, 10.0], "clock.deadline_s": 5.0, "client.steps": 2,
                         "client.epochs": None, "federation.clients_per_round": 4, "federation.rounds": 1})
    server = Simulation(prepare(cfg))
    row = server.run()[-1]
    assert sorted(d["id"] for d in row["dropped"]) == [2, 3]
    assert all("straggler" in d["error"] for d in row["dropped"])
    assert row["sim_time_s"] == pytest.approx(5.0)  # the round waited until the deadline
    no_deadline = Simulation(prepare(tiny_config(**{"clock.speeds": [1.0, 1.0, 10.0, 10.0], "client.steps": 2,
                                                "client.epochs": None, "federation.clients_per_round": 4,
                                                "federation.rounds": 1})))
    assert no_deadline.run()[-1]["sim_time_s"] == pytest.approx(20.0)  # the slowest client, 2 steps × 10 s


def test_dropouts_are_recorded_and_the_round_goes_on(tiny_config):
    cfg = tiny_config(**{"clock.dropout": 0.5, "federation.clients_per_round": 4, "federation.rounds": 3})
    rows = Simulation(prepare(cfg)).run()
    reasons = [d["error"] for r in rows for d in r["dropped"]]
    assert reasons and all("dropped out" in e for e in reasons)


def _constant_updates(server, values):
    """Replace local training by clients whose update is the constant values[client] (to check FedBuff's math)."""
    def client(task):
        delta = server.spec.unflatten(torch.full((server.spec.numel,), float(values[task.client_id])))
        return ClientResult(client_id=task.client_id, update=server.codec.encode(delta), num_examples=1,
                            metrics={"train_loss": 0.0, "steps": 1})

    server.runtime.client_fn = client


def test_fedbuff_by_hand(tiny_config):
    """3 clients taking 1, 2.5 and 4 simulated seconds; 3 train at once; the server steps at every K=2 results with
    Δ̄ = (1/K) Σ Δ_i / √(1 + τ_i). Arrivals: t=1 c0 (τ0), t=2 c0 (τ0) -> step 1; t=2.5 c1 (τ1), t=3 c0 (τ0) -> step 2;
    t=4 c2 (τ2), t=4 c0 (τ0) -> step 3."""
    cfg = tiny_config(**{"partition.num_clients": 3, "federation.schedule": "fedbuff", "federation.buffer_size": 2,
                         "federation.concurrency": 3, "federation.rounds": 3, "client.steps": 1,
                         "client.epochs": None, "clock.speeds": [1.0, 2.5, 4.0], "eval.every": 0})
    server = Simulation(prepare(cfg))
    x0 = server.global_flat.clone()
    _constant_updates(server, [1.0, 10.0, 100.0])
    rows = server.run()
    assert [r["staleness"] for r in rows] == [[0, 0], [1, 0], [2, 0]]
    assert [r["clients"] for r in rows] == [[0, 0], [1, 0], [2, 0]]
    assert [r["sim_time_s"] for r in rows] == [2.0, 3.0, 4.0]
    want = 1.0 + (10 / math.sqrt(2) + 1) / 2 + (100 / math.sqrt(3) + 1) / 2
    assert torch.allclose(server.global_flat - x0, torch.full_like(x0, want), atol=1e-5)


def test_fedbuff_trains_a_real_model_through_the_yaml(tiny_config):
    cfg = tiny_config(**{"federation.schedule": "fedbuff", "federation.buffer_size": 2, "federation.concurrency": 3,
                         "federation.rounds": 12, "client.epochs": 2, "client.lr": 0.03,
                         "clock.speed_distribution": "lognormal", "eval.initial": True})
    rows = Simulation(prepare(cfg)).run()
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"] + 0.1
    times = [r["sim_time_s"] for r in rows[1:]]
    assert times == sorted(times) and times[-1] > 0
    assert all(len(r["staleness"]) == 2 for r in rows[1:])


def test_size_sampling_through_the_yaml_favours_the_big_client(tiny_config):
    cfg = tiny_config(**{"federation.sampling": "size", "federation.clients_per_round": 1, "federation.rounds": 30,
                         "client.steps": 1, "client.epochs": None, "eval.every": 0})
    server = Simulation(prepare(cfg))
    server.server.client_sizes = np.array([1, 1, 1, 97])  # the sampler reads the server's per-client sizes
    picks = [r["clients"][0] for r in server.run()]
    assert picks.count(3) >= 24  # expected 29.1 of 30; uniform sampling would give 7.5


def test_per_client_availability_and_its_length_is_checked(tiny_config):
    from fedfm.errors import ConfigError

    clock = SimClock(ClockConfig(availability=[1.0, 0.05], period_s=1.0), 2, seed=3)
    on = [(clock.online(0, t), clock.online(1, t)) for t in range(200)]
    assert all(a for a, _ in on) and sum(b for _, b in on) < 30
    with pytest.raises(ConfigError, match="clock.availability has 2 entries"):
        prepare(tiny_config(**{"clock.availability": [1.0, 0.5]}))


def test_fedbuff_version_moves_only_on_a_step_and_a_rejected_update_keeps_k(tiny_config):
    """Nguyen et al.'s Δ̄ = (1/K) Σ s(τ_i) Δ_i with K the buffer size: a buffered update that fails validation adds
    zero, it does not shrink K; and a buffer with no usable update applies no step, so it does not age the model."""
    cfg = tiny_config(**{"partition.num_clients": 3, "federation.schedule": "fedbuff", "federation.buffer_size": 2,
                         "federation.concurrency": 3, "federation.rounds": 3, "client.steps": 1,
                         "client.epochs": None, "clock.speeds": [1.0, 2.5, 4.0], "eval.every": 0,
                         "server.max_update_norm": 1e3, "federation.min_clients": 1})
    server = Simulation(prepare(cfg))
    server.server.check.max_update_norm = 1e3 * math.sqrt(server.spec.numel)  # 1 and 100 pass, 1e6 does not
    x0 = server.global_flat.clone()
    # client 0 sends 1.0 everywhere; client 1 a huge update the norm bound rejects; client 2 sends 100
    _constant_updates(server, [1.0, 1e6, 100.0])
    rows = server.run()
    # arrivals as in test_fedbuff_by_hand: [c0, c0] -> step 1; [c1 (rejected), c0] -> step 2 with K = 2;
    # [c2, c0] -> step 3
    assert [r["clients"] for r in rows] == [[0, 0], [1, 0], [2, 0]]
    assert "rejected" in rows[1]["dropped"][0]["error"]
    want = 1.0 + 1.0 / 2 + (100 / math.sqrt(3) + 1) / 2  # round 2: (0 + 1)/K with K = 2, not 1/1
    assert torch.allclose(server.global_flat - x0, torch.full_like(x0, want), atol=1e-4)


def test_fedbuff_does_not_age_the_model_when_no_step_is_applied(tiny_config):
    cfg = tiny_config(**{"partition.num_clients": 3, "federation.schedule": "fedbuff", "federation.buffer_size": 2,
                         "federation.concurrency": 3, "federation.rounds": 3, "client.steps": 1,
                         "client.epochs": None, "clock.speeds": [1.0, 2.5, 4.0], "eval.every": 0,
                         "server.max_update_norm": 1e3, "federation.min_clients": 2})
    server = Simulation(prepare(cfg))
    server.server.check.max_update_norm = 1e3 * math.sqrt(server.spec.numel)
    _constant_updates(server, [1.0, 1e6, 100.0])
    rows = server.run()
    # round 2's buffer [c1 (rejected), c0] has 1 usable update < min_clients: no step, the version stays 1, so c2
    # (started at version 0) is 1 step stale in round 3, not 2
    assert [r["aggregated"] for r in rows] == [True, False, True]
    assert rows[2]["clients"] == [2, 0] and rows[2]["staleness"] == [1, 0]


@pytest.mark.parametrize("aggregator", ["flexlora", "hetlora"])
def test_heterogeneous_rank_lora_is_refused_under_fedbuff(tiny_config, aggregator):
    from fedfm.errors import ConfigError

    with pytest.raises(ConfigError, match=f"server.aggregator '{aggregator}'.*fedbuff"):
        tiny_config(**{"server.aggregator": aggregator, "federation.schedule": "fedbuff", "adapter.r": 8,
                       "adapter.rank_per_client": {4: 0.5, 8: 0.5}})
