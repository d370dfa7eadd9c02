"""Secure aggregation as a stage of the round: SecAgg+ between the clients' own parties gives the plain FedAvg /
DP-FedAvg update within the quantisation step, through the codecs; the server receives only masked vectors; a client
that drops after key sharing is unmasked out; DP noise is added after unmasking or by the clients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfm.client import ClientResult
from fedfm.privacy import secagg
from fedfm.simulation import Simulation, prepare


HONEST = {"secagg.corrupt_fraction": 0, "secagg.dropout_fraction": 0}  # what lets a 2-neighbour graph be safe


def _server(tiny_config, **ov):
    base = {"eval.every": 0, "partition.num_clients": 6, "federation.clients_per_round": 6}
    if ov.get("secagg.neighbours") == 2:
        base.update(HONEST)
    return Simulation(prepare(tiny_config(**{**base, **ov})))


def _results(server, seed=0, errors=()):
    """One made-up update per client, as that client's codec sends it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(len(server.data.clients)):
        if k in errors:
            out.append(ClientResult(client_id=k, error="crashed after ShareKeys", crashed=True))
            continue
        flat = torch.randn(server.spec.numel, generator=g) * 0.01
        out.append(ClientResult(client_id=k, update=server.codec.encode(server.spec.unflatten(flat)),
                                num_examples=10 + 7 * k, metrics={"train_loss": 1.0}))
    return out


@pytest.mark.parametrize("codec,neighbours", [("fp32", None), ("fp16", None), ("fp32", 2)])
def test_a_secure_round_gives_the_fedavg_update_within_the_quantisation_step(tiny_config, codec, neighbours):
    plain = _server(tiny_config, **{"codec.name": codec})
    secure = _server(tiny_config, **{"codec.name": codec, "secagg.enabled": True, "secagg.neighbours": neighbours})
    start = secure.global_flat.clone()
    assert torch.equal(plain.global_flat, start)
    row_p, row_s = plain.aggregate_results(1, _results(plain)), secure.aggregate_results(1, _results(secure))
    assert row_p["aggregated"] and row_s["aggregated"]
    assert row_s["secagg_included"] == 6 and row_s["secagg_clamped_fraction"] == 0
    step = row_s["secagg_step"]
    err = (secure.global_flat - plain.global_flat).abs().max()
    moved = (plain.global_flat - start).abs().max()
    assert moved > 1e-3 and err <= 6 * step / 0.1 + 1e-6  # Σ of 6 roundings of w_k Δ_k, ÷ Σ w_k (≥ 0.1)
    masked_vector_bytes = 6 * 4 * (secure.spec.numel + 2)
    assert row_s["bytes_up"] > masked_vector_bytes  # the protocol's messages are counted too


def test_the_server_receives_only_masked_vectors(tiny_config, monkeypatch):
    server = _server(tiny_config, **{"secagg.enabled": True})
    seen, inputs = [], {}
    real_collect, real_contrib = secagg.SecAggServer.masked_input_collection, None
    from fedfm.privacy import secure

    real_contrib = secure.SecureClient.contribution

    def spy_collect(self, msgs):
        msgs = list(msgs)
        seen.extend(msgs)
        return real_collect(self, msgs)

    def spy_contrib(self, flat, n, seed):
        x = real_contrib(self, flat, n, seed)
        inputs[self.party.u] = x
        return x

    monkeypatch.setattr(secagg.SecAggServer, "masked_input_collection", spy_collect)
    monkeypatch.setattr(secure.SecureClient, "contribution", spy_contrib)
    server.aggregate_results(1, _results(server))
    assert {m.u for m in seen} == set(range(6)) and all(isinstance(m, secagg.MaskedInput) for m in seen)
    for m in seen:
        y = secagg.from_bytes(m.y, 32, server.spec.numel + 2).astype(np.float64)
        x = inputs[m.u].astype(np.float64)
        n = len(y)  # bounds at 5 standard errors: a false alarm about once in 10^6 checks
        assert (y != x).mean() > 0.999
        assert abs(y.mean() / 2 ** 32 - 0.5) < 5 * 12 ** -0.5 / n ** 0.5  # uniform over the ring (std 1/√12)
        assert abs(np.corrcoef(x, y)[0, 1]) < 5 / n ** 0.5


def test_a_client_that_drops_after_sharing_keys_is_unmasked_out(tiny_config):
    plain = _server(tiny_config)
    secure = _server(tiny_config, **{"secagg.enabled": True})
    row_p = plain.aggregate_results(1, _results(plain, errors=(2,)))
    row_s = secure.aggregate_results(1, _results(secure, errors=(2,)))
    assert row_s["secagg_included"] == 5 and row_s["secagg_dropped"] == 1
    assert [d["id"] for d in row_s["dropped"]] == [d["id"] for d in row_p["dropped"]] == [2]
    assert torch.allclose(secure.global_flat, plain.global_flat, atol=1e-5)


