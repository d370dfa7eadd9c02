"""The privacy accountant: client-level (ε, δ) of a run, computed by ``dp-accounting`` (RDP or PLD), never asserted.

A round of DP-FedAvg is a Gaussian mechanism applied to a sample of the clients: the sum of updates clipped to C,
plus N(0, (zC)²). Poisson-sampled with rate q (``privacy.sampling: poisson``; add-or-remove-one neighbouring, RDP or
PLD), or a fixed-size sample of m of the N clients without replacement (``fixed``; replace-one neighbouring, RDP
only, which is what ``dp-accounting`` supports for it). R rounds compose.

dp-accounting's formulas take the noise multiplier relative to the query's L2 sensitivity. Under add-or-remove-one
that is C, so the multiplier is z. Under replace-one, one client's clipped update can go from +C to −C: the
sensitivity is 2C and the multiplier is z/2 (google/differential-privacy issue #378), which ``event`` passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


def new_accountant(kind: str, replace_one: bool = False):
    """A fresh dp-accounting accountant: ``rdp`` or ``pld`` (add-or-remove-one), or RDP under replace-one."""
    import dp_accounting as dpa
    from absl import logging as absl_logging
    from dp_accounting import pld, rdp

    absl_logging.set_verbosity(absl_logging.ERROR)  # RDP orders it cannot evaluate are skipped, not a user error
    if replace_one:
        return rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    return rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()


@dataclass
class Mechanism:
    """What the accountant needs: the sampling (rate q of N, or m of N), the noise multiplier and the rounds."""

    sampling: str  # poisson | fixed
    num_clients: int
    per_round: int  # the expected (poisson) or exact (fixed) number of sampled clients
    noise_multiplier: float
    accountant: str = "rdp"  # rdp | pld
    _eps: dict = field(default_factory=dict, repr=False, compare=False)  # (rounds, δ, z) -> ε

    @property
    def q(self) -> float:
        return self.per_round / self.num_clients

    @property
    def sensitivity(self) -> float:
        """The L2 sensitivity of one round's clipped sum, in units of C: 1 (add or remove a client), or 2 (replace
        one, fixed-size sampling: Δ_k = +C becomes −C)."""
        return 2.0 if self.sampling == "fixed" else 1.0

    def event(self, rounds: int, noise_multiplier: float | None = None):
        """R rounds as a dp-accounting event, with the Gaussian multiplier normalised by the sensitivity (z / 2
        under replace-one)."""
        import dp_accounting as dpa

        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        g = dpa.GaussianDpEvent(z / self.sensitivity)
        if self.sampling == "poisson":
            one = dpa.PoissonSampledDpEvent(self.q, g)
        else:
            one = dpa.SampledWithoutReplacementDpEvent(self.num_clients, self.per_round, g)
        return dpa.SelfComposedDpEvent(one, rounds)

    def fresh_accountant(self):
        if self.sampling == "fixed" and self.accountant != "rdp":
            raise ConfigError("privacy.accountant: fixed-size client sampling is accounted with 'rdp' "
                              "(dp-accounting's PLD has no sampling without replacement); use privacy.sampling: "
                              "poisson for 'pld'")
        return new_accountant(self.accountant, replace_one=self.sampling == "fixed")

    def epsilon(self, rounds: int, delta: float) -> float:
        """ε after ``rounds`` rounds at ``delta`` (computed once per (rounds, δ, z): the round's row and the budget
        check ask for the same one)."""
        if rounds <= 0:
            return 0.0
        key = (int(rounds), float(delta), float(self.noise_multiplier))
        if key not in self._eps:
            acc = self.fresh_accountant()
            acc.compose(self.event(rounds))
            self._eps[key] = float(acc.get_epsilon(delta))
        return self._eps[key]

    def noise_for(self, target_epsilon: float, delta: float, rounds: int) -> float:
        """The smallest noise multiplier whose ``rounds`` rounds spend at most ``target_epsilon`` at ``delta``."""
        import dp_accounting as dpa

        return float(dpa.calibrate_dp_mechanism(
            self.fresh_accountant, lambda z: self.event(rounds, z), target_epsilon, delta,
            bracket_interval=dpa.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4))


def mechanism(cfg, num_clients: int) -> Mechanism:
    """The run's mechanism: ``privacy.*`` and the client sample size; the noise multiplier derived from
    ``privacy.target_epsilon`` for the planned rounds when none is given."""
    from ..sampling import num_sampled

    p = cfg.privacy
    per_round = num_sampled(cfg.federation, num_clients)
    m = Mechanism(p.sampling, num_clients, per_round, p.noise_multiplier or 0.0, p.accountant)
    if p.noise_multiplier is None:
        if p.target_epsilon is None:
            raise ConfigError("privacy.mode 'client' needs privacy.noise_multiplier or privacy.target_epsilon")
        m.noise_multiplier = m.noise_for(p.target_epsilon, p.delta, cfg.federation.rounds)
    return m
