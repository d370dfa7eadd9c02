"""Offsite-Tuning (Xiao et al. 2023, "Offsite-Tuning: Transfer Learning without Full Model"): the owner's side.

The owner of a model of N blocks keeps it. It sends the data owners the adapter A (the first k and the last k
blocks, ``offsite.adapter_layers`` = k) around an emulator E* of the middle N − 2k blocks: a fraction
``offsite.drop_ratio`` of them dropped, the rest kept uniformly spaced (the paper's layer drop), frozen, and
optionally distilled for ``offsite.distill_steps`` steps on the owner's public text (the MSE between E*'s output and
the full middle E's, the paper's §3.3). The clients tune A on [A, E*]; the owner plugs the tuned A back into
[A, E], the full model. Here: the plan of blocks, the emulator built from the full model and written as a Hugging Face
directory (its config with the reduced layer count, safetensors, the tokenizer) that the clients load as their base,
and A's names mapped between the emulator's block indices and the full model's (the last k differ).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
import torch

from ..errors import ConfigError
from ..models.blocks import find_blocks
from ..randomness import Randomness

WHO = "client.algorithm 'offsite'"


@dataclass(frozen=True)
class Plan:
    """Which blocks of the full model (indices 0..N−1) the emulator holds, in order: the k first (adapter), the kept
    middle ones (E*), the k last (adapter)."""

    depth: int  # N
    k: int
    kept: tuple[int, ...]  # the middle blocks kept, full indices

    @property
    def order(self) -> tuple[int, ...]:
        """The full model's index of each emulator block."""
        return (*range(self.k), *self.kept, *range(self.depth - self.k, self.depth))

    @property
    def dropped(self) -> list[int]:
        return sorted(set(range(self.depth)) - set(self.order))

    def adapter(self, emulator: bool) -> list[int]:
        """The adapter's blocks, numbered in the emulator (``emulator``) or in the full model."""
        n = len(self.order) if emulator else self.depth
        return [*range(self.k), *range(n - self.k, n)]


