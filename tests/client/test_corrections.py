"""FedProx and SCAFFOLD against independent formulations of the same objective, and numbers worked by hand."""
import pytest
import torch

from fedfm.client import ClientTask, local_sgd
from fedfm.simulation import Simulation, prepare

SGD = {"client.optimizer": "sgd", "client.grad_clip": None, "client.batch_size": 8, "client.steps": 2,
       "client.epochs": None, "client.lr": 0.1}


def _server(tiny_config, **over):
    return Simulation(prepare(tiny_config(**{**SGD, **over})))


def _reference(server, cid, indices, extra_loss_of_params):
    """Plain local SGD on F_k(w) + extra(w), written as a loss (autograd differentiates the extra term)."""
    params = list(server.spec.params.values())
    gen = torch.Generator().manual_seed(11)
    local_sgd(server.ctx, server.local[cid], indices, gen, extra_loss=lambda: extra_loss_of_params(params))
    return server.spec.flat()


def test_fedprox_equals_sgd_on_the_proximal_objective(tiny_config):
    mu = 0.5
    server = _server(tiny_config, **{"client.algorithm": "fedprox", "client.mu": mu})
    x0 = server.spec.get()
    idx = server.local[0].train[:16]
    # nudge the start away from w^t so the proximal term is not zero at the first step
    anchor = {n: t + 0.05 * torch.randn_like(t, generator=torch.Generator().manual_seed(1)) for n, t in x0.items()}

    server.spec.load(x0)
    hook = server.client_algo.grad_hook(None, anchor)
    local_sgd(server.ctx, server.local[0], idx, torch.Generator().manual_seed(11), grad_hook=hook)
    ours = server.spec.flat()

    server.spec.load(x0)
    anchors = [anchor[n] for n in server.spec.names]
    ref = _reference(server, 0, idx, lambda ps: 0.5 * mu * sum(((p - a.to(p.device)) ** 2).sum() for p, a in zip(ps, anchors)))
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)
    server.spec.load(x0)
    plain = _reference(server, 0, idx, lambda ps: torch.zeros(()))
    assert not torch.allclose(ours, plain, atol=1e-5)  # the term did something


def test_scaffold_step_equals_sgd_on_the_linearly_corrected_objective(tiny_config):
    """SCAFFOLD's y ← y − η (g(y) − c_i + c) is SGD on F_k(y) + <c − c_i, y>; then c_i⁺ = c_i − c + (x − y)/(K η)."""
    server = _server(tiny_config, **{"client.algorithm": "scaffold"})
    spec, ctx, algo = server.spec, server.ctx, server.client_algo
    x = spec.get()
    g = torch.Generator().manual_seed(2)
    c = {n: 0.3 * torch.randn(spec.shapes[n], generator=g) for n in spec.names}
    c_i = {n: 0.3 * torch.randn(spec.shapes[n], generator=g) for n in spec.names}
    cid = 1
    ctx.store.put(cid, {algo.KEY: spec.flatten(c_i)})
    task = ClientTask(client_id=cid, round=1, payload=ctx.codec.encode(x), seed=11,
                      extras={"c": ctx.codec.encode(c)})
    res = algo(task)
    y = spec.flat()
    delta = spec.flatten(ctx.codec.decode(res.update, spec))
    assert torch.allclose(delta, y - spec.flatten(x), atol=1e-6)

    spec.load(x)
    corr = [c[n] - c_i[n] for n in spec.names]
    ref = _reference(server, cid, ctx.local[cid].train, lambda ps: sum((p * k.to(p.device)).sum() for p, k in zip(ps, corr)))
    assert torch.allclose(y, ref, atol=1e-6, rtol=1e-5)

    K, lr = res.metrics["steps"], 0.1
    assert K == 2
    want_c_i = spec.flatten(c_i) - spec.flatten(c) + (spec.flatten(x) - y) / (K * lr)
    assert torch.allclose(ctx.store.get(cid)[algo.KEY], want_c_i, atol=1e-5)
    got_dc = spec.flatten(ctx.codec.decode(res.extras["delta_c"], spec))
    assert torch.allclose(got_dc, want_c_i - spec.flatten(c_i), atol=1e-5)


