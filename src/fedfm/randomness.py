"""Where every random draw of a run comes from: one seed per named purpose, and one place that decides secret or
seeded.

A seeded purpose derives its draws from ``federation.seed``, the purpose's number and its own coordinates (round,
client, job), so a run repeats bit for bit and a draw does not depend on the order clients are simulated in. A
*private* purpose is a draw a privacy guarantee rests on (the client sample that DP-FedAvg's amplification assumes
nobody knows, the DP noise, DP-SGD's Poisson batches and noise, the SecAgg+ graph): under ``privacy.randomness:
secret`` (the default) each such draw takes 63 fresh bits from the operating system's CSPRNG, so whoever holds the
run's config cannot redraw it; ``seeded`` derives it like the others (tests, benchmarks, resume).

Cryptographic secrets (X25519 keys, self-mask seeds, Shamir coefficients in ``privacy/secagg.py``) are not draws of
this kind: they always come from the OS, through ``secrets`` and ``cryptography``.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed for one (run seed, purpose, round, client, …) tuple, independent of call order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Purpose:
    """One kind of draw: its number in the derivation, under which ``privacy.mode``s it is private, and how its
    seeded draws are derived (``list``: numpy's SeedSequence of [seed, tag, *parts]; ``derive``: ``derive_seed``;
    ``ss32``: the first 32-bit word of that SeedSequence; ``plain``: the run seed itself). The derivations are the
    ones each draw always had, so seeded runs and the tables made from them repeat."""

    tag: int
    private_under: frozenset = frozenset()
    style: str = "list"
    what: str = ""


_ALL_MODES = frozenset({"none", "client", "sample"})

PURPOSES: dict[str, Purpose] = {
    "data_split": Purpose(1, what="the held-out split of the data"),
    "local_split": Purpose(2, what="each client's local test split"),
    "sweep_settings": Purpose(43, what="the settings a random-search sweep draws for an arm (fedfm sweep)"),
    "validation_split": Purpose(35, what="each client's validation split of its training examples"),
    "client_sample": Purpose(3, frozenset({"client"}), what="the clients a synchronous round samples"),
    "client_task": Purpose(4, style="derive", what="a sampled client's training seed (dropout, batch order)"),
    "eval_sample": Purpose(5, what="the fixed subset of the held-out set evaluated each round"),
    "prompt_sample": Purpose(6, what="the held-out prompts answered each eval"),
    "dp_noise": Purpose(7, frozenset({"client"}), style="ss32", what="DP-FedAvg's Gaussian noise (and count noise)"),
    "async_task": Purpose(8, style="derive", what="an asynchronous job's training seed"),
    "async_sample": Purpose(9, what="the client an asynchronous job starts"),
    "eval_finetune": Purpose(10, style="derive", what="a client's local fine-tuning before it scores the model"),
    "attackers": Purpose(11, what="which clients are malicious"),
    "attack_noise": Purpose(12, style="ss32", what="the noise a gaussian attacker sends"),
    "backdoor": Purpose(13, what="which examples a backdoor attacker poisons"),
    "secagg_graph": Purpose(13, _ALL_MODES, style="derive", what="the order of the SecAgg+ ring, per round"),
    "audit": Purpose(14, what="the members and non-members of the membership audit"),
    "noise_share": Purpose(17, frozenset({"client"}), style="derive",
                           what="a client's share of the distributed DP noise"),
    "dpsgd_batches": Purpose(18, frozenset({"sample"}), style="derive", what="DP-SGD's Poisson batches"),
    "dpsgd_noise": Purpose(19, frozenset({"sample"}), style="derive", what="DP-SGD's Gaussian noise"),
    "clock_speed": Purpose(20, what="each client's simulated speed"),
    "availability": Purpose(21, what="whether a client is online in a period"),
    "dropout": Purpose(22, what="whether a client drops out of a job"),
    "split_noise": Purpose(31, _ALL_MODES, style="derive",
                           what="the Gaussian noise a split-learning client adds to the activations it sends"),
    "ranks": Purpose(30, what="which clients get which LoRA rank"),
    "fedkseed_candidates": Purpose(31, what="FedKSeed's K candidate seeds, shared by the server and every client"),
    "fedkseed_choice": Purpose(32, style="derive", what="which candidate seed a FedKSeed client step perturbs along"),
    "offsite_distill": Purpose(34, what="the public texts of each step of the offsite emulator's distillation"),
    "codec": Purpose(33, style="derive", what="a codec's stochastic rounding and random-k coordinates"),
    "blackbox_projection": Purpose(36, what="black-box tuning's random projection A, shared by every party"),
    "blackbox_cmaes": Purpose(37, style="derive", what="a black-box client's CMA-ES samples and mini-batches"),
    "synthetic_generation": Purpose(40, style="derive", what="data.synthetic's sampling of the generator, per batch"),
    "synthetic_rows": Purpose(41, what="which of data.synthetic's pool rows a client gets, per client and class"),
    "transfer_public": Purpose(38, what="transfer.public_fraction's public set, carved before partitioning"),
    "transfer_distill": Purpose(39, style="derive", what="which public rows a distillation step of fedmd takes"),
    "conversion_check": Purpose(42, what="the fixed input an ONNX model and its conversion are compared on"),
    "coop_context": Purpose(44, what="CoOp's initial context vectors, N(0, 0.02), when adapter.context_init gives none"),
    "continual_replay": Purpose(45, what="the order a client offers a stage's rows to its replay buffer, and the "
                                "reservoir's draws"),
    "continual_fisher": Purpose(46, what="the own examples a client estimates EWC's Fisher on, per stage"),
    "olora_init": Purpose(47, style="derive", what="O-LoRA's new LoRA A at the start of each stage"),
    "continual_eval": Purpose(48, what="the held-out examples of each stage scored after every stage"),
    "partition": Purpose(0, style="plain", what="the partition of the data into clients"),
    "subsample": Purpose(0, style="plain", what="data.max_examples' subsample of the source"),
    "model_init": Purpose(0, style="plain", what="the initial weights of a model built from a config"),
}


class Randomness:
    """The run's source of draws: ``Randomness(seed, mode, secret)``, or ``from_config(cfg)``."""

    def __init__(self, seed: int, mode: str = "none", secret: bool = True):
        self.run_seed, self.mode, self.secret = int(seed), mode, secret

    @classmethod
    def from_config(cls, cfg) -> "Randomness":
        return cls(cfg.federation.seed, cfg.privacy.mode, cfg.privacy.randomness == "secret")

    def is_secret(self, purpose: str) -> bool:
        """Whether this purpose's draws come from the OS in this run."""
        return self.secret and self.mode in PURPOSES[purpose].private_under

    def seed(self, purpose: str, *parts: int, base: int | None = None) -> int:
        """An integer seed for one draw (a torch generator's, a client task's). ``base`` replaces the run seed (a
        draw made inside a client from its task seed)."""
        p = PURPOSES[purpose]
        if self.is_secret(purpose):
            return secrets.randbits(63)
        base = self.run_seed if base is None else int(base)
        if p.style == "plain":
            return base
        if p.style == "ss32":
            return int(np.random.SeedSequence([base, p.tag, *map(int, parts)]).generate_state(1)[0])
        return derive_seed(base, p.tag, *parts)

    def rng(self, purpose: str, *parts: int) -> np.random.Generator:
        """A numpy generator for one purpose and coordinates."""
        p = PURPOSES[purpose]
        if self.is_secret(purpose):
            return np.random.default_rng(secrets.randbits(63))
        if p.style == "list":
            return np.random.default_rng([self.run_seed, p.tag, *map(int, parts)])
        return np.random.default_rng(self.seed(purpose, *parts))

    def torch(self, purpose: str, *parts: int, base: int | None = None, device=None):
        """A torch generator (on ``device``) for one purpose and coordinates."""
        import torch

        return torch.Generator(device=device if device is not None else "cpu").manual_seed(
            self.seed(purpose, *parts, base=base))
