"""The client side of a lifelong federation (``continual.mitigations``, docs/continual.md): what a client does against
forgetting while the data arrive in stages. One registry; each mitigation cites its paper and composes with the
others (``ContinualClient`` chains them).

A mitigation may change what a client trains on (``train_data``: replay's buffer rows mixed in), add to every local
gradient (``grad_hook``, as FedProx's proximal term: EWC's penalty, O-LoRA's orthogonality loss), and act when a
stage ends (``end_stage``: the client, with the stage-end global model loaded, on its own data of that stage) or a
new one begins (``begin_stage``: on the shared base, what every party does alike: O-LoRA's new LoRA). Whatever a
client keeps lives in its own entry of the client state store, next to SCAFFOLD's c_i and the error-feedback
residual; it holds only the client's own rows and numbers computed from them.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..randomness import Randomness
from ..registry import Registry
from .data import LocalData

MITIGATIONS: Registry[type] = Registry("continual mitigation")


class Mitigation:
    """A mitigation of forgetting on the client side (see the module doc). The defaults do nothing."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.random = Randomness.from_config(ctx.cfg)

    def train_data(self, cid: int, own: LocalData) -> LocalData:
        return own

    def grad_hook(self, cid: int):
        return None

    def end_stage(self, cid: int, own: LocalData, stage: int) -> None:
        """Client ``cid`` after stage ``stage``, the stage-end global model loaded, on its own data of the stage."""

    def begin_stage(self, stage: int) -> None:
        """Before stage ``stage`` (> 0) trains, on the shared base (every party alike)."""

    # the client's own entry of the state store, read and written whole (other algorithms keep keys beside ours)
    def _stored(self, cid: int) -> dict[str, torch.Tensor]:
        return dict(self.ctx.store.get(cid) or {})


@MITIGATIONS.register("replay")
class Replay(Mitigation):
    """Experience replay from a bounded buffer of the client's own earlier rows (tiny episodic memories, Chaudhry
    et al. 2019), filled by reservoir sampling (Vitter 1985, Algorithm R): after n rows were offered, each is in the
    buffer of M with probability M/n. The buffer's rows are mixed into the local batches of the later stages."""

    PREFIX, SEEN = "replay.", "replay.seen"

    @staticmethod
    def check_config(cfg) -> None:
        if cfg.task.name == "lm":
            raise ValueError("continual.mitigations replay keeps whole rows of one example each; task 'lm' cuts a "
                             "document into several rows: use task classification or instruction")

    def buffer(self, cid: int) -> dict[str, torch.Tensor]:
        """The client's buffer: encoded rows (same keys as its own encoding), or {} before it has any."""
        stored = self.ctx.store.get(cid) or {}
        return {k[len(self.PREFIX):]: v for k, v in stored.items() if k.startswith(self.PREFIX) and k != self.SEEN}

    def train_data(self, cid: int, own: LocalData) -> LocalData:
        buf = self.buffer(cid)
        if not buf:
            return own
        n = _num_rows(own.encoded)
        m = _num_rows(buf)
        encoded = {k: torch.cat([v, buf[k].to(v.dtype)]) for k, v in own.encoded.items()}
        return LocalData(encoded=encoded, train=np.concatenate([own.train, np.arange(n, n + m, dtype=np.int64)]),
                         test=own.test)

    def end_stage(self, cid: int, own: LocalData, stage: int) -> None:
        """Offer the stage's training rows to the reservoir, in a seeded random order."""
        if "example" in own.encoded:
            raise DataError("continual.mitigations replay: the task splits examples into several rows")
        rows = np.asarray(own.train, dtype=np.int64)
        if not len(rows):
            return
        size = self.ctx.cfg.continual.replay.size
        rng = self.random.rng("continual_replay", cid, stage)
        rows = rows[rng.permutation(len(rows))]
        stored = self._stored(cid)
        buf = self.buffer(cid)
        seen = int(stored[self.SEEN][0]) if self.SEEN in stored else 0
        kept: list[Any] = [("buf", i) for i in range(_num_rows(buf))] if buf else []
        for r in rows:  # Algorithm R
            seen += 1
            if len(kept) < size:
                kept.append(("own", int(r)))
            else:
                j = int(rng.integers(0, seen))
                if j < size:
                    kept[j] = ("own", int(r))
        for k, v in own.encoded.items():
            parts = [buf[k][i:i + 1] if src == "buf" else v[i:i + 1] for src, i in kept]
            stored[self.PREFIX + k] = torch.cat(parts).clone()
        stored[self.SEEN] = torch.tensor([seen], dtype=torch.int64)
        self.ctx.store.put(cid, stored)


def _num_rows(encoded: dict[str, torch.Tensor]) -> int:
    return int(len(next(iter(encoded.values())))) if encoded else 0


