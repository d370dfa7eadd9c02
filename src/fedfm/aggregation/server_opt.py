"""Server optimizers: turn the aggregated delta Δ_t into the new global state x_{t+1} (on flat buffers); the last
stage of the aggregation chain (``chain.ServerStep``).

Δ_t is the (weighted) mean of the clients' x_k − x_t, i.e. minus the "pseudo-gradient" of Reddi et al. 2021; every
optimizer here is written in Δ so it reads like Algorithm 2 of that paper. An optimizer holds its hyperparameters;
its state (momentum m, second moment v: flat tensors, None before the first step) passes explicitly, as the chain's:
``init() -> state``, ``step(state, x, Δ) -> (state, x_new)``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..registry import Registry

SERVER_OPTIMIZERS: Registry[Callable[..., "ServerOptimizer"]] = Registry("server optimizer")

State = dict[str, Any]


class ServerOptimizer:
    buffers: tuple[str, ...] = ()  # the names of its flat state buffers

    def init(self) -> State:
        return {b: None for b in self.buffers}

    def step(self, state: State, x: torch.Tensor, delta: torch.Tensor) -> tuple[State, torch.Tensor]:
        raise NotImplementedError


class FedAvg(ServerOptimizer):
    """FedAvg (McMahan et al. 2017): x_{t+1} = x_t + η Δ_t, with server learning rate η (1 = plain averaging)."""

    def __init__(self, lr: float = 1.0):
        self.lr = lr

    def step(self, state, x, delta):
        return state, x + self.lr * delta


class FedAvgM(ServerOptimizer):
    """FedAvgM (Hsu et al. 2019): server momentum m_t = β m_{t−1} + Δ_t; x_{t+1} = x_t + η m_t."""

    buffers = ("m",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9):
        self.lr, self.beta = lr, momentum

    def step(self, state, x, delta):
        m = delta.clone() if state["m"] is None else self.beta * state["m"] + delta
        return {"m": m}, x + self.lr * m


class Nesterov(ServerOptimizer):
    """Nesterov outer step of DiLoCo (Douillard et al. 2023): SGD with Nesterov momentum on the outer gradient −Δ_t.

    m_t = μ m_{t−1} + Δ_t;  x_{t+1} = x_t + η (Δ_t + μ m_t)   (torch.optim.SGD(nesterov=True) applied to −Δ_t).
    """

    buffers = ("m",)

    def __init__(self, lr: float = 0.7, momentum: float = 0.9):
        self.lr, self.mu = lr, momentum

    def step(self, state, x, delta):
        m = delta.clone() if state["m"] is None else self.mu * state["m"] + delta
        return {"m": m}, x + self.lr * (delta + self.mu * m)


class _Adaptive(ServerOptimizer):
    """Algorithm 2 of Reddi et al. 2021: m_t = β1 m_{t−1} + (1−β1) Δ_t; v_t from ``second_moment``;
    x_{t+1} = x_t + η m_t / (√v_t + τ), with m_{−1} = 0 and v_{−1} = τ² (no bias correction, as in the paper)."""

    buffers = ("m", "v")

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, state, x, delta):
        m, v = state["m"], state["v"]
        if m is None:
            m, v = torch.zeros_like(delta), torch.full_like(delta, self.tau ** 2)
        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self.second_moment(v, delta * delta)
        return {"m": m, "v": v}, x + self.lr * m / (v.sqrt() + self.tau)


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2021): v_t = v_{t−1} + Δ_t²."""

    def second_moment(self, v, d2):
        return v + d2


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al. 2021): v_t = β2 v_{t−1} + (1−β2) Δ_t²."""

    def second_moment(self, v, d2):
        return self.beta2 * v + (1 - self.beta2) * d2


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al. 2021): v_t = v_{t−1} − (1−β2) Δ_t² sign(v_{t−1} − Δ_t²)."""

    def second_moment(self, v, d2):
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)


@SERVER_OPTIMIZERS.register("fedavg")
def _fedavg(cfg) -> ServerOptimizer:
    return FedAvg(lr=cfg.server.lr)


@SERVER_OPTIMIZERS.register("fedavgm")
def _fedavgm(cfg) -> ServerOptimizer:
    return FedAvgM(lr=cfg.server.lr, momentum=cfg.server.momentum)


@SERVER_OPTIMIZERS.register("nesterov")
def _nesterov(cfg) -> ServerOptimizer:
    return Nesterov(lr=cfg.server.lr, momentum=cfg.server.momentum)


def _adaptive(cls):
    def make(cfg) -> ServerOptimizer:
        s = cfg.server
        return cls(lr=s.lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau)

    return make


SERVER_OPTIMIZERS.register("fedadagrad")(_adaptive(FedAdagrad))
SERVER_OPTIMIZERS.register("fedadam")(_adaptive(FedAdam))
SERVER_OPTIMIZERS.register("fedyogi")(_adaptive(FedYogi))


def make_server_optimizer(cfg) -> ServerOptimizer:
    return SERVER_OPTIMIZERS.get(cfg.server.optimizer)(cfg)
