"""Robust aggregators on hand-made updates with known outliers (values worked by hand)."""
from __future__ import annotations

import pytest
import torch

from fedfm.aggregation import AGGREGATORS, Stage, Updates
from fedfm.aggregation.robust import CoordinateMedian, GeometricMedian, Krum, NormBound, TrimmedMean, krum_scores
from fedfm.config import RunConfig

HONEST = torch.tensor([[1.0, 0.0], [1.2, 0.1], [0.8, -0.1], [1.1, 0.05]])
ATTACK = torch.tensor([[-50.0, 40.0]])
ALL = torch.cat([HONEST, ATTACK])
W = torch.ones(5)


def _updates(flat: torch.Tensor) -> Updates:
    return Updates(rnd=1, results=[], x=torch.zeros(flat.shape[1]), spec=None, flat=flat, ranks=[0] * len(flat))


class _Seen(Stage):
    """A fake inner stage: its result is the updates it was given."""

    def __call__(self, state, u, weights):
        return state, u.flat, {}


def test_coordinate_median_by_hand():
    # column 0 sorted: -50, 0.8, 1.0, 1.1, 1.2 -> 1.0; column 1 sorted: -0.1, 0, 0.05, 0.1, 40 -> 0.05
    assert torch.allclose(CoordinateMedian()(ALL, W), torch.tensor([1.0, 0.05]))
    # an even count averages the two middle values
    assert torch.allclose(CoordinateMedian()(HONEST, torch.ones(4)), torch.tensor([1.05, 0.025]))


def test_trimmed_mean_by_hand():
    # beta 0.2 of 5 -> b = 1 from each end: column 0 keeps 0.8, 1.0, 1.1 -> 0.9667; column 1 keeps 0, 0.05, 0.1
    got = TrimmedMean(0.2)(ALL, W)
    assert torch.allclose(got, torch.tensor([2.9 / 3, 0.05]), atol=1e-6)
    assert torch.allclose(TrimmedMean(0.0)(ALL, W), ALL.mean(0))  # beta 0 is the plain mean


def test_krum_scores_by_hand_and_the_attacker_is_never_chosen():
    u = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    # f = 1 -> each score sums the K - f - 2 = 1 nearest squared distance: 1, 1, 4, 49
    assert torch.allclose(krum_scores(u, 1), torch.tensor([1.0, 1.0, 4.0, 49.0], dtype=torch.float64))
    krum = Krum(0.2, multi=False)
    out = krum(ALL, W)
    assert krum.last_selected != [4] and len(krum.last_selected) == 1
    assert any(torch.equal(out, h) for h in HONEST)


def test_multi_krum_averages_the_k_minus_f_best():
    mk = Krum(0.2, multi=True)  # f = 1 of 5: keeps 4
    out = mk(ALL, torch.tensor([1.0, 1.0, 1.0, 1.0, 100.0]))
    assert mk.last_selected == [0, 1, 2, 3]
    assert torch.allclose(out, HONEST.mean(0))


def test_geometric_median_resists_the_outlier_and_equals_the_point_for_identical_updates():
    gm = GeometricMedian(iters=50)(ALL, W)
    assert (gm - HONEST.mean(0)).norm() < 0.2  # the mean of all five is pulled to (-9.18, 8.01)
    same = torch.tensor([[2.0, -1.0]] * 3)
    assert torch.allclose(GeometricMedian(4)(same, torch.ones(3)), torch.tensor([2.0, -1.0]))
    # three collinear points: the geometric median is the middle one
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    assert torch.allclose(GeometricMedian(200)(line, torch.ones(3)), torch.tensor([1.0, 0.0]), atol=1e-3)


def test_norm_bound_scales_only_the_long_updates():
    stage = NormBound(2.0, _Seen())
    _, u, _ = stage(stage.init(), _updates(torch.tensor([[3.0, 4.0], [0.6, 0.8]])), torch.ones(2))
    assert torch.allclose(u, torch.tensor([[1.2, 1.6], [0.6, 0.8]]))


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum", "geometric-median", "norm-bound"])
def test_every_robust_aggregator_is_registered_and_bounds_the_attack(name):
    cfg = RunConfig(server={"aggregator": name, "norm_bound": 2.0, "trim_fraction": 0.2})
    agg = AGGREGATORS.get(name)(cfg)
    _, out, _ = agg(agg.init(), _updates(ALL), W)
    assert out.norm() < 3.0, (name, out)  # FedAvg's mean is (-9.18, 8.01), norm 12.2
    assert ALL.mean(0).norm() > 12


def test_norm_bound_needs_its_bound_in_the_config():
    from fedfm.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="norm_bound"):
        RunConfig(server={"aggregator": "norm-bound"})


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum", "geometric-median", "norm-bound"])
def test_each_robust_aggregator_runs_through_the_yaml(tiny_config, name):
    from fedfm.simulation import Simulation, prepare

    cfg = tiny_config(**{"server.aggregator": name, "server.norm_bound": 1.0, "federation.clients_per_round": 4,
                         "federation.rounds": 2, "eval.every": 0})
    server = Simulation(prepare(cfg))
    x0 = server.global_flat.clone()
    rows = server.run()
    assert all(r["aggregated"] for r in rows)
    assert not torch.equal(server.global_flat, x0)
