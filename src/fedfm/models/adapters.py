"""Adaptation methods: what is trained and shared. Built on peft wherever peft has the method."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..registry import Registry

# name -> fn(model, adapter_cfg, task_type: str, head_names: list[str]) -> model with exactly the shared params trainable
METHODS: Registry[Callable[..., Any]] = Registry("adaptation method")

PEFT_METHODS = {"lora", "prompt", "prefix", "ia3"}


def _peft_wrap(model, peft_config):
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


def _freeze_all(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _unfreeze_heads(model, head_names: list[str]) -> None:
    for name, module in model.named_modules():
        if name.split(".")[-1] in head_names:
            for p in module.parameters():
                p.requires_grad_(True)


# peft knows the attention projections of text models by model_type; these are the image models' (ViT-style models
# name them query/key/value like BERT, CLIP and SigLIP vision towers q_proj/k_proj/v_proj): LoRA on the attention's
# query and value (Hu et al.'s choice), IA3 on key, value and the feed-forward output (peft's BERT entry)
_VIT = {"lora": ["query", "value"], "ia3": (["key", "value", "output.dense"], ["output.dense"])}
_DINOV2 = {"lora": ["query", "value"], "ia3": (["key", "value", "fc2"], ["fc2"])}
_CLIP = {"lora": ["q_proj", "v_proj"], "ia3": (["k_proj", "v_proj", "fc2"], ["fc2"])}
VISION_TARGETS = {"vit": _VIT, "deit": _VIT, "vit_msn": _VIT, "ijepa": _VIT, "dinov2": _DINOV2,
                  "dinov2_with_registers": _DINOV2, "clip": _CLIP, "clip_vision_model": _CLIP, "siglip": _CLIP,
                  "siglip_vision_model": _CLIP, "siglip2": _CLIP, "metaclip_2": _CLIP}


def default_targets(model, method: str):
    """The target modules of ``method`` for an image model peft has no defaults for (None: peft's own)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return VISION_TARGETS.get(model_type, {}).get(method)


@METHODS.register("lora")
def lora(model, cfg, task_type: str, head_names: list[str]):
    """LoRA (Hu et al. 2021): low-rank updates B·A on the target projections; the task head is trained and shared."""
    from peft import LoraConfig

    return _peft_wrap(model, LoraConfig(
        task_type=task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules or default_targets(model, "lora"), modules_to_save=head_names or None,
    ))


@METHODS.register("ffa-lora")
def ffa_lora(model, cfg, task_type: str, head_names: list[str]):
    """FFA-LoRA (Sun et al. 2024): A stays frozen at its shared random init; only B (and the head) is trained and sent."""
    model = lora(model, cfg, task_type, head_names)
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(False)
    return model


@METHODS.register("fedsa-lora")
def fedsa_lora(model, cfg, task_type: str, head_names: list[str]):
    """FedSA-LoRA (Guo et al. 2024): A is shared and aggregated; B stays on each client as a personal parameter."""
    return lora(model, cfg, task_type, head_names)


fedsa_lora.personal = ["lora_B"]


@METHODS.register("prompt")
def prompt(model, cfg, task_type: str, head_names: list[str]):
    """Prompt tuning (Lester et al. 2021): trainable soft tokens prepended to the input embeddings."""
    from peft import PromptTuningConfig

    return _peft_wrap(model, PromptTuningConfig(
        task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens, modules_to_save=head_names or None))


@METHODS.register("prefix")
def prefix(model, cfg, task_type: str, head_names: list[str]):
    """Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every attention layer."""
    from peft import PrefixTuningConfig

    return _peft_wrap(model, PrefixTuningConfig(
        task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens, modules_to_save=head_names or None))


def takes_past_key_values(model_type: str) -> bool | None:
    """Whether transformers' base model class for ``model_type`` names ``past_key_values`` in its forward (read from
    the class, no weights loaded); None for a model type transformers does not know."""
    import inspect

    from transformers import CONFIG_MAPPING, MODEL_MAPPING

    try:
        cls = MODEL_MAPPING[CONFIG_MAPPING[model_type]]
    except (KeyError, ValueError):
        return None
    return "past_key_values" in inspect.signature(cls.forward).parameters


def _text_only(run_cfg) -> None:
    """peft's prompt and prefix tuning put virtual tokens before a text input: an image task has none."""
    from ..errors import ConfigError
    from ..tasks import TASKS

    if TASKS.get(run_cfg.task.name).reads_images:
        raise ConfigError(f"adapter.method {run_cfg.adapter.method!r} adds virtual text tokens, which peft supports "
                          f"for text models only; task.name {run_cfg.task.name!r} needs lora, ia3, bitfit, head or "
                          f"full")


def _prefix_check(run_cfg) -> None:
    """peft hands a classifier's prefixes to its model as a ``past_key_values`` argument (a causal LM gets them as a
    keyword it passes on): refuse, before anything loads, a model that takes none, as BERT-like encoders do from
    transformers 5 on."""
    from ..tasks import TASKS
    from .loader import peek_model_type

    _text_only(run_cfg)
    if TASKS.get(run_cfg.task.name).peft_task_type == "CAUSAL_LM":
        return
    model_type = peek_model_type(run_cfg.model)
    if model_type is None or takes_past_key_values(model_type) is not False:
        return
    import transformers

    model = run_cfg.model.name_or_path or "model.from_config"
    raise ValueError(f"adapter.method 'prefix': model {model!r} (model_type {model_type!r}) takes no past_key_values "
                     f"with transformers {transformers.__version__}, and peft's prefix tuning of a classifier passes "
                     f"the prefixes through them; BERT-like encoders lost them in transformers 5 (pip install "
                     f"'transformers<5'), or use adapter.method prompt or lora")


prefix.check_config = _prefix_check
prompt.check_config = _text_only
prompt.virtual_tokens = prefix.virtual_tokens = True  # trains tokens outside the base's layers (no layer to cut at)


lora.lora_ranks = True  # heterogeneous ranks (adapter.rank_per_client) need LoRA factors to cut
fedsa_lora.lora_ranks = True


@METHODS.register("coop")
def coop(model, cfg, task_type: str, head_names: list[str]):
    """CoOp (Zhou et al. 2022): M = adapter.num_virtual_tokens context vectors shared by all classes, in front of each
    class name in the prompts of a frozen CLIP; they are the only trainable (and, as in PromptFL, shared) parameters."""
    from .coop import PromptedCLIP

    return PromptedCLIP(model, cfg.num_virtual_tokens)


def _coop_check(run_cfg) -> None:
    """CoOp's prompts need class names and a text tower: only a task that builds them (``clip_prompt``) trains it, on
    a model with CLIP's text and vision towers, read from its config (and its modules on the meta device)."""
    from ..tasks import TASKS
    from .loader import peek_config

    if not getattr(TASKS.get(run_cfg.task.name), "learns_context", False):
        tasks = ", ".join(n for n in TASKS if getattr(TASKS.get(n), "learns_context", False))
        raise ValueError(f"adapter.method 'coop' learns the context of a CLIP model's class prompts; task.name "
                         f"{run_cfg.task.name!r} has no class prompts (use task.name {tasks})")
    config = peek_config(run_cfg.model)
    if config is None:  # not at hand (a Hub id not in the cache): loading it reports what is wrong
        return
    m = run_cfg.model
    model = "model.from_config" if m.from_config is not None else f"model.name_or_path {m.name_or_path!r}"
    task = f"task.name {run_cfg.task.name!r}"
    if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        raise ValueError(f"{task} needs a CLIP-style image-text model (a config with text_config and vision_config); "
                         f"{model} (model_type {config.model_type!r}) has no text tower")
    missing = _missing_clip_parts(m, TASKS.get(run_cfg.task.name).auto_class)
    if missing:
        raise ValueError(f"{task}, adapter.method 'coop': {model} (model_type {config.model_type!r}) does not have "
                         f"CLIP's layout: no {', '.join(missing)}")


_LAYOUTS: dict[str, list[str]] = {}


def _missing_clip_parts(model_cfg, auto_class: str) -> list[str]:
    """What of CLIP's layout the model lacks, read from its modules built on the meta device (no weights), once per
    model section in a process."""
    key = model_cfg.model_dump_json(include={"name_or_path", "from_config", "revision"}) + auto_class
    if key not in _LAYOUTS:
        from .coop import missing_parts
        from .loader import empty_base

        base = empty_base(model_cfg, auto_class)
        _LAYOUTS[key] = missing_parts(base) if base is not None else []
    return _LAYOUTS[key]


coop.check_config = _coop_check
coop.virtual_tokens = True  # trains tokens outside the base's layers (no layer to cut at)


@METHODS.register("ia3")
def ia3(model, cfg, task_type: str, head_names: list[str]):
    """IA3 (Liu et al. 2022): learned rescaling vectors on keys, values and feed-forward activations."""
    from peft import IA3Config

    kwargs: dict[str, Any] = {}
    if cfg.target_modules:
        kwargs.update(target_modules=cfg.target_modules, feedforward_modules=[])
    elif default_targets(model, "ia3") is not None:
        targets, feedforward = default_targets(model, "ia3")
        kwargs.update(target_modules=targets, feedforward_modules=feedforward)
    return _peft_wrap(model, IA3Config(task_type=task_type, modules_to_save=head_names or None, **kwargs))


@METHODS.register("bitfit")
def bitfit(model, cfg, task_type: str, head_names: list[str]):
    """BitFit (Ben Zaken et al. 2022): train only the bias terms (and the task head)."""
    _freeze_all(model)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)
    _unfreeze_heads(model, head_names)
    return model


