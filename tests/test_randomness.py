"""One source of randomness: every draw goes through fedfm.randomness by a named purpose; the draws a privacy
guarantee rests on come from the OS unless privacy.randomness is seeded, and the others always repeat."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedfm import randomness
from fedfm.randomness import PURPOSES, Randomness
from fedfm.simulation import Simulation, prepare

SRC = Path(randomness.__file__).resolve().parent
PRIVATE = {"client_sample", "dp_noise", "noise_share", "dpsgd_batches", "dpsgd_noise", "secagg_graph",
           "split_noise"}


def test_the_purposes_and_which_protect_privacy():
    assert {name for name, p in PURPOSES.items() if p.private_under} == PRIVATE
    assert all(p.what for p in PURPOSES.values())


def test_no_module_draws_or_derives_randomness_but_this_one():
    """No OS entropy, SeedSequence or seed derivation outside fedfm/randomness.py; the SecAgg protocol's
    cryptographic secrets (Shamir coefficients through ``secrets``) are the one kind that must not be seedable."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "randomness.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bsecrets\.|SeedSequence|default_rng\(\[", line):
                if path.name == "secagg.py" and "secrets.randbelow" in line:
                    continue
                offenders.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("purpose", sorted(PURPOSES))
def test_each_purpose_is_secret_exactly_where_it_protects_privacy(purpose):
    for mode in ("none", "client", "sample"):
        private = mode in PURPOSES[purpose].private_under
        a, b = Randomness(7, mode, secret=True), Randomness(7, mode, secret=True)
        assert (a.seed(purpose, 1, 2) != b.seed(purpose, 1, 2)) == private
        assert (a.rng(purpose, 3).random() != b.rng(purpose, 3).random()) == private
        s1, s2 = Randomness(7, mode, secret=False), Randomness(7, mode, secret=False)
        assert s1.seed(purpose, 1, 2) == s2.seed(purpose, 1, 2)
        assert s1.rng(purpose, 3).random() == s2.rng(purpose, 3).random()


def test_seeded_draws_keep_the_derivations_the_tables_were_made_with():
    r = Randomness(5, "client", secret=False)
    assert r.rng("client_sample", 3).random() == np.random.default_rng([5, 3, 3]).random()
    assert r.seed("dp_noise", 4) == int(np.random.SeedSequence([5, 7, 4]).generate_state(1)[0])
    assert r.seed("client_task", 2, 9) == randomness.derive_seed(5, 4, 2, 9)
    assert r.rng("partition").random() == np.random.default_rng(5).random()


RUNS = {
    "client DP, secure sum with distributed noise": {
        "privacy.mode": "client", "privacy.noise_multiplier": 1.0, "privacy.sampling": "fixed",
        "secagg.enabled": True, "secagg.dp_noise": "distributed", "secagg.corrupt_fraction": 0,
        "federation.clients_per_round": 2, "federation.rounds": 2},
    "client DP, Poisson sample": {"privacy.mode": "client", "privacy.noise_multiplier": 1.0, "federation.rounds": 2},
    "sample DP": {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "federation.rounds": 1},
}


@pytest.mark.parametrize("ov", list(RUNS.values()), ids=list(RUNS))
def test_every_private_draw_of_a_run_differs_between_default_runs_and_repeats_when_seeded(tiny_config, monkeypatch,
                                                                                          ov):
    """Records every draw a run makes, by purpose: a private one differs between two default runs of the same
    config, and every draw repeats between two seeded runs."""
    real_seed, real_rng = Randomness.seed, Randomness.rng
    log: list = []

    def seed(self, purpose, *parts, base=None):
        v = real_seed(self, purpose, *parts, base=base)
        log.append((purpose, parts, base, v))
        return v

    def rng(self, purpose, *parts):
        g = real_rng(self, purpose, *parts)
        log.append((purpose, parts, None, repr(g.bit_generator.state["state"])))
        return g

    monkeypatch.setattr(Randomness, "seed", seed)
    monkeypatch.setattr(Randomness, "rng", rng)

    def draws(**extra) -> dict:
        log.clear()
        Simulation(prepare(tiny_config(**{"eval.every": 0, **ov, **extra}))).run()
        out: dict = {}
        for purpose, parts, base, v in log:  # a draw is keyed by its purpose and coordinates
            out.setdefault((purpose, parts, base), []).append(v)
        return out

    a, b = draws(), draws()
    s1, s2 = draws(**{"privacy.randomness": "seeded"}), draws(**{"privacy.randomness": "seeded"})
    assert s1 == s2
    common = set(a) & set(b)
    private = {k for k in common if ov["privacy.mode"] in PURPOSES[k[0]].private_under}
    assert private, sorted(a)
    for key in common:  # the same draw (purpose and coordinates) in two default runs
        assert (a[key] != b[key]) == (key in private), key
