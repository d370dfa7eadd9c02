"""Server optimizers: turn the aggregated delta into the new global state (on flat buffers)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..registry import Registry

SERVER_OPTIMIZERS: Registry[Callable[..., "ServerOptimizer"]] = Registry("server optimizer")


class ServerOptimizer:
    def step(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FedAvg(ServerOptimizer):
    """FedAvg (McMahan et al. 2017): x_{t+1} = x_t + η_s Δ_t, with server learning rate η_s (1 = plain averaging)."""

    def __init__(self, lr: float = 1.0):
        self.lr = lr

    def step(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return x + self.lr * delta


@SERVER_OPTIMIZERS.register("fedavg")
def _fedavg(cfg) -> ServerOptimizer:
    return FedAvg(lr=cfg.server.lr)


def make_server_optimizer(cfg) -> ServerOptimizer:
    return SERVER_OPTIMIZERS.get(cfg.server.optimizer)(cfg)