def test_scaffold_server_control_variate_by_hand(tiny_config):
    server = _server(tiny_config, **{"client.algorithm": "scaffold"})
    spec, side = server.spec, server.server.algo_server
    n = len(server.data.clients)  # 4 clients
    d1 = spec.unflatten(torch.full((spec.numel,), 2.0))
    d2 = spec.unflatten(torch.full((spec.numel,), -1.0))
    side.c = torch.full((spec.numel,), 0.5)
    side.absorb([(None, {"delta_c": d1}), (None, {"delta_c": d2})])
    # c ← c + (1/N) Σ Δc_i = 0.5 + (2 − 1)/4
    assert n == 4 and torch.allclose(side.c, torch.full((spec.numel,), 0.75))


def test_scaffold_through_the_yaml_keeps_control_variates_and_doubles_upload(tiny_config):
    plain = Simulation(prepare(tiny_config(**{"federation.rounds": 2})))
    rows_plain = plain.run()
    server = Simulation(prepare(tiny_config(**{"federation.rounds": 2, "client.algorithm": "scaffold",
                                           "client.optimizer": "sgd", "client.lr": 0.05})))
    rows = server.run()
    sampled = {c for r in rows for c in r["clients"]}
    assert {cid for cid in sampled if server.store.get(cid) is not None} == sampled
    assert float(server.server.algo_server.c.abs().sum()) > 0
    assert rows[-1]["bytes_up"] == 2 * rows_plain[-1]["bytes_up"]  # Δy and Δc_i
    assert rows[-1]["bytes_down"] == 2 * rows_plain[-1]["bytes_down"]  # x and c
    assert rows[-1]["eval_loss"] == rows[-1]["eval_loss"]  # finite


def test_fedprox_through_the_yaml_differs_from_fedavg_and_mu_zero_is_fedavg(tiny_config):
    base = {"federation.rounds": 1}
    fedavg = Simulation(prepare(tiny_config(**base)))
    fedavg.run()
    prox0 = Simulation(prepare(tiny_config(**base, **{"client.algorithm": "fedprox", "client.mu": 0.0})))
    prox0.run()
    prox = Simulation(prepare(tiny_config(**base, **{"client.algorithm": "fedprox", "client.mu": 1.0})))
    prox.run()
    assert torch.allclose(prox0.global_flat, fedavg.global_flat, atol=1e-7)
    assert not torch.allclose(prox.global_flat, fedavg.global_flat, atol=1e-6)


def test_scaffold_option_two_holds_with_momentum_and_clipping(tiny_config):
    """With SGD momentum 0.9 and grad_clip 1.0, c_i⁺ is still the paper's c_i − c + (x − y)/(K η_l) (the mean of the
    raw gradients, which the old code took, is 52% off it here)."""
    server = _server(tiny_config, **{"client.algorithm": "scaffold", "client.momentum": 0.9, "client.grad_clip": 1.0,
                                     "client.steps": 4})
    spec, ctx, algo = server.spec, server.ctx, server.client_algo
    x = spec.get()
    g = torch.Generator().manual_seed(3)
    c = {n: 0.1 * torch.randn(spec.shapes[n], generator=g) for n in spec.names}
    task = ClientTask(client_id=2, round=1, payload=ctx.codec.encode(x), seed=5, extras={"c": ctx.codec.encode(c)})
    res = algo(task)
    y = spec.flat()
    K, lr = res.metrics["steps"], 0.1
    want = -spec.flatten(c) + (spec.flatten(x) - y) / (K * lr)  # c_i = 0 before
    assert K == 4 and torch.allclose(ctx.store.get(2)[algo.KEY], want, atol=1e-5)


@pytest.mark.parametrize("ov,needle", [
    ({"client.optimizer": "adamw"}, "client.optimizer 'adamw' is not covered"),
    ({"privacy.mode": "client", "privacy.noise_multiplier": 1.0}, "un-noised"),
])
def test_scaffold_refuses_what_its_analysis_and_the_accountant_do_not_cover(tiny_config, ov, needle):
    from fedfm.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        tiny_config(**{**SGD, "client.algorithm": "scaffold", **ov})
