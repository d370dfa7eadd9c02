"""The foundation model: the frozen base + the adaptation method, built once per process."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .adapters import apply_adapter
from .loader import load_base, load_tokenizer
from .state import StateSpec


@dataclass
class ModelBundle:
    model: torch.nn.Module
    spec: StateSpec
    task: Any
    tokenizer: Any


def build_model(cfg, examples) -> ModelBundle:
    """Tokenizer, task, base (seeded, so head and adapter inits are reproducible), adapter, and the shared-state spec."""
    from ..tasks import make_task

    tokenizer = load_tokenizer(cfg.model)
    task = make_task(cfg, tokenizer)
    kwargs = task.model_kwargs(examples)
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    torch.manual_seed(cfg.federation.seed)
    base = load_base(cfg.model, task.auto_class, **kwargs)
    model = apply_adapter(base, cfg.adapter, task.peft_task_type, task.head_names)
    model.train()
    return ModelBundle(model=model, spec=StateSpec(model), task=task, tokenizer=tokenizer)