@MITIGATIONS.register("ewc")
class EWC(Mitigation):
    """Elastic weight consolidation (Kirkpatrick et al. 2017): after each stage s the client estimates the diagonal
    Fisher F_s of the shared (adapter) parameters at the stage-end global parameters θ*_s on its own data; later
    local losses add λ/2 Σ_s Σ_i F_s,i (θ_i − θ*_s,i)², whose gradient λ Σ_s F_s (θ − θ*_s) is added to every local
    gradient. F is the empirical Fisher: the mean of the squared per-example gradients of the loss on the true
    labels (or responses), over ``continual.ewc.fisher_examples`` of the client's own examples."""

    FISHER, THETA = "ewc.fisher.", "ewc.theta."

    def anchors(self, cid: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(F_s, θ*_s), flat, for each stage the client has ended."""
        stored = self.ctx.store.get(cid) or {}
        stages = sorted(int(k[len(self.FISHER):]) for k in stored if k.startswith(self.FISHER))
        return [(stored[f"{self.FISHER}{s}"], stored[f"{self.THETA}{s}"]) for s in stages]

    def penalty(self, cid: int) -> float:
        """λ/2 Σ_s Σ_i F_s,i (θ_i − θ*_s,i)² at the model's current shared parameters."""
        theta = self.ctx.spec.flat()
        lam = self.ctx.cfg.continual.ewc.lam
        return float(sum(0.5 * lam * (F * (theta - t) ** 2).sum() for F, t in self.anchors(cid)))

    def grad_hook(self, cid: int):
        anchors = self.anchors(cid)
        if not anchors:
            return None
        spec, lam = self.ctx.spec, self.ctx.cfg.continual.ewc.lam
        f_sum = sum(F for F, _ in anchors)
        f_theta = sum(F * t for F, t in anchors)
        # λ Σ_s F_s (θ − θ*_s) = λ (θ Σ_s F_s − Σ_s F_s θ*_s), per parameter
        pairs = [(p, a.to(p.device), b.to(p.device)) for p, a, b in
                 zip(spec.params.values(), spec.unflatten(f_sum).values(), spec.unflatten(f_theta).values())]

        def ewc(_params):
            for p, fs, ft in pairs:
                if p.grad is not None:
                    p.grad.add_(lam * (p.detach() * fs - ft))

        return ewc

    def end_stage(self, cid: int, own: LocalData, stage: int) -> None:
        ctx = self.ctx
        rows = np.asarray(own.train, dtype=np.int64)
        if not len(rows):
            return
        k = ctx.cfg.continual.ewc.fisher_examples
        if k < len(rows):
            rows = np.sort(self.random.rng("continual_fisher", cid, stage).choice(rows, size=k, replace=False))
        params = list(ctx.spec.params.values())
        fisher = [torch.zeros_like(p) for p in params]
        model, task = ctx.model, ctx.task
        was_training = model.training
        model.eval()  # no dropout: the Fisher of the model as it predicts
        n = 0
        for batch in task.batches(own.encoded, rows, 1):
            model.zero_grad(set_to_none=True)
            task.loss(model, batch).backward()
            for f, p in zip(fisher, params):
                if p.grad is not None:
                    f.add_(p.grad.detach() ** 2)
            n += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        stored = self._stored(cid)
        stored[f"{self.FISHER}{stage}"] = torch.cat([f.reshape(-1) for f in fisher]).float().cpu() / max(n, 1)
        stored[f"{self.THETA}{stage}"] = ctx.spec.flat()
        ctx.store.put(cid, stored)


LORA_A = ".lora_A."


@MITIGATIONS.register("olora")
class OLoRA(Mitigation):
    """O-LoRA (Wang et al. 2023): each stage t trains a new LoRA (A_t, B_t) while the earlier stages' LoRAs stay
    frozen, and the local loss adds λ1 Σ_{s<t} ‖A_s A_tᵀ‖²_F (per adapted layer), pushing the rows of A_t (the
    subspace the new update reads from) orthogonal to those of every earlier A_s. The earlier LoRAs are merged into
    the base as frozen deltas W + (α/r) B_s A_s (every party does it alike, from the stage-end global state it was
    sent); only the current LoRA (and the task head) is trained and travels. The paper's L2 term on the new LoRA
    (λ2) is left out. The final adapter holds every stage's LoRA, stacked into one of rank T·r (``write_adapter``)."""

    @staticmethod
    def check_config(cfg) -> None:
        if cfg.adapter.method != "lora":
            raise ValueError(f"continual.mitigations olora trains a new LoRA per stage; adapter.method "
                             f"{cfg.adapter.method!r} is not covered: use adapter.method lora")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.frozen: dict[str, list[torch.Tensor]] = {}  # name of A_t -> [A_s for s < t]
        self.frozen_b: dict[str, list[torch.Tensor]] = {}  # name of A_t -> [B_s for s < t]
        self._gram: dict[str, torch.Tensor] = {}  # name of A_t -> Σ_s A_sᵀ A_s

    def _lora_a(self) -> list[str]:
        return [n for n in self.ctx.spec.names if LORA_A in n]

    def orthogonality(self) -> float:
        """Σ_{s<t} ‖A_s A_tᵀ‖²_F summed over the adapted layers, at the current A_t."""
        params = self.ctx.spec.params
        return float(sum((A_s @ params[n].detach().cpu().T).pow(2).sum()
                         for n, As in self.frozen.items() for A_s in As))

    def grad_hook(self, cid: int):
        if not self._gram:
            return None
        lam, params = self.ctx.cfg.continual.olora.lam, self.ctx.spec.params
        grams = [(params[n], g.to(params[n].device)) for n, g in self._gram.items()]

        def orthogonal(_params):
            # ∂/∂A_t Σ_s ‖A_s A_tᵀ‖²_F = 2 A_t Σ_s A_sᵀ A_s
            for p, g in grams:
                if p.grad is not None:
                    p.grad.add_(2 * lam * (p.detach() @ g))

        return orthogonal

    @torch.no_grad()
    def begin_stage(self, stage: int) -> None:
        """Freeze the current LoRA of every adapted layer into its base weight and start a new one: A_t drawn as
        peft initialises it (Kaiming-uniform, a=√5), B_t = 0, so the model's function is unchanged."""
        model = self.ctx.model
        gen = self.random.torch("olora_init", stage)
        for name in self._lora_a():
            layer_name, _, rest = name.partition(LORA_A)
            adapter = rest.split(".")[0]
            layer = model.get_submodule(layer_name)
            A = layer.lora_A[adapter].weight
            self.frozen.setdefault(name, []).append(A.detach().cpu().clone())
            self.frozen_b.setdefault(name, []).append(layer.lora_B[adapter].weight.detach().cpu().clone())
            base = layer.get_base_layer().weight
            base.add_(layer.get_delta_weight(adapter).to(base.dtype))
            init = torch.empty(A.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=gen)
            A.copy_(init)
            layer.lora_B[adapter].weight.zero_()
        self._gram = {n: sum(A_s.T @ A_s for A_s in As) for n, As in self.frozen.items()}


    def write_adapter(self, adapter_dir) -> None:
        """Make the written adapter the whole model, not the last stage alone: the earlier stages' LoRAs live merged
        in the base in memory, so each adapted layer's LoRA becomes the stack of all T stages', A = [A_1; …; A_T],
        B = [B_1, …, B_T] (rank T·r), with lora_alpha scaled so that (α'/r') B A = (α/r) Σ_s B_s A_s exactly. The new
        directory replaces the old one only once it is complete."""
        import json
        import shutil
        from pathlib import Path

        from safetensors.torch import load_file, save_file

        if not self.frozen:
            return
        adapter_dir = Path(adapter_dir)
        tmp = adapter_dir.with_name(f".{adapter_dir.name}.olora.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(adapter_dir, tmp)
        try:
            conf = json.loads((tmp / "adapter_config.json").read_text())
            if conf.get("rank_pattern") or conf.get("alpha_pattern") or conf.get("use_dora"):
                raise ValueError("continual.mitigations olora: the adapter has rank_pattern, alpha_pattern or DoRA; "
                                 "stacking its stages' LoRAs is not covered")
            weights = load_file(str(tmp / "adapter_model.safetensors"))
            model = self.ctx.model
            T = None
            for name, As in self.frozen.items():
                layer_name, _, rest = name.partition(LORA_A)
                adapter = rest.split(".")[0]
                layer = model.get_submodule(layer_name)
                key_a = name.replace(f"{LORA_A}{adapter}.", LORA_A)
                key_b = key_a.replace(LORA_A, ".lora_B.")
                if key_a not in weights or key_b not in weights:
                    raise ValueError(f"continual.mitigations olora: {key_a} is not in the written adapter")
                weights[key_a] = torch.cat([*As, layer.lora_A[adapter].weight.detach().cpu()], dim=0).contiguous()
                weights[key_b] = torch.cat([*self.frozen_b[name], layer.lora_B[adapter].weight.detach().cpu()],
                                           dim=1).contiguous()
                T = len(As) + 1
            r, alpha = conf["r"], conf["lora_alpha"]
            conf["r"] = r * T
            conf["lora_alpha"] = alpha * (math.sqrt(T) if conf.get("use_rslora") else T)  # the scaling kept
            save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(adapter_dir)
        tmp.rename(adapter_dir)


class ContinualClient:
    """The chosen mitigations, composed: what ``LocalTraining`` asks before it trains (``ClientContext.continual``)."""

    def __init__(self, ctx, names: list[str]):
        self.mitigations = [MITIGATIONS.get(n)(ctx) for n in names]

    def get(self, kind: type):
        return next((m for m in self.mitigations if isinstance(m, kind)), None)

    def prepare(self, cid: int, own: LocalData, hook):
        """The data the client trains on this round and the gradient hook, each mitigation's added."""
        hooks = [hook] if hook is not None else []
        for m in self.mitigations:
            own = m.train_data(cid, own)
            h = m.grad_hook(cid)
            if h is not None:
                hooks.append(h)
        if len(hooks) <= 1:
            return own, (hooks[0] if hooks else None)

        def chained(params):
            for h in hooks:
                h(params)

        return own, chained

    def end_stage(self, cid: int, own: LocalData, stage: int) -> None:
        for m in self.mitigations:
            m.end_stage(cid, own, stage)

    def begin_stage(self, stage: int) -> None:
        for m in self.mitigations:
            m.begin_stage(stage)
