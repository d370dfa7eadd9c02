"""The aggregation chain's stages, each with a fake inner sum (not a whole server), against hand-computed values;
the chain's state round-trips through a checkpoint; the server names no DP or SecAgg branch."""
from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
import torch

from fedfm.aggregation import Stage, Updates
from fedfm.aggregation.chain import (ClippedSum, FedBuffMean, MinClients, ServerStep, UpdateCheck, Validate,
                                     build_chain)
from fedfm.aggregation.server_opt import FedAvgM
from fedfm.client import ClientResult
from fedfm.compression import make_codec
from fedfm.config import load_config
from fedfm.models.ranks import FullView
from fedfm.models.state import StateSpec
from fedfm.privacy.dp import DPFedAvg


class Fake(Stage):
    """A fake inner sum: records what it was given, returns ``result`` (or a function of the updates) and
    ``measurements``; its state counts its calls."""

    def __init__(self, result=None, measurements=None):
        self.result, self.measurements, self.seen = result, measurements or {}, []

    def init(self):
        return {"calls": 0}

    def __call__(self, state, u, weights):
        self.seen.append((u, weights))
        result = self.result(u, weights) if callable(self.result) else self.result
        return {"calls": state["calls"] + 1}, result, dict(self.measurements)


def _u(flat=None, results=(), rnd=1, dim=2):
    return Updates(rnd=rnd, results=list(results), x=torch.zeros(dim), spec=None, flat=flat,
                   ranks=[] if flat is None else [0] * len(flat))


class _P:  # a privacy config section
    clip, target_quantile, clip_lr, count_noise, delta = 1.0, None, 0.2, None, 1e-5


def test_dp_wrapper_with_no_noise_is_the_clipped_sum_over_the_expected_clients():
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]])  # norms 5, 0.5, 2: the first and last clipped to 1
    dp = DPFedAvg(_P(), noise_multiplier=0.0, denominator=4.0, seed=0, inner=ClippedSum())
    state, delta, m = dp(dp.init(), _u(updates), None)
    # (0.6 + 0.3 + 0, 0.8 + 0.4 - 1) / E[K] = (0.9, 0.2) / 4
    assert torch.allclose(delta, torch.tensor([0.225, 0.05]))
    assert m == {"dp_clip": 1.0, "dp_noise_std": 0.0} and state == {"C": 1.0, "inner": {}}


def test_dp_wrapper_asks_its_inner_sum_to_clip_noises_once_and_reports_the_accountant():
    class Accountant:
        def epsilon(self, rounds, delta):
            return 0.5 * rounds

    total = torch.tensor([0.5, -1.0], dtype=torch.float64)
    central = DPFedAvg(_P(), 2.0, 4.0, seed=0, inner=Fake(total), accountant=Accountant())
    _, delta, m = central(central.init(), _u(rnd=3), None)
    u, weights = central.inner.seen[0]
    assert u.clip == 1.0 and u.noise_share is None and weights is None  # DP-FedAvg weighs every client alike
    noise = delta - (total / 4).float()
    assert noise.abs().min() > 0 and m["dp_noise_std"] == 2.0 * 1.0 / 4  # central noise N(0, (zC)²) / E[K]
    assert (m["epsilon"], m["delta"]) == (1.5, 1e-5)
    # distributed noise: the 3 clients' shares are in the inner sum already; the wrapper adds none
    shared = DPFedAvg(_P(), 2.0, 4.0, seed=0, inner=Fake(total, {"noise_shares": 3}), noise_shares=3)
    _, delta, m = shared(shared.init(), _u(), None)
    assert shared.inner.seen[0][0].noise_share == pytest.approx(2.0 * 1.0 / math.sqrt(3))  # z C / √m each
    assert torch.equal(delta, (total / 4).float()) and "noise_shares" not in m
    assert m["dp_noise_std"] == pytest.approx(2.0 / math.sqrt(3) * math.sqrt(3) / 4)


def test_dp_wrapper_releases_noise_only_when_its_inner_sum_gives_nothing():
    dp = DPFedAvg(_P(), 2.0, 4.0, seed=0, inner=Fake(None, {"unchanged": "aborted"}), noise_shares=3)
    _, delta, m = dp(dp.init(), _u(dim=20_000), None)
    assert m["dp_noise_only"]  # and the noise is central, N(0, (zC)²) / E[K], as no client added a share:
    assert float(delta.std()) == pytest.approx(2.0 * 1.0 / 4, rel=0.05)


