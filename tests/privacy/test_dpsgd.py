"""Sample-level DP-SGD in each client: Opacus's per-example gradients of LoRA equal one-example-at-a-time gradients;
a step clips every example to C, adds noise of std z·C and divides by the expected batch size; each client's ε
equals dp-accounting called directly; the run reports the worst client's ε, stops clients past their budget, and
composes with a robust aggregator."""
from __future__ import annotations

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import rdp

from fedfm.client import make_optimizer
from fedfm.privacy.dpsgd import SampleLevelDP, dp_sgd, per_example_gradients
from fedfm.simulation import Simulation, prepare


def _server(tiny_config, **ov):
    base = {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "privacy.clip": 0.5, "eval.every": 0}
    return Simulation(prepare(tiny_config(**{**base, **ov})))


def test_per_example_gradients_of_lora_equal_one_example_at_a_time(tiny_config):
    server = _server(tiny_config, **{"adapter.method": "lora"})
    model, task, ctx = server.model, server.task, server.ctx
    params = ctx.train_params()
    assert any("lora_A" in n for n in server.spec.names) and any("lora_B" in n for n in server.spec.names)
    own = server.local[0]
    rows = torch.as_tensor(task.rows(own.encoded, own.train)[:5])
    batch = task.collate(own.encoded, rows)
    model.train()
    with per_example_gradients(model):
        task.segment_losses(model, batch, [1] * len(rows)).sum().backward()
        per_example = [p.grad_sample.clone() for p in params]
        for p in params:
            p.grad, p.grad_sample = None, None
        for i in range(len(rows)):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            task.segment_losses(model, one, [1]).sum().backward()
            for p, g in zip(params, per_example):
                assert torch.allclose(p.grad, g[i], atol=1e-6, rtol=1e-4)
                p.grad, p.grad_sample = None, None
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks and buffers removed after


def _manual_clipped_mean(server, rows, C, B):
    """(Σ_i g_i · min(1, C / ‖g_i‖)) / B, one example at a time with plain autograd."""
    params, task, model = server.ctx.train_params(), server.task, server.model
    total = [torch.zeros_like(p) for p in params]
    for r in rows:
        for p in params:
            p.grad = None
        task.segment_losses(model, task.collate(server.local[0].encoded, torch.as_tensor([r])), [1]).sum().backward()
        g = [p.grad.clone() for p in params]
        norm = torch.sqrt(sum((x ** 2).sum() for x in g))
        for t, x in zip(total, g):
            t += x * min(1.0, C / float(norm))
    for p in params:
        p.grad = None
    return [t / B for t in total]


@pytest.mark.parametrize("method", ["lora", "bitfit", "prefix", "ia3", "prompt"])
def test_a_dp_sgd_step_clips_each_example_then_adds_noise_of_std_zC_over_B(tiny_config, method):
    """Through Opacus's hooks (lora, bitfit, prefix) or, where they miss a parameter (ia3's vectors, prompt
    embeddings), one backward pass per example: the same clipped mean either way."""
    from fedfm.privacy.dpsgd import _HOOKS_MISS

    C = 0.05  # small enough that every example is clipped
    server = _server(tiny_config, **{"client.optimizer": "sgd", "client.lr": 1.0, "client.batch_size": 1000,
                                     "privacy.clip": C, "adapter.method": method})
    ctx, model = server.ctx, server.model
    params = ctx.train_params()
    indices = server.local[0].train
    rows = server.task.rows(server.local[0].encoded, indices)
    B = 1000  # the expected batch size; with n ≤ B every example is in the Poisson sample (q = 1)
    model.train()
    expected = _manual_clipped_mean(server, rows, C, B)
    start = [p.detach().clone() for p in params]

    def step(z: float, seed: int) -> list[torch.Tensor]:
        for p, s in zip(params, start):
            p.data.copy_(s)
        dp_sgd(ctx, server.local[0], torch.Generator().manual_seed(0), seed, 1, z, None, make_optimizer)
        return [s - p.detach() for p, s in zip(params, start)]  # SGD, lr 1: the step is the gradient

    for got, want in zip(step(0.0, 1), expected):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    assert (model in _HOOKS_MISS) == (method in ("ia3", "prompt"))
    z = 3.0
    noise = torch.cat([(got - want).flatten() for got, want in zip(step(z, 2), expected)])
    n = noise.numel()
    assert n > 200
    assert float(noise.std()) == pytest.approx(z * C / B, rel=5 / (2 * n) ** 0.5)  # 5 standard errors
    assert abs(float(noise.mean())) < 4 * z * C / B / noise.numel() ** 0.5


