"""Client algorithms: what a client does with the global state. One registry, keyed by ``client.algorithm``."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..privacy import disclose
from ..randomness import Randomness
from ..stateful import Stateful
from ..registry import Registry
from .data import LocalData

CLIENT_ALGORITHMS: Registry[type] = Registry("client algorithm")


@dataclass
class ClientTask:
    """What the server sends one client for one round: the encoded global state and the round's settings."""

    client_id: int
    round: int
    payload: bytes
    seed: int
    extras: dict[str, bytes] = field(default_factory=dict)  # algorithm state the server sends along (SCAFFOLD's c)
    evaluate: bool = False  # also score the received global model on the client's own test split (eval.federated)


@dataclass
class ClientResult:
    """What comes back: the encoded update (delta), the example count it is weighted by, metrics, or an error."""

    client_id: int
    update: bytes = b""
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    extras: dict[str, bytes] = field(default_factory=dict)  # algorithm state sent back (SCAFFOLD's Δc_i)
    crashed: bool = False  # the client's code raised (as opposed to a dropout, a deadline, a rejected update)

    @property
    def nbytes(self) -> int:
        return len(self.update) + sum(len(b) for b in self.extras.values())


@dataclass
class ClientContext:
    """The client side in this process: the shared base (never copied), the task, the codec, the config, and the
    own data of each client it serves (``local``: one entry for a client in its own process, one per virtual client
    in a simulation; a client reads its own entry only)."""

    cfg: Any
    model: torch.nn.Module
    spec: Any  # StateSpec of the shared parameters
    task: Any
    local: Mapping[int, LocalData]
    codec: Any  # what the client sends (codec.name)
    store: Any  # ClientStateStore
    personal: Any = None  # StateSpec of the parameters that stay on the client (adapter.personal, FedSA-LoRA's B)
    personal_init: Any = None  # their initial flat values: what a client starts from before it has its own
    ranks: Any = None  # per-client LoRA ranks (adapter.rank_per_client), or None: every client at adapter.r
    sample_dp: Any = None  # privacy.mode sample: the per-example mechanism (privacy/dpsgd.SampleLevelDP)
    peer: Any = None  # the client algorithm's server half, for one that talks to it while it trains (split learning)
    downlink: Any = None  # what the server broadcasts (codec.downlink); None: the same codec as ``codec``
    continual: Any = None  # continual.mitigations on this client side (client.continual.ContinualClient), or None

    @property
    def down(self):
        return self.codec if self.downlink is None else self.downlink

    def draws(self, task: "ClientTask", *parts: int):
        """The generator of the codec's random draws for this task (None when the codec draws nothing)."""
        return Randomness.from_config(self.cfg).torch("codec", *parts, base=task.seed) if self.codec.random else None

    def encode_update(self, task: "ClientTask", delta, view) -> bytes:
        """The client's update as the codec's bytes: its random draws (stochastic rounding, random-k) from the
        task's seed, and with error feedback (``codec.error_feedback``) its own residual added and kept."""
        from ..compression.feedback import encode_with_feedback, uses_feedback

        codec, draws = self.codec, self.draws(task)
        if uses_feedback(self.cfg.codec, codec):
            return encode_with_feedback(codec, delta, view, self.store, task.client_id, draws)
        return codec.encode(delta, draws)

    def view(self, client_id: int):
        """The names and shapes of what this client receives and sends (LoRA cut to its rank)."""
        from ..models.ranks import view_of

        return view_of(self.spec, self.ranks, client_id)

    def train_params(self) -> list[torch.nn.Parameter]:
        """Shared parameters first (in spec order, so per-parameter hooks can zip with the spec), then personal ones."""
        shared = list(self.spec.params.values())
        return shared + (list(self.personal.params.values()) if self.personal is not None else [])

    PERSONAL_KEY = "personal"

    def personal_flat(self, client_id: int) -> torch.Tensor:
        """The client's own personal parameters (flat), or their initial values before it has any."""
        stored = self.store.get(client_id)
        return stored[self.PERSONAL_KEY] if stored and self.PERSONAL_KEY in stored else self.personal_init

    def load_personal(self, client_id: int) -> None:
        """Put the client's own personal parameters (or their initial values) into the model."""
        if self.personal is None or not self.personal.names:
            return
        self.personal.load_flat(self.personal_flat(client_id))

    def save_personal(self, client_id: int) -> None:
        if self.personal is None or not self.personal.names:
            return
        self.store_personal(client_id, self.personal.flat())

    def store_personal(self, client_id: int, flat: torch.Tensor) -> None:
        stored = dict(self.store.get(client_id) or {})
        stored[self.PERSONAL_KEY] = flat
        self.store.put(client_id, stored)


