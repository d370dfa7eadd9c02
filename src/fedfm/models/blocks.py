"""The transformer blocks of a model: where split learning cuts it and where offsite tuning drops layers."""
from __future__ import annotations

import torch

from ..errors import ConfigError


def find_blocks(model, who: str = "model") -> tuple[str, torch.nn.ModuleList]:
    """The model's transformer blocks: the ModuleList of modules of one class holding the most parameters
    (``bert.encoder.layer``, ``model.layers``), and its name. ``who`` names the caller in the error."""
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]
    if not lists:
        raise ConfigError(f"{who}: the model has no list of transformer blocks")
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def peek_depth(model_cfg) -> int | None:
    """The model's block count (``num_hidden_layers``) from its config, without loading weights; None when the config
    is not at hand (a GGUF alias: checked when the model loads)."""
    from .loader import peek_config

    depth = getattr(peek_config(model_cfg), "num_hidden_layers", None)
    return depth if isinstance(depth, int) else None
