"""ε checked without the code's own construction.

(a) The sensitivity of each released query is measured here, by running fedfm's own clipping and counting on
    neighbouring sets of clients (add or remove one for Poisson sampling, replace one for fixed-size samples), and
    the noise multiplier dp-accounting gets is that sensitivity-normalised one: std / sensitivity.
(b) For Poisson sampling, Opacus's RDP and PRV accountants give the same ε; with every client sampled (q = 1) the
    mechanism is a plain Gaussian one, whose exact (ε, δ) curve (Balle & Wang 2018) bounds fedfm's ε from below.
(c) The noise actually drawn has the std the accounting assumes, measured over many draws, for the central,
    distributed and adaptive-clipping paths.
"""
from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp

from fedfm.privacy.accountant import Mechanism
from fedfm.privacy.dp import DPFedAvg, clipped_sum

C = 0.7


class _P:  # a privacy config section
    clip, target_quantile, clip_lr, count_noise = C, None, 0.2, None


class _Adaptive(_P):
    target_quantile, count_noise = 0.5, None


def _released_query(mech: DPFedAvg, updates: torch.Tensor) -> tuple[torch.Tensor, float]:
    """What one round releases before noise: the clipped sum, and (adaptive clipping) the count it noises."""
    total, unclipped = clipped_sum(updates, mech.C0)
    return total, mech.count_query(unclipped, updates.shape[0])


def _normalised_sensitivity(mech: DPFedAvg, relation: str) -> float:
    """max over neighbouring client sets of ‖(Δsum / σ_sum, Δcount / σ_count)‖: the change of the released query in
    units of the noise's std. Its inverse is the multiplier a Gaussian-mechanism accountant must get."""
    dim = 6
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, dim, generator=g) * 0.3  # some other clients, clipped and unclipped alike
    e = torch.zeros(dim)
    e[0] = 1.0
    candidates = [e * C, e * C * 0.999, e * 100.0, -e * 100.0, e * 1e-3, torch.randn(dim, generator=g) * 50]
    sigma_sum = mech.z_delta * mech.C0
    sigma_count = mech.sigma_b if mech.gamma is not None else math.inf
    worst = 0.0
    if relation == "add-or-remove":
        pairs = [(base, torch.cat([base, x[None]])) for x in candidates]
    else:  # replace one of the clients by another record
        pairs = [(torch.cat([base, x[None]]), torch.cat([base, y[None]])) for x in candidates for y in candidates]
    for d, d2 in pairs:
        (s1, c1), (s2, c2) = _released_query(mech, d), _released_query(mech, d2)
        change = (float((s1 - s2).norm()) / sigma_sum) ** 2 + ((c1 - c2) / sigma_count) ** 2
        worst = max(worst, change ** 0.5)
    return worst


def _dpa_epsilon(event, delta: float, accountant) -> float:
    accountant.compose(event)
    return accountant.get_epsilon(delta)


CASES = [(0.01, 1.1, 100, 1e-5), (0.1, 0.8, 20, 1e-6), (0.2, 1.232, 10, 1e-5), (0.5, 2.0, 5, 1e-5)]


@pytest.mark.parametrize("q,z,rounds,delta", CASES)
@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_poisson_sampling_epsilon_from_the_measured_sensitivity(q, z, rounds, delta, kind):
    n = 1000
    mech = DPFedAvg(_P(), z, denominator=q * n, seed=0)
    z_norm = 1.0 / _normalised_sensitivity(mech, "add-or-remove")
    assert z_norm == pytest.approx(z, rel=1e-9)  # sensitivity C, noise zC
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z_norm)), rounds)
    want = _dpa_epsilon(event, delta, rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant())
    assert Mechanism("poisson", n, int(q * n), z, kind).epsilon(rounds, delta) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("N,m,z,rounds,delta", [(100, 20, 1.232, 10, 1e-5), (500, 10, 1.2, 50, 1e-5),
                                                (50, 5, 0.9, 30, 1e-6), (200, 100, 2.5, 20, 1e-5)])
