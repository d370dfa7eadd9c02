"""FedKSeed (Qin et al. 2024): the server's replay equals what a client rebuilds, bit for bit; a client that missed
rounds catches up from the history; the bytes are the pairs; FedKSeed-Pro favours seeds with large scalars; the
zeroth-order estimate follows the true gradient; what does not fit is refused before any model loads."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from fedfm.client import ClientResult
from fedfm.client.fedkseed import (CHUNK, PAIR, Amplitudes, FedKSeed, PairCheck, candidate_seeds, decode_blocks,
                                   move, zo_step)
from fedfm.errors import ConfigError, UpdateRejected
from fedfm.simulation import Simulation, prepare

ZO = {"client.algorithm": "fedkseed", "client.optimizer": "sgd", "client.lr": 1e-4, "adapter.method": "full",
      "client.steps": 3, "client.epochs": None, "eval.per_client": False, "fedkseed.num_seeds": 32,
      "federation.rounds": 2, "federation.clients_per_round": 2}


def _sim(tiny_config, **over) -> Simulation:
    return Simulation(prepare(tiny_config(**{**ZO, **over})))


def _rebuilt(algo: FedKSeed, sim: Simulation) -> torch.Tensor:
    """The model a client process holds once it replayed every block the server sent (a client never sent any)."""
    algo._catch_up(sim.server.algo_server.payload(0, -1))
    return algo.ctx.spec.flat()


def test_two_rounds_of_full_parameter_fedkseed_train_and_send_only_pairs(tiny_config):
    sim = _sim(tiny_config)
    x0 = sim.server.global_flat.clone()
    rows = sim.run()
    assert [r["aggregated"] for r in rows] == [True, True] and not any(r["dropped"] for r in rows)
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    assert rows[0]["eval_loss"] != rows[1]["eval_loss"]  # the server's held-out loss moves with the model
    assert not torch.equal(sim.server.global_flat, x0)  # every parameter of the model moved
    assert bool((sim.server.global_flat != x0).float().mean() > 0.99)
    steps = ZO["client.steps"]
    for r in rows:  # bytes per client per round: the pairs, 8 bytes each
        assert r["bytes_up"] == len(r["clients"]) * steps * PAIR.itemsize
    history = sim.server.algo_server.history
    assert rows[0]["bytes_down"] == 0  # round 1: the clients start from the model they already hold
    # round 2: each client is sent round 1's block: an 8-byte header and at most K pairs, no tensor
    assert rows[1]["bytes_down"] == len(rows[1]["clients"]) * (8 + PAIR.itemsize * len(history[0]))
    assert 0 < len(history[0]) <= 2 * steps


def test_the_servers_replay_equals_the_clients_own_model_bit_for_bit(tiny_config):
    sim = _sim(tiny_config, **{"federation.rounds": 3})
    sim.run()
    algo = sim.client_algo
    assert algo.version == 2  # its last task was in round 3, from version 2
    assert torch.equal(_rebuilt(algo, sim), sim.server.global_flat)
    assert algo.version == 3
    # what it holds in memory besides the model: the one buffer z is drawn into, a chunk (or the largest tensor)
    held = [v for v in vars(algo).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in held) == min(CHUNK, max(p.numel() for p in algo.params))


def test_z_drawn_in_chunks_is_the_same_z_on_every_party_and_bounded_in_memory(monkeypatch):
    """A tensor larger than a chunk: z is drawn chunk by chunk into a buffer of one chunk; moving by +1 then −1 with
    the same seed lands within rounding of the start, and a second party gets the same bits."""
    import fedfm.client.fedkseed as fk

    monkeypatch.setattr(fk, "CHUNK", 1000)
    a = [torch.zeros(2500), torch.zeros(7, 3)]
    b = [torch.zeros(2500), torch.zeros(7, 3)]
    scratch = fk.scratch_for(a)
    assert scratch.numel() == 1000
    fk.move(a, 11, 1.0, scratch)
    fk.move(b, 11, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert float(a[0].std()) > 0.5 and not torch.equal(a[0][:1000], a[0][1000:2000])  # fresh draws per chunk
    fk.move(a, 11, -1.0, scratch)
    assert all(float(x.abs().max()) == 0.0 for x in a)


def test_a_client_that_missed_rounds_catches_up_by_replaying_the_history(tiny_config):
    sim = _sim(tiny_config, **{"federation.rounds": 3})
    sim.run()
    half = sim.server.algo_server
    assert [v for v, _ in decode_blocks(half.payload(4, 1234))] == [1, 2, 3]  # never sent anything: everything
    assert half.payload(4, 1234) == b""  # then nothing new
    fresh = _sim(tiny_config, **{"federation.rounds": 3})  # a client process that missed every round
    assert fresh.client_algo.version == 0
    assert torch.equal(_rebuilt(fresh.client_algo, sim), sim.server.global_flat)


def test_resume_gives_the_same_model(tiny_config):
    whole = _sim(tiny_config, **{"federation.rounds": 4})
    whole.run()
    first = _sim(tiny_config, **{"federation.rounds": 2})
    first.run()
    buf = io.BytesIO()
    torch.save(first.checkpoint_state(2), buf)
    buf.seek(0)
    resumed = _sim(tiny_config, **{"federation.rounds": 4})
    resumed.load_checkpoint_state(torch.load(buf, weights_only=True))
    rows = resumed.run()
    assert [r["round"] for r in rows] == [3, 4]
    assert torch.equal(resumed.server.global_flat, whole.server.global_flat)


def test_bad_pairs_are_rejected_and_the_round_goes_on(tiny_config):
    cfg = tiny_config(**ZO)
    check = PairCheck(cfg, None)
    good = np.array([(3, 0.5), (3, -0.25), (7, 1.0)], dtype=PAIR)
    acc, extras = check(ClientResult(client_id=0, update=good.tobytes(), num_examples=10))
    assert acc[3] == 0.25 and acc[7] == 1.0 and float(acc.abs().sum()) == 1.25 and extras == {}
    bad = {"not a whole number": good.tobytes()[:-1],
           "seed index outside": np.array([(32, 1.0)], dtype=PAIR).tobytes(),
           "non-finite": np.array([(1, np.nan)], dtype=PAIR).tobytes(),
           "more than the 3 steps": np.array([(1, 1.0)] * 4, dtype=PAIR).tobytes()}
    for why, data in bad.items():
        with pytest.raises(UpdateRejected, match=why):
            check(ClientResult(client_id=0, update=data, num_examples=10))
    sim = _sim(tiny_config)
    results = [ClientResult(client_id=0, update=good.tobytes(), num_examples=10),
               ClientResult(client_id=1, update=bad["non-finite"], num_examples=10)]
    row = sim.server.aggregate_results(1, results)
    assert row["aggregated"] and [d["id"] for d in row["dropped"]] == [1]
    assert [p["j"].tolist() for p in sim.server.algo_server.history] == [[3, 7]]


def test_pro_sampling_favours_seeds_with_large_scalars():
    amp = Amplitudes(4)
    amp.add(np.array([(0, 10.0), (1, -0.1), (0, -10.0)], dtype=PAIR))
    # ψ = mean |ĝ| with an initial 0: [20/3, 0.1/2, 0, 0]; min-max normalised: [1, 0.0075, 0, 0]; softmax
    psi = np.array([1.0, 0.05 / (20 / 3), 0.0, 0.0])
    want = np.exp(psi) / np.exp(psi).sum()
    assert np.allclose(amp.probabilities().numpy(), want, atol=1e-6)
    draws = torch.multinomial(amp.probabilities(), 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / 20000
    assert counts[0] > 0.4 and counts[0] > 2 * counts[1]  # e/(e + 3) ≈ 0.475 vs ≈ 0.176


def test_a_pro_federation_runs_and_draws_from_its_amplitudes(tiny_config):
    sim = _sim(tiny_config, **{"fedkseed.pro": True, "federation.rounds": 3})
    rows = sim.run()
    assert all(r["aggregated"] for r in rows)
    p = sim.client_algo.amplitudes.probabilities()
    assert float(p.max()) > float(p.min())  # the seeds used so far are weighted differently


def test_the_zeroth_order_estimate_follows_the_true_gradient(tiny_config):
    sim = _sim(tiny_config, **{"fedkseed.num_seeds": 48})
    model, task, spec = sim.model, sim.task, sim.spec
    params = list(spec.params.values())
    model.eval()
    batch = next(task.batches(sim.local[0].encoded, sim.local[0].train, 16, torch.Generator().manual_seed(0)))
    model.zero_grad()
    task.loss(model, batch).backward()
    grad = [p.grad.detach().clone() for p in params]
    x0 = spec.flat()
    seeds = candidate_seeds(sim.cfg)
    estimates, exact = [], []
    for s in seeds:
        g, _ = zo_step(params, lambda: task.loss(model, batch), int(s), 1e-3, 0.0)
        spec.load_flat(x0)
        estimates.append(g)
        z = [torch.zeros_like(p) for p in params]
        move(z, int(s), 1.0)  # the same z, drawn into zeros
        exact.append(float(sum((gr * zz).sum() for gr, zz in zip(grad, z))))
    r = np.corrcoef(estimates, exact)[0, 1]
    assert r > 0.95, r
    assert np.allclose(estimates, exact, rtol=0.1, atol=0.05 * np.abs(exact).max())


@pytest.mark.parametrize("over,key", [
    ({"server.aggregator": "median"}, "server.aggregator"),
    ({"server.optimizer": "fedadam"}, "server.optimizer"),
    ({"server.lr": 0.5}, "server.lr"),
    ({"secagg.enabled": True, "secagg.corrupt_fraction": 0.0}, "secagg.enabled"),
    ({"privacy.mode": "client", "privacy.noise_multiplier": 1.0}, "privacy.mode"),
    ({"privacy.mode": "sample", "privacy.noise_multiplier": 1.0}, "privacy.mode"),
    ({"adapter.method": "lora", "adapter.r": 4, "adapter.rank_per_client": {2: 0.5, 4: 0.5}},
     "adapter.rank_per_client"),
    ({"adapter.method": "fedsa-lora"}, "adapter.method"),
    ({"adapter.personal": ["classifier"]}, "adapter.personal"),
    ({"codec.name": "fp16"}, "codec.name"),
    ({"server.max_update_norm": 1.0}, "server.max_update_norm"),
    ({"client.optimizer": "adamw"}, "client.optimizer"),
    ({"attack.kind": "sign-flip", "attack.fraction": 0.5}, "attack.kind"),
    ({"runtime.name": "ray"}, "runtime.name"),
])
def test_what_does_not_fit_is_refused_at_config_time_naming_the_key(tiny_config, over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(**{**ZO, **over})


def test_a_flower_deployment_refuses_it(tiny_config):
    from fedfm.deploy import check_config

    with pytest.raises(ConfigError, match="client.algorithm 'fedkseed'"):
        check_config(tiny_config(**ZO))


def test_the_cli_refuses_fedkseed_with_a_robust_reducer_in_one_line_before_any_model_loads(tiny_csv, tmp_path,
                                                                                           monkeypatch):
    from typer.testing import CliRunner

    import fedfm.models
    from fedfm.cli import app
    from tests.conftest import tiny_overrides

    def load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(fedfm.models, "build_model", load)
    res = CliRunner().invoke(app, ["run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path,
                                                                       **{**ZO, "server.aggregator": "krum"})])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "client.algorithm 'fedkseed'" in lines[0] and "server.aggregator 'krum'" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_gradient_clip_it_does_not_use_is_said_at_the_start(tiny_config):
    assert any("client.grad_clip=1 is not used" in n for n in _sim(tiny_config).server.algo_server.notes)
    assert _sim(tiny_config, **{"client.grad_clip": None}).server.algo_server.notes == []