@pytest.mark.parametrize("n,B,steps,z,delta", [(100, 10, 50, 1.0, 1e-5), (1000, 16, 600, 0.8, 1e-6), (40, 8, 5, 2.0, 1e-5)])
def test_each_clients_epsilon_equals_dp_accounting_called_directly(n, B, steps, z, delta):
    mech = SampleLevelDP(z, 1.0, B, np.array([n, 4 * n]), np.array([steps, steps]))
    acc = rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(B / n, dpa.GaussianDpEvent(z)), steps))
    assert mech.epsilon(0, steps, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert mech.epsilon(1, steps, delta) < mech.epsilon(0, steps, delta)  # more data, lower q, less ε
    assert mech.worst_epsilon(3, delta) == pytest.approx(mech.epsilon(0, 3 * steps, delta))
    derived = mech.noise_for(4.0, delta, rounds=3)
    assert mech.worst_epsilon(3, delta, derived) <= 4.0 + 1e-6
    assert mech.worst_epsilon(3, delta, derived * 0.95) > 4.0  # the smallest such z, not just any


def test_a_sample_dp_run_reports_the_worst_clients_epsilon(tiny_config):
    server = _server(tiny_config, **{"federation.rounds": 3, "federation.clients_per_round": 2})
    rows = server.run()
    sd = server.server.sample_dp
    for k, eps in server.server.sample_eps.items():  # every client's own accountant, as dp-accounting computes it
        steps = int(server.store.get(k)["dp_steps"][0])
        assert steps == server.server.sample_steps[k] and steps % int(sd.steps[k]) == 0
        assert eps == pytest.approx(sd.epsilon(k, steps, 1e-5))
    assert rows[-1]["epsilon"] == pytest.approx(max(server.server.sample_eps.values()))
    assert [r["epsilon"] for r in rows] == sorted(r["epsilon"] for r in rows) and rows[0]["epsilon"] > 0
    assert rows[-1]["epsilon"] <= sd.worst_epsilon(3, 1e-5) + 1e-9
    assert all(r["aggregated"] for r in rows)


def test_a_client_refuses_the_round_past_its_budget_and_the_run_stops(tiny_config):
    probe = _server(tiny_config).server.sample_dp
    target = probe.worst_epsilon(2, 1e-5) * 1.001  # the worst-off client can afford two rounds, not three
    server = _server(tiny_config, **{"federation.rounds": 12, "federation.clients_per_round": 4,
                                     "privacy.target_epsilon": target})
    rows = server.run()
    refused = [d for r in rows for d in r["dropped"] if "privacy budget spent" in d["error"]]
    assert refused and all(e <= target for e in server.server.sample_eps.values())
    assert len(rows) < 12  # stopped once no client had a round left
    assert max(r["epsilon"] for r in rows) <= target


def test_sample_dp_composes_with_a_robust_aggregator_and_runs_one_client_at_a_time(tiny_config):
    server = _server(tiny_config, **{"server.aggregator": "median", "runtime.name": "batched",
                                     "federation.rounds": 2})
    assert "privacy.mode 'sample'" in server.runtime.reason
    rows = server.run()
    assert all(r["aggregated"] for r in rows) and rows[-1]["epsilon"] > 0


@pytest.mark.parametrize("ov,needle", [({"privacy.noise_multiplier": None}, "needs privacy.noise_multiplier"),
                                       ({"client.grad_accum": 2}, "client.grad_accum=1"),
                                       ({"privacy.target_quantile": 0.5}, "adaptive clipping")])
def test_sample_dp_config_errors_name_the_field(tiny_config, ov, needle):
    from fedfm.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match=needle):
        tiny_config(**{"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, **ov})


def test_the_privacy_command_reports_the_worst_clients_epsilon(tiny_config, tmp_path):
    from tests.conftest import privacy_command

    cfg = tiny_config(**{"privacy.mode": "sample", "privacy.noise_multiplier": 1.1, "federation.rounds": 5})
    out = privacy_command(cfg, tmp_path)
    assert out.exit_code == 0, out.output
    sd = prepare(cfg).sample_dp
    assert f"{sd.worst_epsilon(5, 1e-5):.4g}" in out.output and "one training example" in out.output
