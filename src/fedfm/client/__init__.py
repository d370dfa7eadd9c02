"""Client algorithms: what a client does with the global state. One registry, keyed by ``client.algorithm``."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..registry import Registry

CLIENT_ALGORITHMS: Registry[type] = Registry("client algorithm")


@dataclass
class ClientTask:
    """What the server sends one client for one round: the encoded global state and the round's settings."""

    client_id: int
    round: int
    payload: bytes
    seed: int


@dataclass
class ClientResult:
    """What comes back: the encoded update (delta), the example count it is weighted by, metrics, or an error."""

    client_id: int
    update: bytes = b""
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ClientContext:
    """Everything a client algorithm needs in this process: the shared base (never copied), data, codec, config."""

    cfg: Any
    model: torch.nn.Module
    spec: Any  # StateSpec of the shared parameters
    task: Any
    encoded: dict[str, torch.Tensor]
    data: Any  # FederatedData
    codec: Any
    store: Any  # ClientStateStore


def make_optimizer(params, ccfg) -> torch.optim.Optimizer:
    if ccfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=ccfg.lr, weight_decay=ccfg.weight_decay)
    return torch.optim.SGD(params, lr=ccfg.lr, momentum=ccfg.momentum, weight_decay=ccfg.weight_decay)


def local_sgd(ctx: ClientContext, indices: np.ndarray, generator: torch.Generator,
              extra_loss: Callable[[], torch.Tensor] | None = None) -> tuple[float, int]:
    """Local epochs (or steps) of mini-batch AdamW/SGD with gradient clipping and accumulation.

    Returns the mean training loss and the number of optimizer steps taken.
    """
    ccfg = ctx.cfg.client
    params = list(ctx.spec.params.values())
    opt = make_optimizer(params, ccfg)
    model, task = ctx.model, ctx.task
    model.train()
    total_loss, n_batches, steps, micro = 0.0, 0, 0, 0
    max_steps = ccfg.steps
    epochs = range(ccfg.epochs) if max_steps is None else itertools.count()

    def step() -> None:
        if ccfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, ccfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in epochs:
        seen = n_batches
        for batch in task.batches(ctx.encoded, indices, ccfg.batch_size, generator):
            loss = task.loss(model, batch)
            if extra_loss is not None:
                loss = loss + extra_loss()
            (loss / ccfg.grad_accum).backward()
            total_loss += float(loss.detach())
            n_batches += 1
            micro += 1
            if micro % ccfg.grad_accum == 0:
                step()
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    return total_loss / n_batches, steps
        if n_batches == seen:  # no data: nothing more to do
            break
    if micro % ccfg.grad_accum:  # a last partial accumulation
        step()
        steps += 1
    return total_loss / max(n_batches, 1), steps


@CLIENT_ALGORITHMS.register("local")
class LocalTraining:
    """Local training as in FedAvg (McMahan et al. 2017): start from the global state, run local SGD, send Δ = x_local − x_global."""

    def __init__(self, ctx: ClientContext):
        self.ctx = ctx

    def __call__(self, task: ClientTask) -> ClientResult:
        ctx = self.ctx
        t0 = time.perf_counter()
        global_state = ctx.codec.decode(task.payload, ctx.spec)
        ctx.spec.load(global_state)
        client = ctx.data.clients[task.client_id]
        torch.manual_seed(task.seed)  # dropout and any other torch randomness
        gen = torch.Generator().manual_seed(task.seed)
        loss, steps = local_sgd(ctx, client.train, gen)
        local = ctx.spec.get()
        delta = {n: local[n] - global_state[n] for n in ctx.spec.names}
        update = ctx.codec.encode(delta)
        return ClientResult(
            client_id=task.client_id, update=update, num_examples=int(len(ctx.task.rows(ctx.encoded, client.train))),
            metrics={"train_loss": loss, "steps": steps, "seconds": time.perf_counter() - t0},
        )


def make_client(ctx: ClientContext):
    return CLIENT_ALGORITHMS.get(ctx.cfg.client.algorithm)(ctx)