def test_adaptive_clipping_moves_c_in_the_state():
    class P(_P):
        target_quantile, count_noise = 0.5, 1e-12  # (nearly) no noise on the count

    dp = DPFedAvg(P(), 0.0, 2.0, seed=0, inner=ClippedSum())
    state, _, m = dp(dp.init(), _u(torch.tensor([[3.0, 4.0], [6.0, 8.0]])), None)
    # both clipped: b̄ = Σ(b_k − ½) / E[K] + ½ = −1/2 + ½ = 0; C ← C · exp(−η (b̄ − γ)) = exp(0.2 · 0.5)
    assert m["dp_unclipped_fraction"] == pytest.approx(0.0, abs=1e-9) and state["C"] == pytest.approx(math.exp(0.1))


def test_staleness_wrapper_divides_by_the_buffer_including_a_rejected_update():
    class Check:
        def __call__(self, res):
            if res.num_examples == 99:
                from fedfm.errors import UpdateRejected

                raise UpdateRejected("too big")
            return torch.full((2,), float(res.client_id)), {}

        def rank(self, client_id):
            return None

    mean = Fake(lambda u, w: (w.float() / w.float().sum()) @ u.flat)  # the inner weighted mean
    chain = Validate(Check(), FedBuffMean(mean))
    results = [ClientResult(1, b"", 5), ClientResult(2, b"", 99), ClientResult(3, b"", 5),
               ClientResult(4, error="crashed")]
    _, delta, m = chain(chain.init(), _u(results=results), [1.0, 0.5, 0.25, 0.0])
    # K = 3 buffered (the crashed one is not buffered; the rejected one is): (1·1 + 0.25·3) / 3
    assert torch.allclose(delta, torch.full((2,), 1.75 / 3))
    assert [d["id"] for d in m["dropped"]] == [2, 4] and m["dropped"][0]["error"] == "rejected: too big"
    assert [r.client_id for r, _ in m["accepted"]] == [1, 3]


def test_server_step_with_fedavgm_two_steps_by_hand():
    deltas = iter([torch.tensor([0.2, 0.4]), None, torch.tensor([0.0, -0.4])])
    step = ServerStep(FedAvgM(lr=0.5, momentum=0.9), Fake(lambda u, w: next(deltas)))
    state = step.init()
    assert state == {"optimizer": {"m": None}, "inner": {"calls": 0}}
    state, x, _ = step(state, Updates(1, [], torch.tensor([1.0, -1.0]), None), None)  # m = [0.2, 0.4]
    assert torch.allclose(x, torch.tensor([1.1, -0.8]))
    state, none, _ = step(state, Updates(2, [], x, None), None)  # no update: no step, the momentum stays
    assert none is None and torch.allclose(state["optimizer"]["m"], torch.tensor([0.2, 0.4]))
    state, x, _ = step(state, Updates(3, [], x, None), None)  # m = 0.9·[0.2, 0.4] + [0, −0.4] = [0.18, −0.04]
    assert torch.allclose(x, torch.tensor([1.19, -0.82])) and state["inner"] == {"calls": 3}


def test_min_clients_gives_no_update_and_says_why():
    stage = MinClients(2, Fake(torch.ones(2)))
    state, result, m = stage(stage.init(), Updates(1, [], torch.zeros(2), None, accepted=[(None, {})]), None)
    assert result is None and m["unchanged"] == "only 1 client(s) returned a usable update (federation.min_clients=2)"
    assert stage.inner.seen == [] and state == {"inner": {"calls": 0}}


