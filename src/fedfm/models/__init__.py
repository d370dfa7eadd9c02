"""The foundation model: the frozen base + the adaptation method, built once per process."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..randomness import Randomness
from .state import StateSpec


@dataclass
class ModelBundle:
    model: torch.nn.Module
    spec: StateSpec  # the shared trainable parameters: the only model data that travels
    task: Any
    tokenizer: Any
    personal: StateSpec  # trainable parameters that stay on each client (empty without personalization)
    origin: Any = None  # where a base other than ``cfg.model`` came from (offsite tuning: the owner's emulator)


def resolve_device(model_cfg) -> torch.device:
    if model_cfg.device:
        return torch.device(model_cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_base(cfg, tokenizer, examples) -> tuple[Any, torch.nn.Module]:
    """The task and the frozen base, seeded (a ``from_config`` base is then the same in every process), with the
    sizes the data and tokenizer fix (labels, pad/bos/eos ids, a trained tokenizer's vocabulary)."""
    from ..tasks import make_task
    from .loader import load_base

    task = make_task(cfg, tokenizer)
    kwargs = task.model_kwargs(examples)
    if getattr(tokenizer, "pad_token_id", None) is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    if cfg.model.train_tokenizer is not None and cfg.model.from_config is not None and tokenizer is not None:
        kwargs.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(Randomness(cfg.federation.seed).seed("model_init"))
    return task, load_base(cfg.model, task.auto_class, **kwargs)


def build_model(cfg, examples, public_texts: list[str] | None = None, adapt=None) -> ModelBundle:
    """Tokenizer, task, base (seeded, so head and adapter inits are reproducible), adapter, and the shared-state spec.

    ``public_texts`` is the text a tokenizer is trained on when ``model.train_tokenizer`` asks for one (the server's
    held-out split, never a client's data). ``adapt(base, adapter_cfg, task_type, head_names)`` replaces
    ``adapters.apply_adapter`` (offsite tuning puts the adapter on chosen blocks only).
    """
    from ..tasks import TASKS
    from .adapters import apply_adapter

    tokenizer = TASKS.get(cfg.task.name).load_preprocessor(cfg.model, public_texts)
    task, base = build_base(cfg, tokenizer, examples)
    device = resolve_device(cfg.model)
    if cfg.model.quantization is None:
        base.to(device)
    if cfg.model.gradient_checkpointing:
        # recompute activations in backward instead of storing them; inputs must require grad for frozen bases
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if cfg.model.quantization is not None:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    model = (adapt or apply_adapter)(base, cfg.adapter, task.peft_task_type, task.head_names)
    task.prepare_model(model)
    model.train()
    task.device = next(model.parameters()).device
    patterns = personal_patterns(cfg.adapter)
    return ModelBundle(model=model, spec=StateSpec(model, patterns), task=task, tokenizer=tokenizer,
                       personal=StateSpec(model, patterns, shared=False))


def personal_patterns(adapter_cfg) -> list[str]:
    """``adapter.personal`` plus what the method keeps local by definition (FedSA-LoRA: ``lora_B``)."""
    from .adapters import METHODS

    return list(adapter_cfg.personal) + list(getattr(METHODS.get(adapter_cfg.method), "personal", []))