def make_optimizer(params, ccfg) -> torch.optim.Optimizer:
    if ccfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=ccfg.lr, weight_decay=ccfg.weight_decay)
    return torch.optim.SGD(params, lr=ccfg.lr, momentum=ccfg.momentum, weight_decay=ccfg.weight_decay)


GradHook = Callable[[list[torch.nn.Parameter]], None]


def batch_stream(task, encoded, indices: np.ndarray, batch_size: int, generator: torch.Generator,
                 max_steps: int | None, epochs: int):
    """The mini-batches one client trains on, in order: ``epochs`` passes (or ``max_steps`` batches, passing over
    the data as often as needed), each pass shuffled by the client's own ``generator``. Exactly what
    ``local_sgd`` consumes without gradient accumulation; the batched runtime reads one such stream per client."""
    taken = 0
    for _ in (range(epochs) if max_steps is None else itertools.count()):
        seen = taken
        for batch in task.batches(encoded, indices, batch_size, generator):
            yield batch
            taken += 1
            if max_steps is not None and taken >= max_steps:
                return
        if taken == seen:  # no data
            return


def local_sgd(ctx: ClientContext, data: LocalData, indices: np.ndarray, generator: torch.Generator,
              extra_loss: Callable[[], torch.Tensor] | None = None,
              grad_hook: GradHook | None = None, num_steps: int | None = None) -> tuple[float, int]:
    """Local epochs (or steps) of mini-batch AdamW/SGD with gradient clipping and accumulation.

    ``grad_hook(params)`` may change the (accumulated) gradients before clipping and the optimizer step: that is
    where FedProx adds μ(w − w^t) and SCAFFOLD adds c − c_i. Returns the mean training loss and the number of
    optimizer steps taken. ``num_steps`` overrides ``client.steps``/``client.epochs`` (evaluation fine-tuning).
    """
    ccfg = ctx.cfg.client
    params = ctx.train_params()
    opt = make_optimizer(params, ccfg)
    model, task = ctx.model, ctx.task
    model.train()
    total_loss, n_batches, steps, micro = 0.0, 0, 0, 0
    max_steps = ccfg.steps if num_steps is None else num_steps
    epochs = range(ccfg.epochs) if max_steps is None else itertools.count()

    def step() -> None:
        if grad_hook is not None:
            grad_hook(params)
        if ccfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, ccfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in epochs:
        seen = n_batches
        for batch in task.batches(data.encoded, indices, ccfg.batch_size, generator):
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


