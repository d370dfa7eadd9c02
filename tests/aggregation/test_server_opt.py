"""Server optimizers against numbers worked by hand and against independent references (torch.optim, numpy)."""
import io
import math

import numpy as np
import pytest
import torch

from fedfm.aggregation.server_opt import (SERVER_OPTIMIZERS, FedAdagrad, FedAdam, FedAvgM, FedYogi, Nesterov,
                                          make_server_optimizer)
from fedfm.config import load_config


def _steps(opt, x, deltas):
    """x after one step per delta, and the optimizer's state, threaded through as the chain threads it."""
    state = opt.init()
    for d in deltas:
        state, x = opt.step(state, x, d)
    return x, state


def test_fedavgm_by_hand():
    opt = FedAvgM(lr=0.5, momentum=0.9)
    x, state = _steps(opt, torch.tensor([1.0, -1.0]), [torch.tensor([0.2, 0.4])])  # m = [0.2, 0.4]; x = [1.1, -0.8]
    assert torch.allclose(x, torch.tensor([1.1, -0.8]))
    state, x = opt.step(state, x, torch.tensor([0.0, -0.4]))  # m = [0.18, -0.04]; x = [1.19, -0.82]
    assert torch.allclose(x, torch.tensor([1.19, -0.82])) and torch.allclose(state["m"], torch.tensor([0.18, -0.04]))


def test_nesterov_equals_torch_sgd_nesterov_on_the_outer_gradient():
    """DiLoCo's outer step is torch.optim.SGD(nesterov=True) applied to the outer gradient −Δ."""
    torch.manual_seed(0)
    deltas = [torch.randn(5) for _ in range(4)]
    x0 = torch.randn(5)
    p = torch.nn.Parameter(x0.clone())
    ref = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    ours, x = Nesterov(lr=0.7, momentum=0.9), x0.clone()
    state = ours.init()
    for d in deltas:
        p.grad = -d.clone()
        ref.step()
        state, x = ours.step(state, x, d)
        assert torch.allclose(x, p.detach(), atol=1e-6)


def test_fedadam_two_steps_by_hand():
    # η=0.1, β1=0.9, β2=0.99, τ=0.1; v_{-1}=τ²=0.01, m_{-1}=0
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    x, state = _steps(opt, torch.tensor([0.0]), [torch.tensor([1.0])])
    # m0 = 0.1; v0 = 0.99*0.01 + 0.01*1 = 0.0199; x1 = 0.1*0.1/(sqrt(0.0199)+0.1)
    x1 = 0.1 * 0.1 / (math.sqrt(0.0199) + 0.1)
    assert x.item() == pytest.approx(x1, rel=1e-6)
    state, x = opt.step(state, x, torch.tensor([-2.0]))
    # m1 = 0.09 - 0.2 = -0.11; v1 = 0.99*0.0199 + 0.01*4 = 0.059701
    assert x.item() == pytest.approx(x1 + 0.1 * -0.11 / (math.sqrt(0.059701) + 0.1), rel=1e-6)


def test_fedyogi_and_fedadagrad_second_moments_by_hand():
    yogi = FedYogi(lr=0.1, beta1=0.0, beta2=0.9, tau=0.1)
    x, state = _steps(yogi, torch.tensor([0.0]), [torch.tensor([1.0])])
    # v0 = 0.01 - 0.1*1*sign(0.01-1) = 0.11 ; m0 = Δ (β1 = 0)
    assert state["v"].item() == pytest.approx(0.11)
    assert x.item() == pytest.approx(0.1 * 1.0 / (math.sqrt(0.11) + 0.1), rel=1e-6)
    state, _ = yogi.step(state, x, torch.tensor([0.1]))
    # v1 = 0.11 - 0.1*0.01*sign(0.11-0.01) = 0.109
    assert state["v"].item() == pytest.approx(0.109)
    ada = FedAdagrad(lr=0.1, beta1=0.0, beta2=0.9, tau=0.1)
    _, state = _steps(ada, torch.tensor([0.0]), [torch.tensor([1.0]), torch.tensor([-3.0])])
    assert state["v"].item() == pytest.approx(0.01 + 1.0 + 9.0)


def _numpy_reference(kind, deltas, x, lr, b1, b2, tau):
    """Reddi et al. 2021, Algorithm 2, written independently with numpy and scalar loops."""
    x = np.array(x, dtype=np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau ** 2)
    for d in deltas:
        d = np.asarray(d, dtype=np.float64)
        m = b1 * m + (1 - b1) * d
        for i in range(len(x)):
            if kind == "fedadagrad":
                v[i] = v[i] + d[i] ** 2
            elif kind == "fedadam":
                v[i] = b2 * v[i] + (1 - b2) * d[i] ** 2
            else:
                s = 1.0 if v[i] - d[i] ** 2 > 0 else (-1.0 if v[i] - d[i] ** 2 < 0 else 0.0)
                v[i] = v[i] - (1 - b2) * d[i] ** 2 * s
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_optimizers_match_an_independent_reference(kind):
    rng = np.random.default_rng(1)
    deltas = [rng.normal(size=6) * s for s in (1.0, 0.1, 2.0, 0.01, 0.5)]
    x0 = rng.normal(size=6)
    cfg = load_config("bbc-lora", [f"server.optimizer={kind}", "server.lr=0.05", "server.beta1=0.8",
                                   "server.beta2=0.95", "server.tau=0.01"])
    x, _ = _steps(make_server_optimizer(cfg), torch.tensor(x0, dtype=torch.float64), [torch.tensor(d) for d in deltas])
    ref = _numpy_reference(kind, deltas, x0, 0.05, 0.8, 0.95, 0.01)
    assert np.allclose(x.numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS.names())
def test_state_round_trips_so_a_resume_continues_exactly(name):
    cfg = load_config("bbc-lora", [f"server.optimizer={name}"])
    torch.manual_seed(0)
    deltas = [torch.randn(4) for _ in range(4)]
    opt = make_server_optimizer(cfg)
    x, state = _steps(opt, torch.zeros(4), deltas[:2])
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    xa, xb, sa, sb = x.clone(), x.clone(), state, loaded
    for d in deltas[2:]:
        (sa, xa), (sb, xb) = opt.step(sa, xa, d), opt.step(sb, xb, d)
    assert torch.equal(xa, xb)


def test_server_lr_defaults_per_optimizer_and_can_be_set():
    assert load_config("bbc-lora").server.lr == 1.0
    assert load_config("bbc-lora", ["server.optimizer=fedadam"]).server.lr == 0.01
    assert load_config("bbc-lora", ["server.optimizer=nesterov"]).server.lr == 0.1  # 1 − μ, tuned (DiLoCo's: 0.7)
    assert load_config("bbc-lora", ["server.optimizer=fedyogi", "server.lr=0.3"]).server.lr == 0.3


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS.names())
def test_each_server_optimizer_trains_through_the_yaml(tiny_config, name):
    from fedfm.simulation import Simulation, prepare

    cfg = tiny_config(**{"server.optimizer": name, "federation.rounds": 3, "federation.clients_per_round": 4,
                         "client.epochs": 2, "eval.initial": True})
    server = Simulation(prepare(cfg))
    start = server.global_flat.clone()
    rows = server.run()
    assert not torch.equal(server.global_flat, start)
    assert all(np.isfinite(r["eval_loss"]) for r in rows)
    if name != "fedavg":
        assert server.server.chain_state["optimizer"]["m"] is not None  # the optimizer kept state across rounds