def test_too_few_survivors_abort_the_round_and_keep_the_model(tiny_config):
    server = _server(tiny_config, **{"secagg.enabled": True, "secagg.neighbours": 2, "federation.min_clients": 1})
    before = server.global_flat.clone()
    row = server.aggregate_results(1, _results(server, errors=(0, 1, 2, 3)))
    assert not row["aggregated"] and "secagg_error" in row and torch.equal(server.global_flat, before)


def test_central_dp_noise_after_unmasking_equals_dp_fedavg(tiny_config):
    dp = {"privacy.mode": "client", "privacy.noise_multiplier": 1.0, "privacy.clip": 0.05,
          "privacy.randomness": "seeded"}  # the same noise draw on both sides
    plain = _server(tiny_config, **dp)
    secure = _server(tiny_config, **dp, **{"secagg.enabled": True})
    row_p, row_s = plain.aggregate_results(1, _results(plain)), secure.aggregate_results(1, _results(secure))
    assert row_s["epsilon"] == row_p["epsilon"] and "dp_clipped_fraction" not in row_s
    assert torch.allclose(secure.global_flat, plain.global_flat, atol=1e-6)  # same clipped sum, same noise draw


def test_distributed_noise_shares_add_up_to_the_accounted_noise(tiny_config):
    z, C, m = 2.0, 0.05, 3
    ov = {"privacy.mode": "client", "privacy.noise_multiplier": z, "privacy.clip": C, "secagg.enabled": True,
          "federation.min_clients": m}
    quiet = _server(tiny_config, **{**ov, "privacy.noise_multiplier": 0.0})
    noisy = _server(tiny_config, **{**ov, "secagg.dp_noise": "distributed"})
    quiet.aggregate_results(1, _results(quiet))
    row = noisy.aggregate_results(1, _results(noisy))
    noise = noisy.global_flat - quiet.global_flat  # the server optimizer is FedAvg with lr 1: the update itself
    want = z * C * (6 / m) ** 0.5 / noisy.server.mechanism.per_round  # six shares of variance (zC)²/m, ÷ E[K]
    assert row["dp_noise_std"] == pytest.approx(want)
    assert float(noise.std()) == pytest.approx(want, rel=0.1)
    assert "secagg_clamped_fraction" not in row  # under DP nothing but the noised update is unmasked


def test_a_secure_run_trains_like_the_plain_run(tiny_config):
    ov = {"federation.rounds": 3, "runtime.name": "batched", "eval.every": 3, "eval.initial": True}
    plain = _server(tiny_config, **ov).run()
    rows = _server(tiny_config, **ov, **{"secagg.enabled": True, "secagg.neighbours": 2}).run()
    assert rows[0]["round"] == 0 and all(r["aggregated"] and r["secagg_included"] == 6 for r in rows[1:])
    assert rows[-1]["eval_loss"] == pytest.approx(plain[-1]["eval_loss"], abs=1e-4)
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"]
    for r, p in zip(rows[1:], plain[1:]):  # the downlink counts the protocol's messages as well as the model
        assert r["secagg_bytes_down"] > 0 and r["bytes_down"] == p["bytes_down"] + r["secagg_bytes_down"]


@pytest.mark.parametrize("ov,needle", [({"server.aggregator": "median"}, "server.aggregator"),
                                       ({"client.algorithm": "scaffold"}, "unmasked"),
                                       ({"federation.schedule": "fedbuff"}, "synchronous"),
                                       ({"server.max_update_norm": 1.0}, "never sees one update"),
                                       ({"secagg.neighbours": 3}, "even")])
def test_secagg_config_errors_name_the_field(tiny_config, ov, needle):
    from fedfm.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        tiny_config(**{"secagg.enabled": True, **ov})


def test_the_stages_compose_sample_dp_then_secure_sum_through_a_lossy_codec_under_attack(tiny_config):
    """DP-SGD in the clients → fp16 codec → a sign-flipping client → SecAgg+ → FedAdam: one run, no special case."""
    server = _server(tiny_config, **{"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "codec.name": "fp16",
                                     "secagg.enabled": True, "secagg.neighbours": 2, "attack.kind": "sign-flip",
                                     "attack.fraction": 0.2, "server.optimizer": "fedadam", "federation.rounds": 2})
    rows = server.run()
    assert server.attack.malicious and all(r["aggregated"] and r["secagg_included"] == 6 for r in rows)
    assert rows[-1]["epsilon"] == pytest.approx(max(server.server.sample_eps.values())) and rows[-1]["epsilon"] > 0


# ------------------------------------------------------------------ what SecAgg+ promises, and its parameters

