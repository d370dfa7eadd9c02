"""Federated black-box prompt tuning, FedBPT (Sun et al. 2023) on BBT's subspace (Sun et al. 2022, "Black-Box Tuning
for Language-Model-as-a-Service").

The foundation model stays with its owner behind a forward-only inference service (``ownership/blackbox.py``). What is
learned is z ∈ R^d: the soft prompt is P = A z (n × h, n = ``adapter.num_virtual_tokens``, h the model's hidden size),
A a fixed random projection every party draws from the run seed (purpose ``blackbox_projection``). The client side
holds z as the only parameter of a small module (``BlackBoxPrompt``) in place of the model, so the state spec, codecs,
aggregation chain, server optimizers, client-level DP and checkpoints all work on z unchanged. A client's local
training is CMA-ES (Hansen's pycma) from the global z with step size σ (``blackbox.sigma``), ``blackbox.iterations``
iterations of ``blackbox.popsize`` candidates, each candidate's loss one forward call on the same mini-batch of the
client's own examples; it sends Δz = m − z (m the search distribution's final mean), which FedAvg averages as FedBPT's
server does. A client holds no parameter and no gradient of the model: its forward calls answer label-word logits and
losses only. The server evaluates the global prompt through the same service on its held-out set, and the
zero-prompt baseline once (``eval_zero_prompt_*``); the service counts each caller's calls (``api_calls``).
"""
from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, FedfmError
from ..ownership.blackbox import ServiceClient, normalize, start_service
from ..privacy import disclose
from ..randomness import Randomness
from . import CLIENT_ALGORITHMS, ClientResult, ClientTask, LocalTraining, ServerSide, batch_stream