def test_validation_drops_a_nan_and_a_wrong_shape_update_with_their_reasons():
    spec = StateSpec(torch.nn.Linear(2, 1))
    codec = make_codec("fp32")
    check = UpdateCheck(codec, spec, lambda cid: FullView(spec), max_update_norm=10.0)
    good = {n: torch.ones(s) for n, s in spec.shapes.items()}
    nan = {**good, "weight": torch.tensor([[1.0, float("nan")]])}
    wide = {**good, "weight": torch.ones(1, 3)}
    big = {n: t * 100 for n, t in good.items()}
    results = [ClientResult(0, codec.encode(good), 3), ClientResult(1, codec.encode(nan), 3),
               ClientResult(2, codec.encode(wide), 3), ClientResult(3, codec.encode(big), 3),
               ClientResult(4, codec.encode(good), 0)]
    inner = Fake(torch.zeros(3))
    chain = Validate(check, inner)
    _, _, m = chain(chain.init(), Updates(1, results, torch.zeros(3), spec), None)
    errors = {d["id"]: d["error"] for d in m["dropped"]}
    assert errors == {1: "rejected: weight: non-finite values",
                      2: "rejected: weight: shape (1, 3), expected (1, 2)",
                      3: "rejected: L2 norm 173.2 above server.max_update_norm=10",
                      4: "rejected: num_examples must be positive, got 0"}
    u, w = inner.seen[0]
    assert torch.equal(u.flat, torch.ones(1, 3)) and torch.equal(w, torch.tensor([3.0], dtype=torch.float64))


def _config(*overrides):
    return load_config("bbc-lora", ["model.name_or_path=null", 'model.from_config={"model_type": "bert"}',
                                    *overrides])


class _Mechanism:
    noise_multiplier, per_round = 0.5, 3

    def epsilon(self, rounds, delta):
        return float(rounds)


def _names(stage) -> list[str]:
    out = []
    while stage is not None:
        out.append(type(stage).__name__)
        stage = getattr(stage, "inner", None)
    return out


def test_the_chain_of_each_config():
    check = UpdateCheck(make_codec("fp32"), StateSpec(torch.nn.Linear(2, 1)), None, None)
    assert _names(build_chain(_config(), check)) == ["ServerStep", "Validate", "MinClients", "Reduce"]
    assert _names(build_chain(_config("server.aggregator=norm-bound", "server.norm_bound=1"), check)) == \
        ["ServerStep", "Validate", "MinClients", "NormBound", "Reduce"]
    assert _names(build_chain(_config("federation.schedule=fedbuff"), check)) == \
        ["ServerStep", "Validate", "MinClients", "FedBuffMean", "Reduce"]
    dp = ["privacy.mode=client", "privacy.noise_multiplier=0.5"]
    assert _names(build_chain(_config(*dp), check, _Mechanism())) == \
        ["ServerStep", "DPFedAvg", "Validate", "ClippedSum"]
    assert _names(build_chain(_config("secagg.enabled=true"), check)) == ["ServerStep", "SecureSum"]
    cfg = _config(*dp, "secagg.enabled=true", "secagg.dp_noise=distributed")
    chain = build_chain(cfg, check, _Mechanism())  # the clients add the noise, in min_clients shares or more
    assert _names(chain) == ["ServerStep", "DPFedAvg", "SecureSum"]
    assert chain.inner.noise_shares == cfg.federation.min_clients


def test_the_chain_state_round_trips_through_a_checkpoint():
    spec, codec = StateSpec(torch.nn.Linear(2, 1)), make_codec("fp32")
    check = UpdateCheck(codec, spec, lambda cid: FullView(spec), None)
    cfg = _config("privacy.mode=client", "privacy.noise_multiplier=0.5", "privacy.target_quantile=0.5",
                  "privacy.count_noise=1", "privacy.randomness=seeded", "server.optimizer=fedadam")
    chain = build_chain(cfg, check, _Mechanism())
    g = torch.Generator().manual_seed(0)
    results = [[ClientResult(k, codec.encode(spec.unflatten(torch.randn(3, generator=g))), 1) for k in range(3)]
               for _ in range(4)]

    def run(state, x, rounds):
        for r in rounds:
            state, x, _ = chain(state, Updates(r, results[r], x, spec), None)
        return state, x

    state, x = run(chain.init(), torch.zeros(3), [0, 1])
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["inner"]["C"] != 1.0 and loaded["optimizer"]["v"] is not None  # adaptive C, FedAdam's moments
    assert torch.equal(run(loaded, x, [2, 3])[1], run(state, x, [2, 3])[1])


def test_the_server_names_no_dp_or_secagg_branch():
    source = (Path(__file__).parents[2] / "src" / "fedfm" / "server.py").read_text()
    assert not re.search(r"self\.dp\b|self\.secure\b|fixed_denominator|_aggregate_securely", source)