class ServerSide(Stateful):
    """The server's half of a client algorithm: what it sends with the global state and what it does with the
    results (SCAFFOLD's server control variate); it may also replace what is broadcast, how an update is checked and
    the chain's last step (FedKSeed: seeds instead of tensors). Its state is checkpointed with the run. It is built
    from what the server side holds: the layout of the shared state, the codec, the number of clients and the
    config, never client data."""

    notes: list[str] = []  # what the server shows of it when the run starts

    def __init__(self, layout, codec, num_clients: int, cfg=None):
        self.layout, self.codec, self.num_clients, self.cfg = layout, codec, num_clients, cfg

    def payload(self, rnd: int, cid: int) -> bytes | None:
        """What client ``cid`` is sent in place of the encoded global state (FedKSeed's seeds), or None."""
        return None

    def update_check(self, check):
        """The check of a result's update (default: the codec's ``UpdateCheck``, ``check``)."""
        return check

    def server_optimizer(self, optimizer):
        """The chain's last step (default: the server optimizer of the config, ``optimizer``)."""
        return optimizer

    def bind(self, cfg, model, global_state: Callable[[], torch.Tensor]) -> None:
        """What the server side holds besides the layout, for a half that computes (split learning's server-side
        part): the run's config, the server's own model (``evaluation.ServerModel``, or None) and the current global
        state (flat)."""

    def view(self, view):
        """What a client receives and sends of the shared state, given its view (LoRA cut to its rank): all of it."""
        return view

    def extras(self, rnd: int) -> dict[str, bytes]:
        return {}

    def evaluate(self, rnd: int) -> dict[str, Any]:
        """Metrics of its own at an evaluation round (black-box tuning's zero-prompt baseline; offsite
        tuning: the owner's full model with the adapter)."""
        return {}

    def exported(self, model, flat: torch.Tensor):
        """The server model and flat state the run writes as its final adapter (default: ``model``, ``flat``)."""
        return model, flat

    def complete(self, rnd: int, results: list["ClientResult"]) -> tuple[list["ClientResult"], dict[str, Any]]:
        """The round's results as the aggregation sees them (each as its client sent it), and measurements for the
        round's row."""
        return results, {}

    def absorb(self, accepted: list[tuple["ClientResult", dict[str, torch.Tensor]]]) -> None:
        """``accepted``: each usable result with its decoded extras."""


@CLIENT_ALGORITHMS.register("local")
class LocalTraining:
    """Local training as in FedAvg (McMahan et al. 2017): start from the global state, run local SGD, send Δ = x_local − x_global."""

    server_side = ServerSide
    extra_names: tuple[str, ...] = ()  # names of the extras a result carries (each decoded like a state)

    def __init__(self, ctx: ClientContext):
        self.ctx = ctx

    def grad_hook(self, task: ClientTask, global_state) -> GradHook | None:
        """Set up per-client algorithm state before training; return a gradient hook (or None)."""
        return None

    def finish(self, task: ClientTask, global_state, local, steps: int) -> dict[str, bytes]:
        """After training: update the client's stored state; return the extras to send."""
        return {}

    def evaluate(self, task: ClientTask, own: LocalData) -> dict[str, Any]:
        """Federated evaluation: the model as received (global state, the client's own personal parameters) on the
        client's own test split, as ``fed_<metric>`` plus ``fed_examples`` (what the server weights the mean by)."""
        if not task.evaluate or not len(own.test):
            return {}
        ctx = self.ctx
        scores = ctx.task.evaluate(ctx.model, own.encoded, own.test, ctx.cfg.eval.batch_size)
        return {**{f"fed_{k}": float(v) for k, v in scores.items()},
                "fed_examples": int(len(ctx.task.rows(own.encoded, own.test)))}

    def __call__(self, task: ClientTask) -> ClientResult:
        ctx = self.ctx
        t0 = time.perf_counter()
        view = ctx.view(task.client_id)
        global_state = view.expand(ctx.down.decode(task.payload, view))  # zero-padded to the full rank
        ctx.spec.load(global_state)
        ctx.load_personal(task.client_id)
        own = ctx.local[task.client_id]
        scores = self.evaluate(task, own)
        torch.manual_seed(task.seed)  # dropout and any other torch randomness
        gen = torch.Generator().manual_seed(task.seed)
        hook = self.grad_hook(task, global_state)
        trained_on = own
        if ctx.continual is not None:  # a lifelong federation: replayed rows mixed in, penalties' gradients added
            trained_on, hook = ctx.continual.prepare(task.client_id, own, hook)
        dp_metrics: dict[str, Any] = {}
        if ctx.sample_dp is not None:  # privacy.mode sample: DP-SGD, accounted by the client itself
            refused = self._dp_budget_left(task.client_id)
            if refused:
                return ClientResult(client_id=task.client_id, error=refused)
            loss, steps, dp_metrics = self._train_dp_sgd(task, trained_on, gen, hook)
        else:
            loss, steps = local_sgd(ctx, trained_on, trained_on.train, gen, grad_hook=hook)
        local = ctx.spec.get()
        delta = view.restrict({n: local[n] - global_state[n] for n in ctx.spec.names})
        update = ctx.encode_update(task, delta, view)
        ctx.save_personal(task.client_id)
        extras = self.finish(task, global_state, local, steps)
        return disclose(ctx.cfg, ClientResult(
            client_id=task.client_id, update=update, num_examples=own.train_rows(ctx.task),
            metrics={"train_loss": loss, "steps": steps, "seconds": time.perf_counter() - t0, **dp_metrics, **scores},
            extras=extras,
        ))

    # ------------------------------------------------------------------ privacy.mode: sample
    def _dp_steps(self, cid: int) -> int:
        from ..privacy.dpsgd import STEPS_KEY

        stored = self.ctx.store.get(cid)
        return int(stored[STEPS_KEY][0]) if stored and STEPS_KEY in stored else 0

    def _dp_budget_left(self, cid: int) -> str | None:
        """With both privacy.noise_multiplier and privacy.target_epsilon, a client refuses the round that would
        take its own ε above the target (the reason, or None)."""
        p, mech = self.ctx.cfg.privacy, self.ctx.sample_dp
        if p.target_epsilon is None or p.noise_multiplier is None:
            return None
        eps = mech.epsilon(cid, self._dp_steps(cid) + int(mech.steps[cid]), p.delta)
        if eps <= p.target_epsilon:
            return None
        return (f"privacy budget spent: this round would take the client to ε={eps:.4g} > "
                f"privacy.target_epsilon={p.target_epsilon:g}")

    def _train_dp_sgd(self, task: ClientTask, own: LocalData, gen, hook) -> tuple[float, int, dict[str, Any]]:
        from ..privacy.dpsgd import STEPS_KEY, dp_sgd

        ctx, cid, mech = self.ctx, task.client_id, self.ctx.sample_dp
        # Poisson batches and noise that no holder of the run seed can redraw (unless privacy.randomness: seeded)
        random = Randomness.from_config(ctx.cfg)
        gen, noise_seed = random.torch("dpsgd_batches", base=task.seed), random.seed("dpsgd_noise", base=task.seed)
        loss, steps = dp_sgd(ctx, own, gen, noise_seed, int(mech.steps[cid]), mech.noise_multiplier, hook,
                             make_optimizer)
        total = self._dp_steps(cid) + steps
        stored = dict(ctx.store.get(cid) or {})
        stored[STEPS_KEY] = torch.tensor([total], dtype=torch.int64)
        ctx.store.put(cid, stored)
        return loss, steps, {"dp_steps": total, "dp_epsilon": mech.epsilon(cid, total, ctx.cfg.privacy.delta)}


