"""Sample-level DP-SGD inside each client (Abadi et al. 2016, "Deep Learning with Differential Privacy").

Every local step draws a Poisson sample of the client's examples (rate q_k = B / n_k), computes per-example
gradients (Opacus's ``GradSampleModule`` hooks, which see peft's LoRA ``lora_A``/``lora_B`` as the ``nn.Linear``
layers they are), clips each to L2 norm C, adds N(0, z²C²) to their sum and divides by the expected batch size B:
Opacus's ``DPOptimizer`` does the clip-noise-scale, then the configured optimizer steps. Each client accounts its
own steps with ``dp-accounting`` (the Poisson-subsampled Gaussian, composed over every step it ever took), so the
run can report the worst client's (ε, δ): the guarantee one training example has against everyone who sees what its
client sends (the server, other clients, whoever gets the final model).
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError

STEPS_KEY = "dp_steps"  # what a client keeps in its state store: the DP-SGD steps it has taken so far
# models whose trainable parameters Opacus's hooks do not all see (IA3's vectors, prompt embeddings, a full
# fine-tune's broadcast position embeddings): their per-example gradients are taken one example at a time
_HOOKS_MISS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def steps_per_round(ccfg, n: int) -> int:
    """DP-SGD steps a client of n examples takes per round: ``client.steps``, or ``client.epochs`` passes of
    expected batch size B (⌈epochs · n / B⌉)."""
    if ccfg.steps is not None:
        return int(ccfg.steps)
    return max(1, math.ceil((ccfg.epochs or 1) * n / ccfg.batch_size))


@dataclass
class SampleLevelDP:
    """The run's per-example mechanism: noise multiplier z, clip C and, per client k, the Poisson rate
    q_k = min(1, B / n_k) and its steps per round. ε of a client after S steps: dp-accounting on
    PoissonSampled(q_k, Gaussian(z)) composed S times."""

    noise_multiplier: float
    clip: float
    batch_size: int
    sizes: np.ndarray  # n_k: training examples of each client
    steps: np.ndarray  # s_k: DP-SGD steps per round
    accountant: str = "rdp"  # rdp | pld
    _cache: dict = field(default_factory=dict, repr=False)

    def rate(self, k: int) -> float:
        return min(1.0, self.batch_size / max(int(self.sizes[k]), 1))

    def _event(self, q: float, steps: int, z: float):
        import dp_accounting as dpa

        return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)

    def _fresh(self):
        from .accountant import new_accountant

        return new_accountant(self.accountant)

    def epsilon_at(self, q: float, steps: int, delta: float, z: float | None = None) -> float:
        z = self.noise_multiplier if z is None else z
        if steps <= 0:
            return 0.0
        if z <= 0:
            return math.inf
        key = (round(q, 12), int(steps), delta, z)
        if key not in self._cache:
            acc = self._fresh()
            acc.compose(self._event(q, int(steps), z))
            self._cache[key] = float(acc.get_epsilon(delta))
        return self._cache[key]

    def epsilon(self, k: int, total_steps: int, delta: float) -> float:
        """Client k's ε at δ after ``total_steps`` DP-SGD steps."""
        return self.epsilon_at(self.rate(k), total_steps, delta)

    def kinds(self) -> list[tuple[float, int]]:
        """The distinct (q_k, s_k): clients that share them spend the same ε."""
        return sorted({(self.rate(k), int(self.steps[k])) for k in range(len(self.sizes))})

    def worst_epsilon(self, rounds: int, delta: float, z: float | None = None) -> float:
        """The ε of the worst-off client had it taken part in all ``rounds`` rounds (an upper bound on every
        client's ε after the run)."""
        return max(self.epsilon_at(q, s * rounds, delta, z) for q, s in self.kinds())

    def noise_for(self, target_epsilon: float, delta: float, rounds: int) -> float:
        """The smallest z with which every client, even one sampled in each of ``rounds`` rounds, spends at most
        ``target_epsilon`` at ``delta``: calibrated on the worst-off kind of client, then checked on all."""
        import dp_accounting as dpa

        kinds = self.kinds()
        worst = max(kinds, key=lambda k: self.epsilon_at(k[0], k[1] * rounds, delta, 1.0))
        while True:
            q, s = worst
            z = float(dpa.calibrate_dp_mechanism(
                self._fresh, lambda z: self._event(q, s * rounds, z), target_epsilon, delta,
                bracket_interval=dpa.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4))
            over = [k for k in kinds if self.epsilon_at(k[0], k[1] * rounds, delta, z) > target_epsilon]
            if not over:
                return z
            worst = max(over, key=lambda k: self.epsilon_at(k[0], k[1] * rounds, delta, z))


