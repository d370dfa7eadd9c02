"""client.lr_decay: round t trains at η γ^(t−1) (Li et al. 2020), in local training and in SCAFFOLD's c_i⁺; FedKSeed,
whose pairs are replayed at one rate, refuses it."""
import pytest
import torch

from fedfm.client import ClientTask, round_lr
from fedfm.config import ClientConfig
from fedfm.errors import ConfigError
from fedfm.simulation import Simulation, prepare

ONE_SGD_STEP = {"client.optimizer": "sgd", "client.grad_clip": None, "client.batch_size": 8, "client.steps": 1,
                "client.epochs": None}


def test_round_lr_by_hand():
    c = ClientConfig(lr=0.01, lr_decay=0.5)
    assert [round_lr(c, t) for t in (1, 2, 3, 4)] == pytest.approx([0.01, 0.005, 0.0025, 0.00125])
    assert round_lr(ClientConfig(lr=0.01), 7) == 0.01  # the default γ = 1: one rate in every round


def _update(tiny_config, rnd: int, **over) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One client's decoded update in round ``rnd`` (the same start, batch and seed whatever the round), and its
    stored SCAFFOLD c_i⁺ when it runs SCAFFOLD."""
    server = Simulation(prepare(tiny_config(**{**ONE_SGD_STEP, **over})))
    ctx, spec, algo = server.ctx, server.spec, server.client_algo
    x = spec.get()
    extras = {}
    if hasattr(algo, "KEY"):  # scaffold: c = c_i = 0, so c_i⁺ = (x − y)/(K η_t)
        extras = {"c": ctx.codec.encode({n: torch.zeros(spec.shapes[n]) for n in spec.names})}
    res = algo(ClientTask(client_id=1, round=rnd, payload=ctx.codec.encode(x), seed=11, extras=extras))
    assert res.error is None, res.error
    stored = ctx.store.get(1) or {}
    return spec.flatten(ctx.codec.decode(res.update, spec)), stored.get(getattr(algo, "KEY", ""))


def test_round_three_steps_at_the_decayed_rate(tiny_config):
    decayed, _ = _update(tiny_config, 3, **{"client.lr": 0.1, "client.lr_decay": 0.5})
    first, _ = _update(tiny_config, 1, **{"client.lr": 0.1, "client.lr_decay": 0.5})
    constant, _ = _update(tiny_config, 3, **{"client.lr": 0.025})  # 0.1 · 0.5² at a constant rate
    assert decayed.abs().max() > 0
    assert torch.allclose(decayed, constant, atol=1e-7)
    assert torch.allclose(decayed, 0.25 * first, atol=1e-7)  # one SGD step: Δ = −η_t g


def test_scaffold_control_variate_divides_by_the_rounds_rate(tiny_config):
    """c_i⁺ = (x − y)/(K η_t) is the gradient g of the one step whatever η_t: with client.lr in place of η_t it would
    be 4 times smaller in round 3."""
    over = {"client.algorithm": "scaffold", "client.lr": 0.1, "client.lr_decay": 0.5}
    _, c_round3 = _update(tiny_config, 3, **over)
    _, c_round1 = _update(tiny_config, 1, **over)
    assert c_round3.abs().max() > 0
    assert torch.allclose(c_round3, c_round1, atol=1e-5, rtol=1e-4)


def test_an_algorithm_with_one_rate_refuses_a_decay(tiny_config):
    fedkseed = {"client.algorithm": "fedkseed", "client.optimizer": "sgd", "client.lr": 1e-5}
    with pytest.raises(ConfigError, match="client.lr_decay: client.algorithm 'fedkseed': the server and every client "
                                          "replay the seed pairs at client.lr"):
        tiny_config(**fedkseed, **{"client.lr_decay": 0.8})
    assert tiny_config(**fedkseed).client.lr_decay == 1
    with pytest.raises(ConfigError, match="client.lr_decay"):
        tiny_config(**{"client.lr_decay": 0.0})
