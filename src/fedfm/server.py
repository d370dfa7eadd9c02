"""The server loop: sample → broadcast → run clients → aggregate → evaluate → checkpoint → log."""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .aggregation import make_aggregator
from .aggregation.server_opt import make_server_optimizer
from .client import ClientContext, ClientResult, ClientTask, make_client
from .compression import make_codec
from .config import RunConfig
from .data import FederatedData, build_federated_data
from .data.sources import load_examples
from .errors import ConfigError, FedfmError, UpdateRejected
from .models.loader import check_model_config
from .runtime import make_runtime
from .runtime.state_store import ClientStateStore
from .tasks import TASKS
from .tracking import RunDir


class Display:
    """Callbacks the loop calls so a CLI can show progress; this base shows nothing."""

    def partition(self, desc: dict) -> None: ...
    def model(self, info: dict) -> None: ...
    def round_start(self, rnd: int, total: int, n_clients: int) -> None: ...
    def client_done(self, result: ClientResult) -> None: ...
    def round_end(self, row: dict) -> None: ...
    def message(self, text: str) -> None: ...


def derive_seed(*parts: int) -> int:
    """A 63-bit seed for one (run seed, purpose, round, client) tuple, independent of call order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def sample_clients(fed, num_clients: int, rnd: int) -> np.ndarray:
    """Seeded uniform sampling without replacement: ``clients_per_round`` or ``max(min_clients, fraction·N)``."""
    if fed.fraction is not None:
        k = max(fed.min_clients, int(math.ceil(fed.fraction * num_clients)))
    else:
        k = fed.clients_per_round
    k = min(k, num_clients)
    rng = np.random.default_rng([fed.seed, 3, rnd])
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def worst_fraction_mean(values: list[float], fraction: float = 0.1, higher_is_better: bool = True) -> float:
    """Mean of the worst ``fraction`` of values (at least one)."""
    k = max(1, int(math.ceil(fraction * len(values))))
    ordered = sorted(values, reverse=not higher_is_better)
    return float(np.mean(ordered[:k]))


@dataclass
class Prepared:
    """Everything built from the config before the model loads (so bad input fails fast)."""

    cfg: RunConfig
    data: FederatedData


def prepare(cfg: RunConfig) -> Prepared:
    """Check the model reference and load + partition the data; no model weights are touched."""
    check_model_config(cfg.model)
    task_cls = TASKS.get(cfg.task.name)
    if task_cls.needs_labels and cfg.partition.method in ("dirichlet", "shards") and not cfg.data.label_column:
        raise ConfigError(f"partition.method {cfg.partition.method!r} needs data.label_column")
    if not task_cls.needs_labels and cfg.partition.method in ("dirichlet", "shards"):
        raise ConfigError(f"partition.method {cfg.partition.method!r} needs labels; task {cfg.task.name!r} has none "
                          "(use iid, quantity or by_column)")
    if cfg.partition.method == "by_column" and not cfg.data.client_column:
        raise ConfigError("partition.method 'by_column' needs data.client_column (the column naming each example's client)")
    examples = load_examples(cfg.data, needs_labels=task_cls.needs_labels, seed=cfg.federation.seed,
                             chat=task_cls.reads_chat)
    data = build_federated_data(cfg, examples)
    n = len(data.clients)
    fed = cfg.federation
    if fed.clients_per_round is not None and fed.clients_per_round > n:
        raise ConfigError(f"federation.clients_per_round ({fed.clients_per_round}) is more than the {n} clients in the data")
    if fed.min_clients > n:
        raise ConfigError(f"federation.min_clients ({fed.min_clients}) is more than the {n} clients in the data")
    return Prepared(cfg=cfg, data=data)


class Server:
    """Holds the one shared base and runs the rounds."""

    def __init__(self, prepared: Prepared, run_dir: Optional[RunDir] = None, display: Optional[Display] = None):
        from .models import build_model

        self.cfg = cfg = prepared.cfg
        self.data = prepared.data
        self.run_dir = run_dir
        self.display = display or Display()
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        t0 = time.perf_counter()
        self.bundle = build_model(cfg, self.data.examples, public_texts=self.data.public_texts())
        self.model, self.spec, self.task = self.bundle.model, self.bundle.spec, self.bundle.task
        self.encoded = self.task.encode(self.data.examples)  # tokenized once per run
        for note in getattr(self.task, "notes", []):
            self.display.message(note)
        self.eval_indices = self._fixed_sample(self.data.test, cfg.eval.max_examples, 5)
        n_gen = cfg.eval.generation.num_prompts if hasattr(self.task, "generate") else 0
        self.prompt_indices = self._fixed_sample(self.data.test, n_gen, 6) if n_gen else np.zeros(0, dtype=np.int64)
        self.display.model({"trainable": self.spec.numel, "total": sum(p.numel() for p in self.model.parameters()),
                            "seconds": time.perf_counter() - t0, "method": cfg.adapter.method})
        self.codec = make_codec(cfg.codec.name)
        self.aggregator = make_aggregator(cfg)
        self.server_opt = make_server_optimizer(cfg)
        self.store = ClientStateStore(cfg.runtime.cache_clients, cfg.runtime.state_dir)
        self.ctx = ClientContext(cfg=cfg, model=self.model, spec=self.spec, task=self.task, encoded=self.encoded,
                                 data=self.data, codec=self.codec, store=self.store)
        self.runtime = make_runtime(cfg, make_client(self.ctx))
        self.global_flat = self.spec.flat()
        self.start_round = 1

    # ------------------------------------------------------------------ state
    def checkpoint_state(self, rnd: int) -> dict[str, Any]:
        return {"round": rnd, "names": self.spec.names, "global": self.global_flat.clone(),
                "aggregator": self.aggregator.state_dict(), "server_opt": self.server_opt.state_dict(),
                "store": self.store.state_dict()}

    def load_checkpoint_state(self, ck: dict[str, Any]) -> None:
        if ck["names"] != self.spec.names:
            raise FedfmError("checkpoint does not match this config's trainable parameters (was the config changed?)")
        self.global_flat = ck["global"].clone()
        self.spec.load_flat(self.global_flat)
        self.aggregator.load_state_dict(ck["aggregator"])
        self.server_opt.load_state_dict(ck["server_opt"])
        self.store.load_state_dict(ck["store"])
        self.start_round = ck["round"] + 1

    # ------------------------------------------------------------------ evaluation
    def _fixed_sample(self, indices: np.ndarray, k: int | None, purpose: int) -> np.ndarray:
        """The same seeded subset of ``indices`` at every eval (all of them when ``k`` is None or large enough)."""
        if k is None or k >= len(indices):
            return indices
        rng = np.random.default_rng([self.cfg.federation.seed, purpose])
        return np.sort(rng.choice(indices, size=k, replace=False))

    def evaluate(self, rnd: int = 0) -> dict[str, Any]:
        cfg, task, enc = self.cfg, self.task, self.encoded
        self.spec.load_flat(self.global_flat)
        out: dict[str, Any] = {}
        for k, v in task.evaluate(self.model, enc, self.eval_indices, cfg.eval.batch_size).items():
            out[f"eval_{k}"] = v
        if len(self.prompt_indices):
            metrics, records = task.generate(self.model, self.prompt_indices)
            out.update({f"eval_{k}": v for k, v in metrics.items()})
            if self.run_dir is not None:
                self.run_dir.write_generations(rnd, records)
        if cfg.eval.per_client:
            key, better_high = ("accuracy", True) if task.needs_labels else ("loss", False)
            short = "acc" if key == "accuracy" else key
            per = {}
            for c in self.data.clients:
                if len(c.test):
                    per[str(c.id)] = task.evaluate(self.model, enc, c.test, cfg.eval.batch_size)[key]
            if per:
                vals = list(per.values())
                out[f"client_{short}"] = per
                out[f"client_{short}_mean"] = float(np.mean(vals))
                out[f"client_{short}_worst10"] = worst_fraction_mean(vals, 0.1, better_high)
        return out

    # ------------------------------------------------------------------ one round
    def run_round(self, rnd: int) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        ids = sample_clients(cfg.federation, len(self.data.clients), rnd)
        payload = self.codec.encode(self.spec.unflatten(self.global_flat))
        tasks = [ClientTask(client_id=int(c), round=rnd, payload=payload, seed=derive_seed(cfg.federation.seed, 4, rnd, c))
                 for c in ids]
        self.display.round_start(rnd, cfg.federation.rounds, len(tasks))
        results = self.runtime.run(tasks, on_result=self.display.client_done)

        accepted: list[tuple[ClientResult, torch.Tensor]] = []
        dropped: list[dict[str, Any]] = []
        for res in results:
            if res.error is not None:
                dropped.append({"id": res.client_id, "error": res.error})
                continue
            try:
                delta = self.codec.decode(res.update, self.spec)
                if res.num_examples <= 0:
                    raise UpdateRejected(f"num_examples must be positive, got {res.num_examples}")
            except UpdateRejected as e:
                dropped.append({"id": res.client_id, "error": f"rejected: {e}"})
                continue
            accepted.append((res, self.spec.flatten(delta)))

        row: dict[str, Any] = {"round": rnd}
        if len(accepted) >= cfg.federation.min_clients:
            updates = torch.stack([d for _, d in accepted])
            weights = torch.tensor([float(r.num_examples) for r, _ in accepted])
            delta = self.aggregator(updates, weights)
            self.global_flat = self.server_opt.step(self.global_flat, delta)
            self.spec.load_flat(self.global_flat)
            row["train_loss"] = float(sum(r.metrics["train_loss"] * r.num_examples for r, _ in accepted) / weights.sum())
            row["aggregated"] = True
        else:
            row["aggregated"] = False
            self.display.message(f"round {rnd}: only {len(accepted)} client(s) returned a usable update "
                                 f"(federation.min_clients={cfg.federation.min_clients}); global model unchanged")
        every = cfg.eval.every
        if every and (rnd % every == 0 or rnd == cfg.federation.rounds):
            row.update(self.evaluate(rnd))
        row.update({
            "bytes_up": int(sum(len(r.update) for r in results)),
            "bytes_down": int(len(payload) * len(tasks)),
            "clients": [int(c) for c in ids],
            "dropped": dropped,
            "wall_s": time.perf_counter() - t0,
        })
        return row

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        rows = []
        if self.start_round == 1 and cfg.eval.initial and cfg.eval.every:
            t0 = time.perf_counter()
            row = {"round": 0, **self.evaluate(0), "wall_s": time.perf_counter() - t0}
            self._log(row)
            rows.append(row)
        for rnd in range(self.start_round, cfg.federation.rounds + 1):
            row = self.run_round(rnd)
            self._log(row)
            if self.run_dir is not None:
                self.run_dir.save_checkpoint(rnd, self.checkpoint_state(rnd), cfg.output.keep_checkpoints)
            rows.append(row)
        if self.run_dir is not None:
            self.save_final()
        self.runtime.close()
        return rows

    def _log(self, row: dict[str, Any]) -> None:
        if self.run_dir is not None:
            self.run_dir.append_metrics(row)
        self.display.round_end(row)

    def save_final(self) -> Path:
        """The final global state as a standard PEFT adapter directory (or a full model dir for non-peft methods)."""
        from .models.adapters import is_peft

        assert self.run_dir is not None
        self.spec.load_flat(self.global_flat)
        target = self.run_dir.adapter if is_peft(self.model) else self.run_dir.path / "model"
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        if self.bundle.tokenizer is not None:
            self.bundle.tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target