def plan(depth: int, k: int, drop_ratio: float) -> Plan:
    """The emulator's blocks: k + the middle blocks kept + k. Of the m = N − 2k middle blocks, round(m (1 − r)) are
    kept, uniformly spaced from the first middle block to the last (the paper's ``uniform_choose_layers``)."""
    middle = depth - 2 * k
    if middle < 1:
        raise ConfigError(f"offsite.adapter_layers: {k} first and {k} last blocks of the model's {depth} "
                          f"(num_hidden_layers) leave no middle block to emulate; the paper's adapter is the model "
                          f"around a compressed middle, so offsite.adapter_layers must be below {depth / 2:g}")
    keep = round(middle * (1 - drop_ratio))
    if keep < 1:
        raise ConfigError(f"offsite.drop_ratio: {drop_ratio:g} of the {middle} middle blocks leaves none of them in "
                          f"the emulator (round({middle} × (1 − {drop_ratio:g})) = 0); the clients would tune the "
                          f"adapter on a model without its middle; use offsite.drop_ratio ≤ "
                          f"{1 - 0.5 / middle:.3g}")
    if keep == 1:
        kept = (k + (middle - 1) // 2,)
    else:
        stride = (middle - 1) / (keep - 1)
        kept = tuple(k + round(i * stride) for i in range(keep))
    return Plan(depth, k, kept)


def _block_pattern(blocks_name: str) -> re.Pattern:
    return re.compile(rf"(^|\.){re.escape(blocks_name)}\.(\d+)\.")


def block_index(name: str, blocks_name: str) -> int | None:
    """The block a parameter's name is in (None: outside the blocks)."""
    m = _block_pattern(blocks_name).search(name)
    return None if m is None else int(m.group(2))


def renumber(name: str, blocks_name: str, mapping: dict[int, int]) -> str:
    """``name`` with its block index i replaced by ``mapping[i]`` (peft's prefixes and suffixes kept)."""
    return _block_pattern(blocks_name).sub(lambda m: f"{m.group(1)}{blocks_name}.{mapping[int(m.group(2))]}.", name,
                                           count=1)


def build_emulator(base: torch.nn.Module, p: Plan) -> torch.nn.Module:
    """[A, E*]: a model of the base's class and config with ``len(p.order)`` blocks, holding the base's tensors of
    those blocks (renumbered) and everything outside the blocks (embeddings, final norm, head)."""
    blocks_name, blocks = find_blocks(base, WHO)
    if len(blocks) != p.depth:
        raise ConfigError(f"{WHO}: the model has {len(blocks)} blocks ({blocks_name}), not {p.depth}")
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = len(p.order)
    if isinstance(getattr(config, "layer_types", None), list):  # per-block attention kinds (sliding, full, …)
        config.layer_types = [config.layer_types[i] for i in p.order]
    index = {full: j for j, full in enumerate(p.order)}
    state = {}
    for name, t in base.state_dict().items():
        i = block_index(name, blocks_name)
        if i is None or i in index:
            state[name if i is None else renumber(name, blocks_name, index)] = t
    emulator = type(base)(config)
    emulator.load_state_dict(state, strict=True)
    emulator.to(next(base.parameters()).device)
    emulator.eval()
    return emulator


class _Stop(Exception):
    pass


def block_input(model, index: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden states entering block ``index`` (the forward stops there)."""
    _, blocks = find_blocks(model, WHO)
    seen: dict[str, torch.Tensor] = {}

    def stop(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    hook = blocks[index].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        hook.remove()
    return seen["h"]


def distill(emulator, base, p: Plan, texts: list[str], tokenizer, ocfg, max_length: int,
            generator: torch.Generator) -> list[float]:
    """The paper's emulator distillation: E*'s blocks trained (AdamW) so that the hidden states entering the last
    k blocks match the full model's, MSE over the real tokens of the owner's public text; A stays as it is. Returns
    the loss of each step."""
    if not texts:
        raise ConfigError("offsite.distill_steps: the owner has no public text to distill on (data.test_fraction is "
                          "0, so the server holds no held-out split); set offsite.distill_steps=0")
    _, blocks = find_blocks(emulator, WHO)
    middle = [q for j in range(p.k, len(p.order) - p.k) for q in blocks[j].parameters()]
    for q in middle:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(middle, lr=ocfg.distill_lr, weight_decay=0.0)
    device = next(emulator.parameters()).device
    emulator.train()
    losses = []
    for _ in range(ocfg.distill_steps):
        rows = torch.randint(len(texts), (ocfg.distill_batch_size,), generator=generator).tolist()
        enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batch = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            target = block_input(base, p.depth - p.k, batch)
        got = block_input(emulator, len(p.order) - p.k, batch)
        mask = batch["attention_mask"].unsqueeze(-1).to(got.dtype)
        loss = ((got - target) ** 2 * mask).sum() / (mask.sum() * got.shape[-1])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    for q in middle:
        q.requires_grad_(False)
    emulator.eval()
    return losses


@dataclass
class Emulator:
    """What the owner built and sent: the emulator's directory, its plan, and the full model it kept."""

    path: Path  # the Hugging Face directory each client receives once
    plan: Plan
    blocks_name: str  # in the raw model (``model.layers``); a wrapped model's names contain it
    full: torch.nn.Module = field(repr=False)  # [A, E]: stays with the owner
    distill_losses: list[float] = field(default_factory=list)

    def files(self) -> list[Path]:
        return sorted(f for f in self.path.rglob("*") if f.is_file())

    @property
    def nbytes(self) -> int:
        """The bytes each client receives once: every file of the directory."""
        return sum(f.stat().st_size for f in self.files())

    full_bytes: int = 0  # the full model's tensors as stored, each once (tied embeddings are one), before any adapter

    def __post_init__(self) -> None:
        unique = {t.data_ptr(): t for t in self.full.state_dict().values()}
        self.full_bytes = sum(t.numel() * t.element_size() for t in unique.values())

    def to_full(self, name: str) -> str:
        """An emulator parameter's name in the full model (the last k blocks are renumbered)."""
        return renumber(name, self.blocks_name, dict(enumerate(self.plan.order)))

    def client_model_config(self, model_cfg):
        """``model.*`` of the clients: the emulator's directory, with its own tokenizer."""
        return model_cfg.model_copy(update=dict(name_or_path=str(self.path), from_config=None, gguf_file=None,
                                                tokenizer=None, train_tokenizer=None, revision=None))


def public_text(data) -> list[str]:
    """The owner's public text: the server's held-out split (its texts, or its conversations' turns joined)."""
    texts = data.public_texts()
    ex = data.examples
    if not texts and ex.messages is not None:
        texts = ["\n".join(m["content"] for m in ex.messages[i]) for i in data.test]
    return texts


def _key(cfg, base, tokenizer, texts: list[str]) -> str:
    """What the emulator depends on: the model's reference and built config, the seed, the offsite section, the
    tokenizer's size and (when distilled) the public text."""
    model = cfg.model.model_dump(mode="json", exclude={"device", "autocast", "gradient_checkpointing"})
    parts = {"model": model, "config": base.config.to_json_string(), "seed": cfg.federation.seed,
             "offsite": cfg.offsite.model_dump(mode="json"), "vocab": len(tokenizer) if tokenizer is not None else 0,
             "max_length": cfg.task.max_length}
    if cfg.offsite.distill_steps:
        parts["text"] = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def build(cfg, base, tokenizer, texts: list[str], cache: Path) -> Emulator:
    """The owner's act: the plan for ``base``, the emulator (distilled when asked) written once under ``cache``
    (keyed by what it depends on, written to a temporary name and renamed), or the one written before."""
    if tokenizer is None:
        raise ConfigError(f"{WHO}: the emulator directory carries the tokenizer the clients use, and this model has "
                          f"none (model.from_config without model.tokenizer); set model.tokenizer")
    blocks_name, blocks = find_blocks(base, WHO)
    p = plan(len(blocks), cfg.offsite.adapter_layers, cfg.offsite.drop_ratio)
    target = cache / "emulators" / _key(cfg, base, tokenizer, texts)
    losses: list[float] = []
    record = target / "owner.json"  # kept by the owner, beside (not in) what is sent
    if record.exists():
        losses = json.loads(record.read_text()).get("distill_losses", [])
        return Emulator(target / "emulator", p, blocks_name, base, losses)
    emulator = build_emulator(base, p)
    if cfg.offsite.distill_steps:
        gen = Randomness.from_config(cfg).torch("offsite_distill")
        losses = distill(emulator, base, p, texts, tokenizer, cfg.offsite, cfg.task.max_length, gen)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        emulator.save_pretrained(str(tmp / "emulator"), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp / "emulator"))
        (tmp / "owner.json").write_text(json.dumps({"order": list(p.order), "depth": p.depth,
                                                     "distill_losses": losses}))
        tmp.rename(target)
    except OSError:
        if not record.exists():  # not another process's copy renamed into place meanwhile
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del emulator
    return Emulator(target / "emulator", p, blocks_name, base, losses)

