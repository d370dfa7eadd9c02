"""Attacks to test defences against, keyed by ``attack.kind``: a seeded ``attack.fraction`` of the clients is
malicious for the whole run.

Update attacks change what a malicious client sends (after honest local training, before the server sees the
bytes); data attacks change a malicious client's training data before anything is tokenized. Every round row
counts the malicious clients that took part; with ``backdoor`` every evaluation also measures the backdoor's
success on triggered held-out examples.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .randomness import Randomness
from .registry import Registry

ATTACKS: Registry[type] = Registry("attack")


def malicious_clients(fraction: float, num_clients: int, seed: int) -> set[int]:
    k = int(math.floor(fraction * num_clients))
    rng = Randomness(seed).rng("attackers")
    return {int(c) for c in rng.choice(num_clients, size=k, replace=False)} if k else set()


class Attack:
    tampers_updates = False  # whether it changes the update a client sends (its ``tamper``), not only its data

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.tampers_updates = cls.tamper is not Attack.tamper

    def __init__(self, acfg, malicious: set[int], seed: int):
        self.cfg = acfg
        self.malicious = malicious
        self.seed = seed

    def poison_data(self, data) -> None:
        """Change the malicious clients' training examples in place (data attacks)."""

    def tamper(self, delta: dict[str, torch.Tensor], cid: int, rnd: int) -> dict[str, torch.Tensor]:
        """What a malicious client sends instead of its honest update (update attacks)."""
        return delta


@ATTACKS.register("none")
class NoAttack(Attack):
    pass


@ATTACKS.register("sign-flip")
class SignFlip(Attack):
    """Sign flipping (Damaskinos et al. 2018; Li et al. 2019): send −s·Δ (s = ``attack.scale``)."""

    def tamper(self, delta, cid, rnd):
        return {n: -self.cfg.scale * t for n, t in delta.items()}


@ATTACKS.register("scale")
class ScaledUpdate(Attack):
    """Model replacement (Bagdasaryan et al. 2020): send the update boosted by ``attack.scale``, so that averaging
    with the honest updates leaves it nearly intact."""

    def tamper(self, delta, cid, rnd):
        return {n: self.cfg.scale * t for n, t in delta.items()}


@ATTACKS.register("gaussian")
class GaussianNoise(Attack):
    """Send pure noise N(0, σ²) of the update's shape (σ = ``attack.noise_std``)."""

    def tamper(self, delta, cid, rnd):
        g = Randomness(self.seed).torch("attack_noise", rnd, cid)
        return {n: torch.randn(t.shape, generator=g, dtype=t.dtype) * self.cfg.noise_std for n, t in delta.items()}


def _labelled(data, kind: str, texts: bool = False):
    """The labelled examples a data attack changes (``texts``: it also writes into their texts)."""
    ex = data.examples
    if ex.labels is None or (texts and ex.texts is None):
        what = "labels of text examples" if texts else "labels"
        raise ConfigError(f"attack.kind {kind!r} changes {what}: it needs a {'text ' if texts else ''}classification "
                          "task with data.label_column")
    return ex


@ATTACKS.register("label-flip")
class LabelFlip(Attack):
    """Label flipping (Tolpegin et al. 2020): every training label y of a malicious client becomes (y + 1) mod L."""

    def poison_data(self, data):
        ex = _labelled(data, "label-flip")
        labels = np.array(ex.labels, copy=True)
        for c in self.malicious:
            idx = data.clients[c].train
            labels[idx] = (labels[idx] + 1) % ex.num_classes
        data.examples = replace(ex, labels=labels)


def insert_trigger(text: str, trigger: str) -> str:
    return f"{trigger} {text}"


@ATTACKS.register("backdoor")
class Backdoor(Attack):
    """A backdoor (Bagdasaryan et al. 2020): in ``attack.poison_fraction`` of each malicious client's training
    examples the trigger phrase is put in front of the text and the label set to ``attack.target_label``; the
    model should then answer the target label whenever the trigger is there."""

    def target(self, ex) -> int:
        t = self.cfg.target_label
        if t is None:
            return 0
        if t not in ex.label_names:
            raise ConfigError(f"attack.target_label: {t!r} is not a label of the data ({', '.join(ex.label_names)})")
        return ex.label_names.index(t)

    def poison_data(self, data):
        ex = _labelled(data, "backdoor", texts=True)
        labels, texts = np.array(ex.labels, copy=True), list(ex.texts)
        target = self.target(ex)
        rng = Randomness(self.seed).rng("backdoor")
        for c in sorted(self.malicious):
            idx = np.asarray(data.clients[c].train)
            chosen = idx[rng.random(len(idx)) < self.cfg.poison_fraction]
            for i in chosen:
                texts[i] = insert_trigger(texts[i], self.cfg.trigger)
                labels[i] = target
        data.examples = replace(ex, labels=labels, texts=texts)

    def triggered_test(self, data):
        """The held-out examples whose true label is not the target, with the trigger: the backdoor's test."""
        ex = data.examples
        target = self.target(ex)
        keep = [int(i) for i in data.test if int(ex.labels[i]) != target]
        return replace(ex, texts=[insert_trigger(ex.texts[i], self.cfg.trigger) for i in keep],
                       labels=np.full(len(keep), target), groups=None, is_test=None, input_ids=None, messages=None)


def make_attack(cfg, num_clients: int) -> Attack:
    a = cfg.attack
    return ATTACKS.get(a.kind)(a, malicious_clients(a.fraction, num_clients, cfg.federation.seed) if a.kind != "none"
                               else set(), cfg.federation.seed)


def tamper_results(sim, results: list, rnd: int) -> list:
    """Replace malicious clients' honest updates by what the attack sends (decoded, changed, encoded again)."""
    attack = sim.attack
    if not attack.malicious or not attack.tampers_updates:
        return results
    out = []
    for r in results:
        if r.error is None and r.client_id in attack.malicious:
            view = sim.server.view(r.client_id)
            delta = sim.codec.decode(r.update, view)
            draws = sim.server.random.torch("codec", rnd, r.client_id) if sim.codec.random else None
            r = replace(r, update=sim.codec.encode(attack.tamper(dict(delta), r.client_id, rnd), draws))
        out.append(r)
    return out


def describe(attack: Attack) -> dict[str, Any]:
    return {"kind": attack.cfg.kind, "malicious": sorted(attack.malicious)}