def sample_level_dp(cfg, sizes: np.ndarray) -> SampleLevelDP:
    """The mechanism of ``privacy.mode: sample``; z derived from ``privacy.target_epsilon`` when not given."""
    p = cfg.privacy
    sizes = np.asarray(sizes, dtype=np.int64)
    if (sizes <= 0).any():
        raise ConfigError(f"privacy.mode 'sample': client {int(np.flatnonzero(sizes <= 0)[0])} has no training "
                          "examples to sample from")
    mech = SampleLevelDP(p.noise_multiplier or 0.0, p.clip, cfg.client.batch_size, sizes,
                         np.array([steps_per_round(cfg.client, int(n)) for n in sizes]), p.accountant)
    if p.noise_multiplier is None:
        mech.noise_multiplier = mech.noise_for(p.target_epsilon, p.delta, cfg.federation.rounds)
    return mech


@contextlib.contextmanager
def per_example_gradients(model: torch.nn.Module):
    """Opacus's per-example gradient hooks on ``model`` for the duration of the block (``p.grad_sample``)."""
    from opacus import GradSampleModule

    try:
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    except Exception as e:  # an adapter whose layers Opacus cannot differentiate per example
        raise ConfigError(f"privacy.mode 'sample': Opacus cannot compute per-example gradients of this model's "
                          f"trainable layers ({e})") from e
    try:
        with warnings.catch_warnings():  # Opacus's hooks on a frozen base: the inputs need no gradient, only the adapter
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield gsm
    finally:
        gsm.remove_hooks()
        for p in model.parameters():
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)


def dp_sgd(ctx, own, generator: torch.Generator, noise_seed: int, steps: int,
           noise_multiplier: float, grad_hook: Callable | None, make_optimizer: Callable) -> tuple[float, int]:
    """``steps`` DP-SGD steps on the client's own training examples (``own``, its LocalData): Poisson batches of expected size B, per-example
    clip to ``privacy.clip``, noise z·C on the sum, ÷ B. ``grad_hook`` (FedProx, SCAFFOLD) acts on the noised
    gradient, so it is post-processing. The noise is drawn on the parameters' device from ``noise_seed``. Returns the
    mean loss over the sampled examples and the steps taken. ``make_optimizer(params, client_cfg)`` builds the
    client's optimizer, which DP-SGD wraps."""
    from opacus.optimizers import DPOptimizer

    cfg, model, task = ctx.cfg, ctx.model, ctx.task
    rows = np.asarray(task.rows(own.encoded, own.train))
    n, B = len(rows), cfg.client.batch_size
    q = min(1.0, B / max(n, 1))
    params = ctx.train_params()
    noise_generator = torch.Generator(device=params[0].device).manual_seed(int(noise_seed))
    model.train()
    total_loss, seen = 0.0, 0
    with per_example_gradients(model) as gsm:
        opt = DPOptimizer(make_optimizer(params, cfg.client), noise_multiplier=noise_multiplier,
                          max_grad_norm=cfg.privacy.clip, expected_batch_size=B, loss_reduction="mean",
                          generator=noise_generator)
        for _ in range(steps):
            chosen = rows[(torch.rand(n, generator=generator) < q).numpy()]  # Poisson sampling: each row w.p. q
            if len(chosen):
                batch = task.collate(own.encoded, torch.as_tensor(chosen))
                if model in _HOOKS_MISS:
                    gsm.disable_hooks()
                losses = task.segment_losses(model, batch, [1] * len(chosen))  # ℓ_i, one per example
                if model not in _HOOKS_MISS:
                    losses.sum().backward()
                    missed = [p for p in params if getattr(p, "grad_sample", None) is None
                              or p.grad_sample.shape[0] != len(chosen)]
                    if missed:  # Opacus's hooks did not see every parameter: this batch again and every next, exactly
                        _HOOKS_MISS[model] = f"{len(missed)} trainable tensors, e.g. of shape {tuple(missed[0].shape)}"
                        gsm.disable_hooks()
                        opt.zero_grad(set_to_none=True)
                        losses = task.segment_losses(model, batch, [1] * len(chosen))
                if model in _HOOKS_MISS:
                    one_at_a_time(losses, params)
                total_loss += float(losses.detach().sum())
                seen += len(chosen)
            else:  # an empty Poisson sample still releases noise
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            opt.pre_step()  # g̃ = (Σ_i g_i · min(1, C/‖g_i‖) + N(0, z²C²)) / B
            if grad_hook is not None:
                grad_hook(params)
            opt.original_optimizer.step()
            opt.zero_grad(set_to_none=True)
    return total_loss / max(seen, 1), steps


def one_at_a_time(losses: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    """p.grad_sample[i] = ∂ℓ_i/∂p by one backward pass per example through the batch's one forward graph: exact for
    any layer, B times the backward cost of Opacus's hooks."""
    per = [[] for _ in params]
    for i in range(len(losses)):
        grads = torch.autograd.grad(losses[i], params, retain_graph=i + 1 < len(losses), allow_unused=True)
        for j, (p, g) in enumerate(zip(params, grads)):
            per[j].append(torch.zeros_like(p) if g is None else g)
    for p, gs in zip(params, per):
        p.grad_sample = torch.stack(gs)