@CLIENT_ALGORITHMS.register("fedprox")
class FedProx(LocalTraining):
    """FedProx (Li et al. 2020): minimise F_k(w) + μ/2 ‖w − w^t‖², i.e. add μ (w − w^t) to every local gradient."""

    def grad_hook(self, task, global_state):
        mu = self.ctx.cfg.client.mu
        anchors = [global_state[n].to(p.device) for n, p in self.ctx.spec.params.items()]

        def prox(params):
            for p, w_t in zip(params, anchors):
                if p.grad is not None:
                    p.grad.add_(p.detach() - w_t, alpha=mu)

        return prox


class ScaffoldServer(ServerSide):
    """SCAFFOLD's server control variate: c ← c + (1/N) Σ_{i∈S} Δc_i (Karimireddy et al. 2020, Alg. 1 line 17)."""

    def __init__(self, layout, codec, num_clients: int, cfg=None):
        super().__init__(layout, codec, num_clients, cfg)
        self.c = torch.zeros(layout.numel)

    def extras(self, rnd: int) -> dict[str, bytes]:
        return {"c": self.codec.encode(self.layout.unflatten(self.c))}

    def absorb(self, accepted) -> None:
        if not accepted:
            return
        dc = torch.stack([self.layout.flatten(ex["delta_c"]) for _, ex in accepted])
        self.c = self.c + dc.sum(0) / self.num_clients

    def state_dict(self) -> dict[str, Any]:
        return {"c": self.c.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "c" in state:
            self.c = state["c"].clone()


@CLIENT_ALGORITHMS.register("scaffold")
class Scaffold(LocalTraining):
    """SCAFFOLD (Karimireddy et al. 2020), option II: y ← y − η_l (g_i(y) − c_i + c);
    c_i⁺ = c_i − c + (x − y)/(K η_l); send Δy and Δc_i = c_i⁺ − c_i. c_i lives in the client state store.

    Option II exactly as the paper writes it, from the displacement x − y of the K local steps (with SGD momentum or
    gradient clipping it is no longer the mean of the raw gradients, and it is the displacement the paper uses).
    The analysis is for SGD: AdamW clients are refused (``check_config``), as is client-level DP, whose noise would
    not cover c (the server's c = (1/N) Σ Δc_i is built from raw, unclipped Δc_i and broadcast to every client).
    """

    server_side = ScaffoldServer
    extra_names = ("delta_c",)
    KEY = "scaffold.c_i"

    def __init__(self, ctx: ClientContext):
        super().__init__(ctx)
        self._pending: dict[int, tuple] = {}  # client id -> (c_i, c) while it trains

    @staticmethod
    def check_config(cfg) -> None:
        if cfg.client.optimizer != "sgd":
            raise ValueError(f"client.algorithm 'scaffold': its control variates and option II's c_i⁺ = c_i − c + "
                             f"(x − y)/(K η_l) are for SGD steps (Karimireddy et al. 2020); client.optimizer "
                             f"{cfg.client.optimizer!r} is not covered: set client.optimizer=sgd (and a client.lr "
                             f"for SGD)")
        if cfg.adapter.rank_per_client is not None:
            raise ValueError("client.algorithm 'scaffold' cannot be combined with adapter.rank_per_client "
                             "(its gradient correction would fill the components a low-rank client must keep at zero)")
        if cfg.privacy.mode == "client":
            raise ValueError("client.algorithm 'scaffold' with privacy.mode 'client': the server control variate "
                             "c = (1/N) Σ Δc_i is built from each client's raw, unclipped, un-noised Δc_i and sent to "
                             "every client, so the accounted ε would not cover it; use client.algorithm local or "
                             "fedprox, or privacy.mode sample")

    def grad_hook(self, task, global_state):
        ctx = self.ctx
        c = ctx.down.decode(task.extras["c"], ctx.spec)
        stored = ctx.store.get(task.client_id)
        c_i = ctx.spec.unflatten(stored[self.KEY]) if stored and self.KEY in stored \
            else {n: torch.zeros(ctx.spec.shapes[n]) for n in ctx.spec.names}
        # per client, so that clients training together (the batched runtime) keep their own c_i
        self._pending[task.client_id] = (c_i, c)
        corrections = [c[n] - c_i[n] for n in ctx.spec.names]

        def correct(params):
            for p, corr in zip(params, corrections):
                if p.grad is not None:
                    p.grad.add_(corr.to(p.grad.device))

        return correct

    def finish(self, task, global_state, local, steps):
        ctx = self.ctx
        names = ctx.spec.names
        c_i, c = self._pending.pop(task.client_id)
        K_eta = max(steps, 1) * ctx.cfg.client.lr
        new_c_i = {n: c_i[n] - c[n] + (global_state[n] - local[n].detach().to(c_i[n].device)) / K_eta for n in names}
        delta_c = {n: new_c_i[n] - c_i[n] for n in names}
        stored = dict(ctx.store.get(task.client_id) or {})
        stored[self.KEY] = ctx.spec.flatten(new_c_i)
        ctx.store.put(task.client_id, stored)
        return {"delta_c": ctx.codec.encode(delta_c, ctx.draws(task, 1))}


def make_client(ctx: ClientContext):
    return CLIENT_ALGORITHMS.get(ctx.cfg.client.algorithm)(ctx)


from . import split  # noqa: E402,F401  (register "split")
from . import fedkseed  # noqa: E402,F401  (register "fedkseed")
from . import blackbox  # noqa: E402,F401  (register "fedbpt")
from . import offsite  # noqa: E402,F401  (register "offsite")
from . import fedmd  # noqa: E402,F401  (register "fedmd")