def test_fixed_size_sampling_epsilon_from_the_measured_sensitivity(N, m, z, rounds, delta):
    """Replace-one: a clipped update can go from +C to −C, so the sum's sensitivity is 2C and the normalised
    multiplier z/2. N=100, m=20, z=1.232, 10 rounds: ε ≈ 17.6, not the 6.2 reported before."""
    mech = DPFedAvg(_P(), z, denominator=m, seed=0)
    z_norm = 1.0 / _normalised_sensitivity(mech, "replace-one")
    assert z_norm == pytest.approx(z / 2, rel=1e-6)
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    event = dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(N, m, dpa.GaussianDpEvent(z_norm)), rounds)
    want = _dpa_epsilon(event, delta, acc)
    got = Mechanism("fixed", N, m, z, "rdp").epsilon(rounds, delta)
    assert got == pytest.approx(want, rel=1e-6)
    if (N, m, z, rounds) == (100, 20, 1.232, 10):
        assert got == pytest.approx(17.62, abs=0.05)


@pytest.mark.parametrize("per_round,z,rounds,delta", [(20, 0.833, 10, 1e-5), (10, 0.8, 30, 1e-5), (50, 1.0, 20, 1e-6)])
def test_adaptive_clipping_epsilon_from_the_measured_sensitivity(per_round, z, rounds, delta):
    """The pair (clipped sum, centred count) is one Gaussian mechanism; with the count centred its normalised
    multiplier is the configured z, so ε is that of z. (Noising the raw 0/1 count instead, as before, gave
    (z_Δ⁻² + σ_b⁻²)^−½: for E[K]=20, z=0.833, 10 rounds, ε ≈ 11.8 where 8.0 was reported.)"""
    n, q = per_round * 5, 0.2
    mech = DPFedAvg(_Adaptive(), z, denominator=per_round, seed=0)
    z_norm = 1.0 / _normalised_sensitivity(mech, "add-or-remove")
    assert z_norm == pytest.approx(z, rel=1e-6)
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z_norm)), rounds)
    want = _dpa_epsilon(event, delta, rdp.RdpAccountant())
    got = Mechanism("poisson", n, per_round, z, "rdp").epsilon(rounds, delta)
    assert got == pytest.approx(want, rel=1e-6)
    # under replace-one both parts double (2C, and a count going from +½ to −½): z/2, as the accountant passes
    assert 1.0 / _normalised_sensitivity(mech, "replace-one") == pytest.approx(z / 2, rel=1e-6)


# ------------------------------------------------------------------ (b) a second accountant, and exact Gaussians

@pytest.mark.parametrize("q,z,rounds,delta", CASES)
def test_opacus_accountants_agree_for_poisson_sampling(q, z, rounds, delta):
    from opacus.accountants import PRVAccountant, RDPAccountant

    ours_rdp = Mechanism("poisson", 1000, int(q * 1000), z, "rdp").epsilon(rounds, delta)
    ours_pld = Mechanism("poisson", 1000, int(q * 1000), z, "pld").epsilon(rounds, delta)
    theirs = RDPAccountant()
    theirs.history = [(z, q, rounds)]
    # different RDP orders: within a few percent, and never far below (both are upper bounds on the truth)
    assert ours_rdp == pytest.approx(theirs.get_epsilon(delta), rel=0.06)
    prv = PRVAccountant()
    prv.history = [(z, q, rounds)]
    assert ours_pld == pytest.approx(prv.get_epsilon(delta), rel=0.05)


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact ε at δ of a Gaussian mechanism with sensitivity / std = μ (Balle & Wang 2018, Thm. 8):
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731

    def d(eps):
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 1.0
    while d(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sampling,rounds,z", [("poisson", 10, 1.0), ("poisson", 50, 2.0), ("fixed", 10, 1.232),
                                               ("fixed", 40, 3.0)])
def test_with_every_client_sampled_epsilon_is_at_least_the_exact_gaussian_one(sampling, rounds, z):
    """q = 1 (Poisson) or m = N (fixed): no amplification, R rounds of the Gaussian mechanism compose to one with
    μ = √R · sensitivity / (zC); sensitivity C (add or remove) or 2C (replace one). An accountant may over-state ε,
    never under-state it."""
    n, delta = 40, 1e-5
    sens = 1.0 if sampling == "poisson" else 2.0
    exact = _gaussian_epsilon(math.sqrt(rounds) * sens / z, delta)
    kinds = ["rdp", "pld"] if sampling == "poisson" else ["rdp"]
    for kind in kinds:
        got = Mechanism(sampling, n, n, z, kind).epsilon(rounds, delta)
        assert exact <= got <= exact * 1.35 + 0.05, (kind, got, exact)


# ------------------------------------------------------------------ (c) the noise drawn is the noise accounted

