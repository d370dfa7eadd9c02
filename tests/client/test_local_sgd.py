"""Local training: gradient accumulation equals the large batch; steps mode; clipping bounds the step."""
import numpy as np
import torch

from fedfm.client import ClientTask, local_sgd, make_client
from fedfm.simulation import Simulation, prepare


def _train(tiny_config, **over):
    server = Simulation(prepare(tiny_config(**{"client.optimizer": "sgd", "client.grad_clip": None, **over})))
    start = server.spec.flat().clone()
    gen = torch.Generator().manual_seed(7)
    loss, steps = local_sgd(server.ctx, server.local[0], server.local[0].train[:16], gen)
    return server.spec.flat() - start, steps


def test_accumulation_matches_the_large_batch(tiny_config):
    big, s_big = _train(tiny_config, **{"client.batch_size": 8})
    acc, s_acc = _train(tiny_config, **{"client.batch_size": 4, "client.grad_accum": 2})
    assert s_big == s_acc == 2
    assert torch.allclose(big, acc, atol=1e-6, rtol=1e-4)
    small, _ = _train(tiny_config, **{"client.batch_size": 4})
    assert not torch.allclose(big, small, atol=1e-6)


def test_steps_mode_counts_optimizer_steps(tiny_config):
    _, steps = _train(tiny_config, **{"client.batch_size": 4, "client.steps": 7, "client.epochs": None})
    assert steps == 7  # 16 examples / 4 = 4 per epoch: a second epoch supplies the rest


def test_grad_clip_bounds_the_sgd_step(tiny_config):
    lr, clip = 0.5, 1e-3
    delta, steps = _train(tiny_config, **{"client.batch_size": 16, "client.lr": lr, "client.grad_clip": clip})
    assert steps == 1
    assert float(delta.norm()) <= lr * clip * (1 + 1e-4)


def test_client_delta_is_local_minus_global(tiny_config):
    server = Simulation(prepare(tiny_config()))
    g = server.spec.get()
    payload = server.codec.encode(g)
    res = make_client(server.ctx)(ClientTask(client_id=1, round=1, payload=payload, seed=3))
    delta = server.codec.decode(res.update, server.spec)
    local = server.spec.get()
    for n in server.spec.names:
        assert torch.allclose(delta[n], local[n] - g[n])
    assert res.num_examples == len(server.data.clients[1].train) == len(server.local[1].train)