class BlackBoxPrompt(torch.nn.Module):
    """What the client side holds in place of the foundation model: z (its only parameter), the projection A, and a
    caller of the service. Its forward is one call to the service with P = A z (or none: ``zero_prompt``), so a
    task's evaluation runs on it unchanged."""

    def __init__(self, service: ServiceClient, A: torch.Tensor, n: int, hidden: int, verbalizer: list[str],
                 template: str, process=None):
        super().__init__()
        self.z = torch.nn.Parameter(torch.zeros(A.shape[0]))
        self.service, self.n, self.hidden, self.verbalizer, self.template = service, n, hidden, verbalizer, template
        self._A = A  # a plain attribute, not state: every party draws it from the seed
        self.process = process  # the service this run started (closed with the run), or None
        self.caller, self.zero_prompt = "server", False

    def prompt(self, z: torch.Tensor | None = None) -> torch.Tensor:
        """P = A z as n × h."""
        z = self.z.detach() if z is None else z
        return (z.float() @ self._A).view(self.n, self.hidden)

    def call(self, batch: dict[str, torch.Tensor], prompt: torch.Tensor | None, caller: str) -> dict[str, torch.Tensor]:
        return self.service.forward(batch["input_ids"], batch["attention_mask"], batch.get("labels"), prompt,
                                    self.verbalizer, self.template, caller)

    def forward(self, input_ids, attention_mask, labels=None, **_):
        out = self.call({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
                        None if self.zero_prompt else self.prompt(), self.caller)
        loss = out["losses"].mean() if "losses" in out else None
        return SimpleNamespace(loss=loss, logits=out["logits"])

    def save_pretrained(self, path: str) -> None:
        """The learned prompt: z and what rebuilds P = A z (the seed-drawn A's shape and scale) as safetensors."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({"z": self.z.detach().contiguous(), "prompt": self.prompt().contiguous()},
                  str(Path(path) / "blackbox_prompt.safetensors"))
        (Path(path) / "blackbox_prompt.json").write_text(json.dumps(
            {"intrinsic_dim": int(self.z.numel()), "num_virtual_tokens": self.n, "hidden_size": self.hidden,
             "verbalizer": self.verbalizer, "template": self.template}, indent=1))

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None


def projection(cfg, hidden: int) -> torch.Tensor:
    """A ∈ R^{d × n·h}, A_ij ~ N(0, projection_std² / d), drawn from the run seed: the same at every party."""
    bb, n = cfg.blackbox, cfg.adapter.num_virtual_tokens
    gen = Randomness(cfg.federation.seed).torch("blackbox_projection")
    return torch.randn(bb.intrinsic_dim, n * hidden, generator=gen) * (bb.projection_std / math.sqrt(bb.intrinsic_dim))


def service_model_config(cfg) -> dict[str, Any]:
    """The model section the service the run starts is built from (the owner's)."""
    keys = ("name_or_path", "from_config", "tokenizer", "revision", "gguf_file", "dropout")
    return {k: getattr(cfg.model, k) for k in keys}


def check_peers(cfg) -> None:
    """Before any model loads: a given service must answer within blackbox.timeout_s, naming its address."""
    if cfg.blackbox.service is not None:
        ServiceClient(cfg.blackbox.service, cfg.blackbox.timeout_s).describe()


def build_model(cfg, examples, public_texts=None):
    """The client side's bundle: tokenizer (it reads its own texts), the task, and ``BlackBoxPrompt`` on a service
    that answers (the given one, or one started now on 127.0.0.1); no foundation model is loaded in this process."""
    from ..models import ModelBundle
    from ..models.loader import load_tokenizer
    from ..models.state import StateSpec
    from ..tasks import make_task

    bb = cfg.blackbox
    process = None
    if bb.service is None:
        process = start_service(service_model_config(cfg), bb.start_timeout_s, cfg.runtime.threads)
    try:
        service = ServiceClient(process.address if process else bb.service, bb.timeout_s)
        info = service.describe()
        tokenizer = load_tokenizer(cfg.model)
        task = make_task(cfg, tokenizer)
        words = list(bb.verbalizer or examples.label_names)
        if len(words) != len(examples.label_names):
            raise ConfigError(f"blackbox.verbalizer: {len(words)} label words for {len(examples.label_names)} "
                              f"classes ({examples.label_names}); give one word per class")
        hidden = int(info["hidden_size"])
        model = BlackBoxPrompt(service, projection(cfg, hidden), cfg.adapter.num_virtual_tokens, hidden, words,
                               bb.template, process)
    except BaseException:
        if process is not None:
            process.close()
        raise
    return ModelBundle(model=model, spec=StateSpec(model), task=task, tokenizer=tokenizer,
                       personal=StateSpec(model, shared=False))


def check_config(cfg) -> None:
    """What black-box tuning cannot do, refused before anything loads (each message names its key)."""
    if cfg.blackbox.service is not None:
        normalize(cfg.blackbox.service)
    refusals = [
        (cfg.adapter.method != "prompt",
         f"adapter.method {cfg.adapter.method!r}: the client holds no model to adapt; what it learns is a soft prompt "
         f"of adapter.num_virtual_tokens tokens (P = A z), so set adapter.method prompt"),
        (cfg.task.name != "classification",
         f"task.name {cfg.task.name!r}: the service scores label words (a verbalizer); use task.name classification"),
        (cfg.privacy.mode == "sample",
         "privacy.mode 'sample': DP-SGD clips per-example gradients, and a black-box client has none; use "
         "privacy.mode client (DP-FedAvg on Δz)"),
        (cfg.runtime.name != "local",
         f"runtime.name {cfg.runtime.name!r}: the batched runtime stacks a model's parameters and ray builds the "
         f"model in each worker; black-box clients call the service from runtime.name local"),
        (bool(cfg.adapter.personal) or cfg.adapter.rank_per_client is not None,
         "adapter.personal and adapter.rank_per_client: z is the whole state and every client holds all of it"),
        (cfg.eval.finetune_steps is not None and cfg.eval.finetune_steps > 0,
         "eval.finetune_steps: local fine-tuning takes gradient steps, and a black-box client has no gradient"),
        (cfg.eval.membership_audit, "eval.membership_audit: the audit reads losses of a model in this process"),
        (cfg.model.train_tokenizer is not None,
         "model.train_tokenizer: the service reads ids with the model's own tokenizer"),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"client.algorithm 'fedbpt': {why}")


class FedBPTServer(ServerSide):
    """FedBPT's server half: the zero-prompt baseline on the held-out set (once), and each client's calls to the
    service in the round (what the service counted)."""

    def bind(self, cfg, model, global_state) -> None:
        self.server_model = model
        self.prompt = getattr(model, "model", None) if model is not None else None
        self._seen: dict[str, dict[str, int]] = {}
        self._baseline: dict[str, Any] | None = None
        self.notes = [f"black-box tuning (FedBPT): z ∈ R^{cfg.blackbox.intrinsic_dim}, a prompt of "
                      f"{cfg.adapter.num_virtual_tokens} tokens, CMA-ES λ={cfg.blackbox.popsize} × "
                      f"{cfg.blackbox.iterations} iterations per client per round, through the service at "
                      f"{self.prompt.service.address if isinstance(self.prompt, BlackBoxPrompt) else '?'}"]

    def evaluate(self, rnd: int) -> dict[str, Any]:
        m = self.server_model
        if not isinstance(self.prompt, BlackBoxPrompt) or m.held_out is None:
            return {}
        if self._baseline is None:  # the held-out set and the model do not change: scored once
            self.prompt.zero_prompt = True
            try:
                scores = m.task.evaluate(self.prompt, m.held_out, m.eval_indices, m.cfg.eval.batch_size)
            finally:
                self.prompt.zero_prompt = False
            self._baseline = {f"eval_zero_prompt_{k}": v for k, v in scores.items()}
        return dict(self._baseline)

    def complete(self, rnd: int, results: list[ClientResult]) -> tuple[list[ClientResult], dict[str, Any]]:
        if not isinstance(self.prompt, BlackBoxPrompt):
            return results, {}
        counts = self.prompt.service.describe()["calls"]
        calls, examples = {}, {}
        for caller, c in counts.items():
            seen = self._seen.get(caller, {"calls": 0, "examples": 0})
            if caller.startswith("client-") and c["calls"] > seen["calls"]:
                calls[caller[7:]] = c["calls"] - seen["calls"]
                examples[caller[7:]] = c["examples"] - seen["examples"]
        self._seen = {k: dict(v) for k, v in counts.items()}
        out: dict[str, Any] = {"api_calls": calls, "api_examples": examples}
        if calls:
            out.update(api_calls_per_client=float(np.mean(list(calls.values()))),
                       api_examples_per_client=float(np.mean(list(examples.values()))))
        return results, out


@CLIENT_ALGORITHMS.register("fedbpt")
class FedBPT(LocalTraining):
    """FedBPT's client (Sun et al. 2023): CMA-ES on z from the global z, each candidate's loss one forward call to
    the service on the client's own mini-batch; sends Δz."""

    server_side = FedBPTServer
    check_config = staticmethod(check_config)
    check_peers = staticmethod(check_peers)
    holds_model = False  # its clients adapt no model (prepare checks no adapter target modules)
    not_deployable = ("its clients hold no model and call the owner's inference service, while a deployment's "
                      "SuperNodes and server load the model (not wired yet; run a simulation)")

    @staticmethod
    def client_model(cfg, data):
        """What the client side holds in place of a model: ``BlackBoxPrompt`` (see ``build_model``)."""
        return build_model(cfg, data.examples, public_texts=data.public_texts())

    def __init__(self, ctx):
        super().__init__(ctx)
        if not isinstance(ctx.model, BlackBoxPrompt):
            raise ConfigError("client.algorithm 'fedbpt': the client side holds a BlackBoxPrompt, not a model "
                              "(build it with fedfm.client.blackbox.build_model)")

    def evaluate(self, task: ClientTask, own) -> dict[str, Any]:
        prompt = self.ctx.model
        prompt.caller = f"client-{task.client_id}"
        try:
            return super().evaluate(task, own)
        finally:
            prompt.caller = "server"

    def __call__(self, task: ClientTask) -> ClientResult:
        import cma

        ctx, bb = self.ctx, self.ctx.cfg.blackbox
        prompt: BlackBoxPrompt = ctx.model
        t0 = time.perf_counter()
        view = ctx.view(task.client_id)
        global_state = view.expand(ctx.down.decode(task.payload, view))
        ctx.spec.load(global_state)
        own = ctx.local[task.client_id]
        scores = self.evaluate(task, own)
        random = Randomness.from_config(ctx.cfg)
        seed = random.seed("blackbox_cmaes", base=task.seed)
        gen = torch.Generator().manual_seed(seed)
        z0 = prompt.z.detach().double().numpy()
        es = cma.CMAEvolutionStrategy(z0, bb.sigma, {"popsize": bb.popsize, "seed": seed % (2 ** 32 - 2) + 1,
                                                     "verbose": -9, "maxiter": bb.iterations})
        caller = f"client-{task.client_id}"
        batches = batch_stream(ctx.task, own.encoded, own.train, ctx.cfg.client.batch_size, gen, bb.iterations, 1)
        calls = examples = iters = 0
        losses: list[float] = []
        for batch in batches:
            candidates = es.ask()
            fitness = []
            for x in candidates:
                out = prompt.call(batch, prompt.prompt(torch.as_tensor(x, dtype=torch.float32)), caller)
                fitness.append(float(out["losses"].mean()))
                calls, examples = calls + 1, examples + len(batch["input_ids"])
            es.tell(candidates, fitness)
            losses.append(float(np.mean(fitness)))
            iters += 1
        if not iters:
            raise FedfmError(f"client {task.client_id}: no training examples to score")
        m = torch.as_tensor(es.mean, dtype=torch.float32)
        if not torch.isfinite(m).all():
            raise FedfmError(f"client {task.client_id}: CMA-ES diverged (non-finite mean)")
        delta = view.restrict({"z": m - global_state["z"]})
        update = ctx.encode_update(task, delta, view)
        return disclose(ctx.cfg, ClientResult(
            client_id=task.client_id, update=update, num_examples=own.train_rows(ctx.task),
            metrics={"train_loss": losses[-1], "steps": iters, "seconds": time.perf_counter() - t0,
                     "api_calls": calls, "api_examples": examples, **scores}))