@METHODS.register("head")
def head(model, cfg, task_type: str, head_names: list[str]):
    """Linear probing: train only the task head on the frozen base."""
    _freeze_all(model)
    _unfreeze_heads(model, head_names)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"adapter.method 'head': the model has no head module named one of {head_names}")
    return model


@METHODS.register("full")
def full(model, cfg, task_type: str, head_names: list[str]):
    """Full fine-tuning: every parameter is trained and shared."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# the layers peft can adapt (transformers' Conv1D, GPT-2's linear layer, by name: no import of its module)
ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
             torch.nn.MultiheadAttention)


def _adaptable(module) -> bool:
    return isinstance(module, ADAPTABLE) or type(module).__name__ == "Conv1D"


def check_target_modules(run_cfg) -> None:
    """``adapter.target_modules``: each name matches, as peft matches them (a module's name or its last parts), only
    layers peft can adapt, checked on the base built on the meta device, so before any weights are read."""
    targets = run_cfg.adapter.target_modules
    if not targets:
        return
    from ..errors import ConfigError
    from ..tasks import TASKS
    from .loader import empty_base

    model = empty_base(run_cfg.model, TASKS.get(run_cfg.task.name).auto_class)
    if model is None:
        return
    layers = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _adaptable(m)}))
    for target in targets:
        matched = [(n, m) for n, m in model.named_modules() if n == target or n.endswith("." + target)]
        if not matched:
            raise ConfigError(f"adapter.target_modules: {target!r} matches no module of the model "
                              f"(its layers that can be adapted: {layers})")
        other = next(((n, m) for n, m in matched if not _adaptable(m)), None)
        if other is not None:
            raise ConfigError(f"adapter.target_modules: {target!r} matches {other[0]} ({type(other[1]).__name__}), "
                              f"not a linear, convolution or embedding layer (the model's: {layers})")


def apply_adapter(model, cfg, task_type: str, head_names: list[str]):
    """Wrap/freeze ``model`` so exactly the shared parameters require grad."""
    model = METHODS.get(cfg.method)(model, cfg, task_type, head_names)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"adapter.method {cfg.method!r} left no trainable parameter")
    return model


def apply_to_blocks(model, cfg, task_type: str, head_names: list[str], layers: list[int], blocks_name: str):
    """The adapter on the transformer blocks ``layers`` of ``blocks_name`` only (offsite tuning's adapter, Xiao et al.
    2023), and the task head: ``lora`` with peft's ``layers_to_transform``, ``full`` on those blocks' parameters."""
    if cfg.method == "lora":
        from peft import LoraConfig

        return _peft_wrap(model, LoraConfig(
            task_type=task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules or default_targets(model, "lora"), modules_to_save=head_names or None,
            layers_to_transform=list(layers), layers_pattern=blocks_name.rsplit(".", 1)[-1]))
    if cfg.method != "full":
        raise ValueError(f"adapter.method {cfg.method!r}: only lora and full can be put on chosen blocks")
    _freeze_all(model)
    blocks = model.get_submodule(blocks_name)
    for i in layers:
        for p in blocks[i].parameters():
            p.requires_grad_(True)
    _unfreeze_heads(model, head_names)
    return model


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


@torch.no_grad()
def count_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
