"""Client-level DP (DP-FedAvg): the accountant's ε equals dp-accounting called directly; the mechanism clips, noises
and divides as the paper says; ε is in every round's metrics; the budget derives z or stops the run; the CLI
reports a config's ε without training."""
from __future__ import annotations


import dp_accounting as dpa
import pytest
import torch
from dp_accounting import pld, rdp

from fedfm.aggregation import Updates
from fedfm.aggregation.chain import ClippedSum
from fedfm.privacy.accountant import Mechanism
from fedfm.privacy.dp import DPFedAvg
from fedfm.simulation import Simulation, prepare


@pytest.mark.parametrize("q,z,rounds,delta", [(0.01, 1.1, 100, 1e-5), (0.1, 0.8, 20, 1e-6), (0.5, 2.0, 5, 1e-5),
                                               (0.02, 1.5, 1000, 1e-5)])
@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_called_directly(q, z, rounds, delta, kind):
    n = 1000
    m = Mechanism("poisson", n, int(q * n), z, kind)
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    acc = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    acc.compose(event)
    assert m.epsilon(rounds, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


def test_noise_for_a_target_epsilon_spends_at_most_it():
    m = Mechanism("poisson", 1000, 10, 0.0, "rdp")
    z = m.noise_for(4.0, 1e-5, 100)
    m.noise_multiplier = z
    assert m.epsilon(100, 1e-5) <= 4.0 + 1e-6
    m.noise_multiplier = z * 0.95
    assert m.epsilon(100, 1e-5) > 4.0  # and it is the smallest such z (to the calibration's tolerance)


class _P:  # a privacy config section
    clip, target_quantile, clip_lr, count_noise = 1.0, None, 0.2, None


def _round(mech: DPFedAvg, state, updates: torch.Tensor, rnd: int):
    """One round of the DP stage over the plain clipped sum: (state, released update, measurements)."""
    return mech(state, Updates(rnd=rnd, results=[], x=torch.zeros(updates.shape[1]), spec=None, flat=updates), None)


def test_dp_fedavg_clips_sums_and_divides_by_the_fixed_denominator():
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5: the first is scaled to norm 1
    mech = DPFedAvg(_P(), noise_multiplier=0.0, denominator=4.0, seed=0, inner=ClippedSum())
    _, delta, info = _round(mech, mech.init(), updates, 1)
    assert torch.allclose(delta, torch.tensor([(0.6 + 0.3) / 4, (0.8 + 0.4) / 4]))
    assert set(info) == {"dp_clip", "dp_noise_std"}  # nothing exact about the clients (how many were clipped)
    # with noise: the std of the released coordinate is z·C / denominator, measured over many rounds
    noisy = DPFedAvg(_P(), noise_multiplier=2.0, denominator=4.0, seed=0, inner=ClippedSum())
    draws = torch.stack([_round(noisy, noisy.init(), torch.zeros(0, 2000), r)[1] for r in range(5)])
    assert draws.std().item() == pytest.approx(2.0 * 1.0 / 4.0, rel=0.03)
    # the same round of the same seed draws the same noise (resume gives the same run)
    assert torch.equal(*(_round(noisy, noisy.init(), torch.zeros(0, 5), 3)[1] for _ in range(2)))


def test_adaptive_clipping_moves_c_toward_the_target_quantile():
    class P(_P):
        target_quantile, clip_lr, count_noise = 0.5, 0.2, 1.0

    mech = DPFedAvg(P(), noise_multiplier=0.0, denominator=10.0, seed=0, inner=ClippedSum())
    norms = torch.linspace(0.1, 10.0, 10)
    updates = torch.stack([torch.tensor([n.item(), 0.0]) for n in norms])
    state = mech.init()
    for r in range(200):
        state, _, _ = _round(mech, state, updates, r)
    assert 3.0 < state["C"] < 7.5  # near the median norm (5.05), starting from C = 1


def test_a_dp_run_logs_epsilon_every_round_and_matches_the_accountant(tiny_config):
    cfg = tiny_config(**{"privacy.mode": "client", "privacy.noise_multiplier": 1.0, "privacy.clip": 0.5,
                         "federation.rounds": 3, "federation.clients_per_round": 2, "eval.every": 0})
    prepared = prepare(cfg)
    server = Simulation(prepared)
    rows = server.run()
    m = prepared.mechanism
    assert m.sampling == "poisson" and m.q == pytest.approx(0.5) and cfg.federation.sampling == "poisson"
    assert [r["epsilon"] for r in rows] == [pytest.approx(m.epsilon(r, 1e-5)) for r in (1, 2, 3)]
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    assert all(r["aggregated"] for r in rows)


def test_target_epsilon_derives_the_noise_or_stops_the_run(tiny_config):
    derived = prepare(tiny_config(**{"privacy.mode": "client", "privacy.target_epsilon": 8.0, "federation.rounds": 3}))
    assert derived.mechanism.epsilon(3, 1e-5) <= 8.0 + 1e-6 and derived.mechanism.noise_multiplier > 0
    cfg_over = {"privacy.mode": "client", "privacy.noise_multiplier": 1.5, "privacy.target_epsilon": 4.0,
                "federation.rounds": 10, "eval.every": 0, "eval.per_client": False}
    cfg = tiny_config(**cfg_over)
    prepared = prepare(cfg)
    spent_at = next(r for r in range(1, 11) if prepared.mechanism.epsilon(r, 1e-5) > 4.0)
    rows = Simulation(prepared).run()
    assert [r["round"] for r in rows] == list(range(1, spent_at))
    assert spent_at == 4 and rows[-1]["epsilon"] <= 4.0
    # with evaluation on, the round the budget stops at is scored, whatever eval.every says
    rows = Simulation(prepare(tiny_config(**{**cfg_over, "eval.every": 5}))).run()
    assert [r["round"] for r in rows] == [1, 2, 3] and "eval_accuracy" in rows[-1]
    assert not any("eval_accuracy" in r for r in rows[:-1])


def test_the_privacy_command_prints_epsilon_without_training(tiny_config, tmp_path):
    from tests.conftest import privacy_command

    cfg = tiny_config(**{"privacy.mode": "client", "privacy.noise_multiplier": 1.1, "federation.rounds": 7})
    out = privacy_command(cfg, tmp_path)
    assert out.exit_code == 0, out.output
    m = prepare(cfg).mechanism
    assert f"{m.epsilon(7, 1e-5):.4g}" in out.output and "RDP" in out.output and "q = 0.5" in out.output
    assert not (tmp_path / "run").exists()  # nothing trained, no run directory
    none = privacy_command(cfg, tmp_path, "privacy.mode=none")
    assert none.exit_code != 0 and "no differential-privacy guarantee" in none.output


FIXED = {"privacy.mode": "client", "privacy.sampling": "fixed", "federation.clients_per_round": 2}  # never empty


@pytest.mark.parametrize("mode", [FIXED, {"privacy.mode": "sample"},
                                  {**FIXED, "secagg.enabled": True, "secagg.dp_noise": "distributed",
                                   "secagg.corrupt_fraction": 0}],
                         ids=["dp-fedavg", "dp-sgd", "secagg-distributed-noise"])
def test_the_noise_is_secret_unless_seeded_runs_are_asked_for(tiny_config, mode):
    """By default the mechanism's draws come from the OS: two runs with the same config and seed release different
    models, so whoever holds the config cannot redraw the noise. ``privacy.randomness: seeded`` repeats them."""
    def final(**ov):
        server = Simulation(prepare(tiny_config(**{"federation.rounds": 1, "eval.every": 0, "privacy.noise_multiplier": 1.0,
                                               **mode, **ov})))
        server.run()
        return server.global_flat

    assert not torch.equal(final(), final())
    assert torch.equal(final(**{"privacy.randomness": "seeded"}), final(**{"privacy.randomness": "seeded"}))