def _event_multiplier(m: Mechanism) -> float:
    one = m.event(1).event  # SelfComposed → the sampled event
    return one.event.noise_multiplier


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_central_noise_has_the_std_the_accountant_assumes(sampling):
    z, per_round = 1.3, 8
    mech = DPFedAvg(_P(), z, denominator=per_round, seed=0, secret=True)
    draws = torch.cat([mech.release(C, torch.zeros(50_000, dtype=torch.float64), None, r)[0] for r in range(4)])
    std = float(draws.double().std()) * per_round  # the noise on the sum, before ÷ E[K]
    sens = C * (2.0 if sampling == "fixed" else 1.0)
    accounted = _event_multiplier(Mechanism(sampling, 40, per_round, z, "rdp"))
    assert std / sens == pytest.approx(accounted, rel=0.01)


def test_adaptive_clipping_noise_has_the_stds_the_budget_split_assumes():
    z, per_round = 0.833, 20
    mech = DPFedAvg(_Adaptive(), z, denominator=per_round, seed=0, secret=True)
    C0 = mech.C0
    sums, counts = [], []
    for r in range(4000):  # C fixed at C0: only the noise is measured
        delta, info, _ = mech.release(C0, torch.zeros(64, dtype=torch.float64), 0.0, r)
        sums.append(delta.double() * per_round)
        counts.append((info["dp_unclipped_fraction"] - 0.5) * per_round)
    sigma_sum = float(torch.cat(sums).std())
    sigma_count = float(torch.tensor(counts).std())
    # measured: the pair is a Gaussian mechanism of sensitivities (C, ½) with these stds
    z_measured = ((C0 / sigma_sum) ** 2 + (0.5 / sigma_count) ** 2) ** -0.5
    assert sigma_count == pytest.approx(per_round / 20, rel=0.05)  # the default σ_b = E[K]/20
    assert z_measured == pytest.approx(_event_multiplier(Mechanism("poisson", 100, per_round, z, "rdp")), rel=0.02)


def test_distributed_noise_shares_sum_to_the_std_the_accountant_assumes(tiny_config):
    """m = federation.min_clients clients each add their share; the sum of the shares, measured over many
    coordinates and clients, has std zC: the central mechanism's."""
    from fedfm.privacy.secagg import RingCodec, SecAggClient, SecAggRound
    from fedfm.privacy.dp import noise_share_std
    from fedfm.privacy.secure import SecureClient, SecureSum

    class Spec:
        numel = 20_000

    z, m = 1.5, 4

    class Cfg:
        class secagg:
            clip, dp_noise, bits = None, "distributed", 32

        class federation:
            min_clients = m

        class privacy:
            mode, randomness, clip = "client", "secret", C

    stage = SecureSum(Cfg, check=None, max_examples=1, seed=0, mechanism=Mechanism("poisson", 40, m, z, "rdp"))
    rnd = SecAggRound(range(m), dim=Spec.numel, codec=RingCodec.for_sum(stage.clip, m, 32), k=None)
    zero = torch.zeros(Spec.numel)
    share = noise_share_std(z, C, m)  # what DP-FedAvg asks of each client under distributed noise
    codes = [SecureClient(SecAggClient(u, rnd.config), rnd.codec, stage.max_examples, stage.min_survivors, clip=C,
                          noise_share=share).contribution(zero, 1, seed=100 + u) for u in range(m)]
    total = rnd.codec.decode(np.sum(codes, axis=0, dtype=np.uint64), m)  # what the server unmasks
    assert len(total) == Spec.numel  # the noised update and nothing else
    assert float(total.std()) == pytest.approx(z * C * 1.0, rel=0.02)  # = the std of the central noise
    assert _event_multiplier(Mechanism("poisson", 40, m, z, "rdp")) == pytest.approx(float(total.std()) / C, rel=0.02)


def test_noise_for_a_target_under_fixed_size_sampling_meets_it_by_first_principles():
    """z derived from a target ε under fixed-size sampling: dp-accounting given z/2 (the multiplier relative to the
    replace-one sensitivity 2C) spends at most the target, and a 5% smaller z would not."""
    N, m, rounds, delta, target = 100, 20, 10, 1e-5, 6.0
    z = Mechanism("fixed", N, m, 0.0, "rdp").noise_for(target, delta, rounds)

    def real(zz):
        acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
        return _dpa_epsilon(dpa.SelfComposedDpEvent(
            dpa.SampledWithoutReplacementDpEvent(N, m, dpa.GaussianDpEvent(zz / 2)), rounds), delta, acc)

    assert real(z) <= target + 1e-6 < real(0.95 * z)
    assert z > 2.0  # about twice the 1.232 that the old accounting derived for ε ≈ 6.2