def test_the_graph_is_drawn_fresh_every_round_unless_seeded(tiny_config, monkeypatch):
    """The Harary graph's order comes from fresh randomness once the roster is fixed: colluders cannot know from the
    config where they will sit. Only privacy.randomness: seeded repeats it."""
    from fedfm.privacy import secure

    seeds = []
    real = secure.SecAggRound

    def spy(*a, **k):
        seeds.append(k["graph_seed"])
        return real(*a, **k)

    monkeypatch.setattr(secure, "SecAggRound", spy)
    for randomness in ("secret", "secret", "seeded", "seeded"):
        server = _server(tiny_config, **{"secagg.enabled": True, "privacy.randomness": randomness})
        server.aggregate_results(1, _results(server))
    assert seeds[0] != seeds[1] and seeds[2] == seeds[3]


def test_a_graph_two_colluders_can_cut_is_refused_and_the_chosen_one_holds(tiny_config):
    """n = 10, k = 2, t = 2 with 20% corrupt: two colluders on either side of a client cut the ring and hand the
    server the sums of the pieces. Refused at config time; left unset, k and t are chosen so that for every pair of
    colluders and every dropout, the honest survivors stay connected and no client has t corrupt neighbours."""
    from fedfm.errors import ConfigError
    from fedfm.privacy.secagg import SecAggConfig
    from fedfm.privacy.secure import graph_for
    from tests.conftest import reachable

    ten = {"partition.num_clients": 10, "federation.clients_per_round": 10, "secagg.enabled": True,
           "secagg.corrupt_fraction": 0.2, "secagg.dropout_fraction": 0.1}
    with pytest.raises(ConfigError, match=r"secagg.neighbours=2.*leaks more than the sum with probability up to 1"):
        prepare(tiny_config(**ten, **{"secagg.neighbours": 2}))
    cfg = prepare(tiny_config(**ten)).cfg
    b = graph_for(cfg.secagg, 10)
    assert (b.corrupt, b.dropouts) == (2, 1) and b.k < 9 and b.security <= 2.0 ** -40
    import itertools

    for seed in range(20):
        graph = SecAggConfig(tuple(range(10)), 4, k=b.k, t=b.t, graph_seed=seed).graph
        for removed in itertools.combinations(range(10), 3):  # 2 corrupt + 1 dropout, anywhere
            honest = set(range(10)) - set(removed)
            assert reachable(graph, honest) == honest
            for corrupt in itertools.combinations(removed, 2):
                assert all(len(graph[u] & set(corrupt)) < b.t for u in honest)


def test_an_aborted_secure_round_under_dp_releases_noise_only(tiny_config):
    """Whether a round aborts depends on who took part; under DP-FedAvg the model must not show it: the server
    releases N(0, (zC)²)/E[K], as the plain path does when no client answers."""
    ov = {"privacy.mode": "client", "privacy.noise_multiplier": 1.0, "privacy.clip": 0.05, "secagg.enabled": True,
          "secagg.neighbours": 2, "federation.min_clients": 1}
    server = _server(tiny_config, **ov)
    before = server.global_flat.clone()
    row = server.aggregate_results(1, _results(server, errors=(0, 1, 2, 3)))
    assert "secagg_error" in row and row["aggregated"] and row["dp_noise_only"]
    moved = server.global_flat - before
    assert float(moved.std()) == pytest.approx(1.0 * 0.05 / server.server.mechanism.per_round, rel=0.15)


def test_clients_refuse_to_unmask_a_sum_with_too_few_noise_shares(tiny_config):
    """Distributed noise: each of m = federation.min_clients inputs carries a share; with fewer survivors the sum would
    carry less noise than accounted, so the clients refuse to unmask it and the server releases its own noise."""
    ov = {"privacy.mode": "client", "privacy.noise_multiplier": 1.0, "privacy.clip": 0.05, "secagg.enabled": True,
          "secagg.dp_noise": "distributed", "federation.min_clients": 5, "secagg.corrupt_fraction": 0,
          "secagg.dropout_fraction": 0.4}
    server = _server(tiny_config, **ov)
    row = server.aggregate_results(1, _results(server, errors=(0, 1)))  # 4 masked inputs < 5
    assert row["dp_noise_only"] and "refuses Unmasking: only 4 masked inputs" in str(row["dropped"])
    assert "secagg_included" not in row  # nothing was unmasked


def test_a_round_too_small_for_any_safe_graph_releases_noise_only_and_the_run_goes_on(tiny_config):
    """With Poisson sampling a round can draw 2 clients, one of which may be corrupt (⌈0.05·2⌉ = 1): no threshold
    keeps the other's input secret, so nothing is summed; under DP the round still releases noise."""
    server = _server(tiny_config, **{"privacy.mode": "client", "privacy.noise_multiplier": 1.0, "privacy.clip": 0.05,
                                     "secagg.enabled": True, "federation.min_clients": 1,
                                     "secagg.corrupt_fraction": 0.05})
    row = server.aggregate_results(1, _results(server)[:2])
    assert "no threshold" in row["secagg_error"] and row["dp_noise_only"] and row["aggregated"]
