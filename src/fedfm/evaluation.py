"""The server's own model: the global state loaded into a base to evaluate it on the server's own held-out set and
to export it as a PEFT adapter. Nothing here reads client data."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


class ServerModel:
    """A base with the adapter (in a simulation, the one base the clients share), the task, and the server's own
    held-out set: its encoded rows, the examples scored at each evaluation and the prompts answered."""

    def __init__(self, cfg, bundle, held_out: dict[str, torch.Tensor] | None, eval_indices: np.ndarray,
                 prompt_indices: np.ndarray, pool: np.ndarray | None = None):
        self.cfg, self.bundle = cfg, bundle
        self.model, self.spec, self.task, self.personal = bundle.model, bundle.spec, bundle.task, bundle.personal
        self.personal_init = self.personal.flat()
        self.held_out, self.eval_indices, self.prompt_indices, self.pool = held_out, eval_indices, prompt_indices, pool

    def on(self, bundle) -> "ServerModel":
        """The same held-out set, examples and prompts, scored with another model (offsite: the owner's full one)."""
        return ServerModel(self.cfg, bundle, self.held_out, self.eval_indices, self.prompt_indices, pool=self.pool)

    def load(self, flat: torch.Tensor) -> None:
        """The global model: the shared global state, personal parameters at their initial values."""
        self.spec.load_flat(flat)
        if self.personal.names:
            self.personal.load_flat(self.personal_init)

    def evaluate(self, flat: torch.Tensor) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``eval_<metric>`` of the global state on the held-out set, and the generation records (if prompts)."""
        self.load(flat)
        out: dict[str, Any] = {}
        if self.held_out is None:
            return out, []
        for k, v in self.task.evaluate(self.model, self.held_out, self.eval_indices, self.cfg.eval.batch_size).items():
            out[f"eval_{k}"] = v
        records: list[dict[str, Any]] = []
        if len(self.prompt_indices):
            metrics, records = self.task.generate(self.model, self.prompt_indices, pool=self.pool)
            out.update({f"eval_{k}": v for k, v in metrics.items()})
        return out, records

    def target(self, run_dir) -> Path:
        """Where ``save`` writes: ``adapter/`` (a PEFT adapter) or ``model/`` (a full model, for non-peft methods)."""
        from .models.adapters import is_peft

        return run_dir.adapter if is_peft(self.model) else run_dir.path / "model"

    def save(self, run_dir, flat: torch.Tensor) -> Path:
        """The global state as a standard PEFT adapter directory (or a full model dir for non-peft methods), written
        to a temporary name and renamed into place: a failed write leaves the previous one as it was."""
        self.load(flat)
        target = self.target(run_dir)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.model.save_pretrained(str(tmp))
            if self.bundle.tokenizer is not None:
                self.bundle.tokenizer.save_pretrained(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target
