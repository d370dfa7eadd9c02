"""What composes: every pair of registered choices across the axes of a run is either covered by a configuration
that is tested (two rounds on a tiny model) or refused at config time, with the reason the config gives.

The axes read their values from the registries, so an algorithm registered later joins the matrix by itself. A
pairwise covering design (each allowed pair in at least one configuration, built greedily) keeps the runs few.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError


def axes() -> dict[str, list[Any]]:
    """Config key -> its registered (or enumerated) choices."""
    from .aggregation import AGGREGATORS
    from .aggregation.server_opt import SERVER_OPTIMIZERS
    from .client import CLIENT_ALGORITHMS
    from .compression import CODECS
    from .models.adapters import METHODS
    from .schedules import SCHEDULES

    return {
        "client.algorithm": list(CLIENT_ALGORITHMS),
        "server.aggregator": list(AGGREGATORS),
        "server.optimizer": list(SERVER_OPTIMIZERS),
        "federation.schedule": list(SCHEDULES),
        "privacy.mode": ["none", "client", "sample"],
        "secagg.enabled": [False, True],
        "codec.name": list(CODECS),
        "adapter.method": list(METHODS),
    }


# what a choice needs besides itself to run at all (the settings any user gives with it)
COMPANIONS: dict[tuple[str, Any], dict[str, Any]] = {
    ("client.algorithm", "scaffold"): {"client.optimizer": "sgd", "client.lr": 0.05},
    ("client.algorithm", "fedkseed"): {"client.optimizer": "sgd", "client.lr": 1e-5},
    # offsite tuning needs middle blocks to drop: the tiny BERT with 4 blocks, 1 adapter block at each end
    ("client.algorithm", "offsite"): {"offsite.adapter_layers": 1, "model.from_config": {
        "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}},
    ("client.algorithm", "fedmd"): {"transfer.public_fraction": 0.2},  # its public set (fedfm.hetero runs it)
    ("server.aggregator", "hetlora"): {"adapter.r": 4, "adapter.rank_per_client": {2: 0.5, 4: 0.5}},
    ("server.aggregator", "flexlora"): {"adapter.r": 4, "adapter.rank_per_client": {2: 0.5, 4: 0.5}},
    ("server.aggregator", "norm-bound"): {"server.norm_bound": 1.0},
    ("privacy.mode", "client"): {"privacy.noise_multiplier": 0.5, "privacy.randomness": "seeded"},
    ("privacy.mode", "sample"): {"privacy.noise_multiplier": 0.5, "privacy.randomness": "seeded"},
    ("federation.schedule", "fedbuff"): {"federation.buffer_size": 2, "federation.concurrency": 3},
    ("secagg.enabled", True): {"secagg.corrupt_fraction": 0.0},  # 4 tiny clients: none of them corrupt
    ("codec.name", "int8"): {"codec.stochastic": True},
    ("codec.name", "topk"): {"codec.fraction": 0.1, "codec.values": "int8"},  # top-k + int8 values
    ("codec.name", "randk"): {"codec.fraction": 0.1},
    # CoOp learns the prompts of a CLIP: the CLIP task on a tiny CLIP and scikit-image's faces (named classes)
    ("adapter.method", "coop"): {"task.name": "clip_prompt", "data.source": "lfw-subset", "adapter.num_virtual_tokens": 2,
                                 "adapter.target_modules": None,
                                 "model.from_config": {
        "model_type": "clip", "projection_dim": 16, "text_config": {
            "vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 101, "eos_token_id": 102,
            "pad_token_id": 0},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 32, "patch_size": 8}},
        "model.image_processor": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
                                  "crop_size": {"height": 32, "width": 32}}},
    ("client.algorithm", "fedbpt"): {"blackbox.intrinsic_dim": 4, "blackbox.popsize": 2, "blackbox.iterations": 1,
                                     "adapter.num_virtual_tokens": 2},
}

Choice = tuple[str, Any]
Pair = tuple[Choice, Choice]


def overrides(assignment: dict[str, Any]) -> dict[str, Any]:
    """The config overrides of an assignment (key -> choice): each choice and its companions."""
    out: dict[str, Any] = {}
    for key, value in assignment.items():
        out.update(COMPANIONS.get((key, value), {}))
    out.update(assignment)
    return out


@dataclass
class Matrix:
    allowed: list[Pair]
    refused: dict[Pair, str]  # pair -> the config error
    configs: list[dict[str, Any]]  # full assignments that together cover every allowed pair


# the choices every axis takes when a pair leaves it free: the configs' own defaults, which compose with the most
DEFAULTS = {"client.algorithm": "local", "server.aggregator": "fedavg", "server.optimizer": "fedavg",
            "federation.schedule": "sync", "privacy.mode": "none", "secagg.enabled": False, "codec.name": "fp32",
            "adapter.method": "lora"}
# where a choice moves another axis's default: the value that choice composes with (black-box tuning learns a prompt)
CHOICE_DEFAULTS: dict[Choice, dict[str, Any]] = {("client.algorithm", "fedbpt"): {"adapter.method": "prompt"}}


def build(validate: Callable[[dict[str, Any]], Any]) -> Matrix:
    """``validate(overrides)`` builds a run config (raising ConfigError when refused). A pair is allowed when it
    validates with every other axis at its default (the defaults are the most composable choices; ``CHOICE_DEFAULTS``
    where a choice of the pair moves one), else refused
    with that config error. The covering configurations are built greedily: each starts from an uncovered pair and
    gives every other axis the valid value that covers most pairs not yet covered."""
    ax = axes()
    keys = list(ax)
    cache: dict[tuple, str | None] = {}

    def error(assignment: dict[str, Any]) -> str | None:
        moved = {k: v for c in assignment.items() for k, v in CHOICE_DEFAULTS.get(c, {}).items()}
        full = {**DEFAULTS, **moved, **assignment}
        key = tuple((k, repr(full[k])) for k in keys)
        if key not in cache:
            try:
                validate(overrides(full))
                cache[key] = None
            except ConfigError as e:
                cache[key] = str(e)
        return cache[key]

    def gain(partial: dict[str, Any], k: str, v: Any, wanted: set[Pair]) -> int:
        return sum(_pair((k, v), (k2, v2), keys) in wanted for k2, v2 in partial.items())

    allowed, refused = [], {}
    for k1, k2 in itertools.combinations(keys, 2):
        for v1, v2 in itertools.product(ax[k1], ax[k2]):
            why = error({k1: v1, k2: v2})
            if why is None:
                allowed.append(((k1, v1), (k2, v2)))
            else:
                refused[((k1, v1), (k2, v2))] = why
    uncovered = set(allowed)
    configs: list[dict[str, Any]] = []
    for p in allowed:
        if p not in uncovered:
            continue
        partial = dict(p)
        for k in keys:
            if k in partial:
                continue
            for v in sorted(ax[k], key=lambda v: -gain(partial, k, v, uncovered)):
                if error({**partial, k: v}) is None:
                    partial[k] = v
                    break
        configs.append(partial)
        uncovered -= {_pair((a, partial[a]), (b, partial[b]), keys) for a, b in itertools.combinations(keys, 2)}
    return Matrix(allowed, refused, configs)


def _pair(a: Choice, b: Choice, keys: list[str]) -> Pair:
    return (a, b) if keys.index(a[0]) < keys.index(b[0]) else (b, a)


def render(matrix: Matrix) -> str:
    """The markdown block docs/configuration.md shows: the refused pairs with their reasons, and the tested
    configurations."""
    def short(reason: str) -> str:
        return reason.replace("invalid config: ", "").replace("|", "/").split("\n")[0]

    lines = [f"{len(matrix.allowed)} of {len(matrix.allowed) + len(matrix.refused)} pairs of choices compose; "
             f"{len(matrix.configs)} tested configurations cover them all (`tests/test_composition.py`). "
             f"The {len(matrix.refused)} refused pairs, each a config error:", "",
             "| choice | with | refused because |", "|---|---|---|"]
    for ((k1, v1), (k2, v2)), reason in sorted(matrix.refused.items(), key=lambda kv: repr(kv[0])):
        lines.append(f"| `{k1}: {v1}` | `{k2}: {v2}` | {short(reason)} |")
    lines += ["", "The tested configurations (every other key as in the tiny test config):", "",
              "| " + " | ".join(f"`{k}`" for k in axes()) + " |", "|" + "---|" * len(axes())]
    for c in matrix.configs:
        lines.append("| " + " | ".join(str(c[k]).lower() if isinstance(c[k], bool) else str(c[k]) for k in axes())
                     + " |")
    return "\n".join(lines)
