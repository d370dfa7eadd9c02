"""Offsite-Tuning (Xiao et al. 2023), federated as in FederatedScope-LLM (Kuang et al. 2024): the clients tune the
adapter A (the first and last ``offsite.adapter_layers`` blocks, or LoRA on them) on the emulator [A, E*] the owner
sent them once; the owner (the server side) aggregates A and plugs it into the full model [A, E] it never sent.

The shared state is A named as in the emulator; the server half maps it to the full model's names (the last k blocks
are numbered N−k..N−1 there, E−k..E−1 in the emulator), scores the full model with A plugged in on the server's
held-out set (``plugged_<metric>``, beside the emulator's ``eval_<metric>``) and writes that full model's adapter as
the run's. The owner's side (the plan, the emulator, its distillation) is ``ownership/offsite.py``.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any

import torch

from ..errors import ConfigError, FedfmError
from . import CLIENT_ALGORITHMS, LocalTraining, ServerSide


def check_config(cfg) -> None:
    """What offsite tuning cannot do, refused before anything loads (each message names its key)."""
    from ..models import personal_patterns
    from ..models.blocks import peek_depth
    from ..ownership.offsite import plan

    refusals = [
        (cfg.adapter.method not in ("lora", "full"),
         f"adapter.method {cfg.adapter.method!r}: the adapter is the first and last offsite.adapter_layers blocks, "
         f"tuned whole (full, the paper's) or with LoRA on them (lora, peft's layers_to_transform); use full or lora"),
        (bool(personal_patterns(cfg.adapter)),
         "adapter.personal: personal parameters are not supported (the adapter is plugged into the owner's model "
         "whole)"),
        (cfg.adapter.rank_per_client is not None, "adapter.rank_per_client (heterogeneous LoRA ranks) is not "
                                                  "supported"),
        (cfg.runtime.name != "local", f"runtime.name {cfg.runtime.name!r}: the clients' base is the emulator the "
                                      f"owner builds in this process, which only runtime.name local hands them (the "
                                      f"batched, ray and flower runtimes build cfg.model, the full model, for every "
                                      f"client)"),
        (cfg.model.quantization is not None, f"model.quantization {cfg.model.quantization!r}: the emulator is built "
                                             f"from the full-precision model's tensors"),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"client.algorithm 'offsite': {why}")
    depth = peek_depth(cfg.model)
    if depth is not None:
        try:
            plan(depth, cfg.offsite.adapter_layers, cfg.offsite.drop_ratio)
        except ConfigError as e:
            raise ValueError(str(e)) from None


def owner_bundle(cfg, emulator, task, tokenizer):
    """The owner's full model [A, E] with the adapter on the full model's adapter blocks (``models.ModelBundle``)."""
    from ..models import ModelBundle, resolve_device
    from ..models.adapters import apply_to_blocks
    from ..models.state import StateSpec

    base = emulator.full
    base.to(resolve_device(cfg.model))
    model = apply_to_blocks(base, cfg.adapter, task.peft_task_type, task.head_names,
                            emulator.plan.adapter(emulator=False), emulator.blocks_name)
    model.eval()
    return ModelBundle(model=model, spec=StateSpec(model), task=task, tokenizer=tokenizer,
                       personal=StateSpec(model, [], shared=False))


class OffsiteServer(ServerSide):
    """The owner's half: the full model, A mapped onto it, the plug-in scored and written as the run's adapter, and
    the emulator's bytes counted once per client (``emulator_bytes_down``, the round a client first takes part)."""

    def __init__(self, layout, codec, num_clients: int, cfg=None):
        super().__init__(layout, codec, num_clients, cfg)
        self.seen: set[int] = set()  # the clients that received the emulator

    def bind(self, cfg, model, global_state) -> None:
        emulator = getattr(getattr(model, "bundle", None), "origin", None)
        if emulator is None:
            raise FedfmError("client.algorithm 'offsite': the owner's side needs the emulator it built and its full "
                             "model (a simulation with runtime.name local)")
        self.emulator, self.global_state = emulator, global_state
        self.full = model.on(owner_bundle(cfg, emulator, model.task, model.bundle.tokenizer))
        self.names = OrderedDict((n, emulator.to_full(n)) for n in self.layout.names)
        if sorted(self.names.values()) != sorted(self.full.spec.names):
            raise FedfmError(f"client.algorithm 'offsite': the emulator's adapter ({len(self.names)} tensors) does "
                             f"not map onto the full model's ({len(self.full.spec.names)})")
        p = emulator.plan
        self.notes = [f"offsite tuning: the clients get an emulator of {len(p.order)} of the model's {p.depth} "
                      f"blocks ({emulator.nbytes / 1e6:.1f} MB, once; the full model's parameters are "
                      f"{emulator.full_bytes / 1e6:.1f} MB): adapter blocks {p.adapter(emulator=False)}, middle "
                      f"blocks kept {list(p.kept)}, dropped {p.dropped}"
                      + (f"; distilled {len(emulator.distill_losses)} steps, MSE {emulator.distill_losses[0]:.4g} → "
                         f"{emulator.distill_losses[-1]:.4g}" if emulator.distill_losses else "")]

    def plugged(self, flat: torch.Tensor) -> torch.Tensor:
        """A (flat, the emulator's names) as the full model's adapter state (flat, its names)."""
        state = self.layout.unflatten(flat)
        return self.full.spec.flatten({self.names[n]: t for n, t in state.items()})

    def evaluate(self, rnd: int) -> dict[str, Any]:
        metrics, _ = self.full.evaluate(self.plugged(self.global_state()))
        return {f"plugged_{k.removeprefix('eval_')}": v for k, v in metrics.items()}

    def exported(self, model, flat: torch.Tensor):
        return self.full, self.plugged(flat)

    def complete(self, rnd: int, results):
        new = {r.client_id for r in results} - self.seen
        self.seen |= new
        return results, {"emulator_bytes_down": len(new) * self.emulator.nbytes}

    def state_dict(self) -> dict[str, Any]:
        return {"seen": torch.tensor(sorted(self.seen), dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seen" in state:
            self.seen = {int(c) for c in state["seen"].tolist()}


@CLIENT_ALGORITHMS.register("offsite")
class Offsite(LocalTraining):
    """Offsite-Tuning's client (Xiao et al. 2023): local training of A on the emulator [A, E*], as FedAvg's."""

    server_side = OffsiteServer
    check_config = staticmethod(check_config)
    not_deployable = "its clients' base is the emulator the owner builds in a simulation's process"

    @staticmethod
    def client_model(cfg, data):
        """The base the clients train on: the owner builds the emulator from the full model (``ownership.offsite``)
        and the clients load its directory, with A on the emulator's adapter blocks."""
        from ..models import build_base, build_model
        from ..models.adapters import apply_to_blocks
        from ..models.loader import cache_root, load_tokenizer
        from ..ownership import offsite as owner

        tokenizer = load_tokenizer(cfg.model, data.public_texts())
        _, base = build_base(cfg, tokenizer, data.examples)
        emulator = owner.build(cfg, base, tokenizer, owner.public_text(data), cache_root())
        clients = cfg.model_copy(update={"model": emulator.client_model_config(cfg.model)})
        adapt = partial(apply_to_blocks, layers=emulator.plan.adapter(emulator=True),
                        blocks_name=emulator.blocks_name)
        bundle = build_model(clients, data.examples, adapt=adapt)
        bundle.origin = emulator
        return bundle
