"""ε before and after the privacy audit, for the configurations docs/privacy.md shows: one JSON line each.

"reported before" is what fedfm printed before the fixes; "real before" the guarantee that mechanism delivered;
"reported now" what fedfm prints now, which is the real guarantee of the mechanism it now runs.
- fixed-size sampling: dp-accounting's Gaussian event takes the multiplier relative to the sensitivity, 2C under
  replace-one, so the real multiplier was z/2 (fixed now by passing z/2);
- adaptive clipping: the raw 0/1 count (sensitivity 1) made the pair's multiplier (z_Δ⁻² + σ_b⁻²)^−½ instead of z
  (fixed now by centring the count, sensitivity ½, as Andrew et al. 2021 do);
- Poisson sampling without adaptive clipping (table (a)) was and is right.

    python benchmarks/epsilon_audit.py
"""
from __future__ import annotations

import sys
from pathlib import Path

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results" / "epsilon_audit.jsonl"


def main() -> None:
    import dp_accounting as dpa

    from fedfm.privacy.accountant import Mechanism, new_accountant

    def rdp_eps(event, replace_one=False) -> float:
        acc = new_accountant("rdp", replace_one=replace_one)
        acc.compose(event)
        return float(acc.get_epsilon(delta))

    delta, rounds = 1e-5, 10
    rows = []
    # the fixed-size case: N = 100, m = 20, z = 1.232, 10 rounds
    N, m, z = 100, 20, 1.232
    old = dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(N, m, dpa.GaussianDpEvent(z)), rounds)
    real = dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(N, m, dpa.GaussianDpEvent(z / 2)), rounds)
    rows.append({"config": f"fixed-size sampling, N={N}, m={m}, z={z}, {rounds} rounds",
                 "reported_before": rdp_eps(old, True), "real_before": rdp_eps(real, True),
                 "reported_now": Mechanism("fixed", N, m, z, "rdp").epsilon(rounds, delta)})
    # the adaptive-clipping case: Poisson, E[K] = 20 of 100, default σ_b = E[K]/20, z = 0.833
    z, per_round = 0.833, 20
    sigma_b = per_round / 20
    z_delta = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5
    z_raw_count = (z_delta ** -2 + sigma_b ** -2) ** -0.5
    q = per_round / N
    poisson = lambda zz: dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(zz)), rounds)  # noqa
    rows.append({"config": f"adaptive clipping, Poisson q={q}, E[K]={per_round}, sigma_b={sigma_b:g}, z={z}, "
                           f"{rounds} rounds",
                 "reported_before": rdp_eps(poisson(z)), "real_before": rdp_eps(poisson(z_raw_count)),
                 "reported_now": Mechanism("poisson", N, per_round, z, "rdp").epsilon(rounds, delta)})
    # table (a): Poisson sampling, no adaptive clipping: unchanged
    for target, zz in ((1, 3.092), (4, 1.232), (8, 0.833)):
        e = Mechanism("poisson", N, per_round, zz, "rdp").epsilon(rounds, delta)
        rows.append({"config": f"table (a) eps={target}: Poisson q={q}, z={zz}, {rounds} rounds",
                     "reported_before": rdp_eps(poisson(zz)), "real_before": rdp_eps(poisson(zz)), "reported_now": e})
    for r in rows:
        emit({"benchmark": "epsilon_audit", "delta": delta, **{k: (round(v, 3) if isinstance(v, float) else v)
                                                              for k, v in r.items()}}, RESULTS)


if __name__ == "__main__":
    main()
