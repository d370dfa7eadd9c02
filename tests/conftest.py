"""Shared fixtures: a tiny BERT built from a config (no download) and a small synthetic, learnable dataset."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

TINY_BERT = {
    "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
}

TOPICS = {
    "sport": ["match", "goal", "team", "coach", "league", "score"],
    "music": ["album", "band", "song", "concert", "guitar", "singer"],
    "money": ["bank", "market", "shares", "profit", "economy", "trade"],
    "tech": ["software", "computer", "phone", "internet", "chip", "code"],
}
FILLER = ["the", "a", "today", "new", "big", "said", "after", "with", "for", "on"]


def make_rows(n: int = 240, seed: int = 0, sites: int = 4) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    labels = sorted(TOPICS)
    for i in range(n):
        label = labels[i % len(labels)]
        words = [rng.choice(TOPICS[label]) for _ in range(3)] + [rng.choice(FILLER) for _ in range(5)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label, "site": f"site{i % sites}"})
    return rows


def write_csv(path, rows: list[dict]):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def tiny_csv(tmp_path):
    return write_csv(tmp_path / "tiny.csv", make_rows())


def tiny_overrides(source, tmp_path, **extra) -> list[str]:
    """Overrides turning the default config into a seconds-long run on a tiny model and tiny data."""
    ov = {
        "name": "tiny",
        "model.name_or_path": None,
        "model.from_config": TINY_BERT,
        "model.tokenizer": "minilm",
        "data.source": str(source),
        "task.max_length": 16,
        "partition.num_clients": 4,
        "partition.alpha": 1.0,
        "federation.rounds": 2,
        "federation.clients_per_round": 2,
        "federation.min_clients": 1,
        "client.batch_size": 8,
        "client.lr": 0.01,
        "eval.batch_size": 64,
        "output.dir": str(tmp_path / "run"),
        "runtime.threads": 1,
    }
    ov.update(extra)
    import json

    return [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) or v is None else v}" for k, v in ov.items()]


@pytest.fixture
def tiny_config(tiny_csv, tmp_path):
    """A factory: tiny_config(**overrides) -> validated RunConfig."""
    from fedfm.config import load_config

    def make(**extra):
        return load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path, **extra))

    return make


def privacy_command(cfg, tmp_path, *overrides: str):
    """``fedfm privacy`` on ``cfg`` written to a YAML file: the CliRunner result."""
    from typer.testing import CliRunner

    from fedfm.cli import app

    path = tmp_path / "privacy.yaml"
    path.write_text(cfg.to_yaml())
    return CliRunner().invoke(app, ["privacy", str(path), *overrides])


def snapshot(root) -> dict[str, str]:
    """Every file and folder under ``root`` (relative path, with ``/``) with a hash of a file's bytes ("dir" for a
    folder): two snapshots are equal when nothing under ``root`` was added, removed or changed."""
    import hashlib
    from pathlib import Path

    root = Path(root)
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def reachable(graph, nodes: set) -> set:
    """The nodes reachable from the smallest of ``nodes`` through edges between ``nodes`` (``graph[u]``: u's
    neighbours): equal to ``nodes`` when they form a connected graph."""
    reach, todo = set(), [min(nodes)]
    while todo:
        u = todo.pop()
        if u not in reach:
            reach.add(u)
            todo += [v for v in graph[u] if v in nodes]
    return reach


# tests that read Debian's Fashion-MNIST (data.source fashion-mnist): .ci/run installs dataset-fashion-mnist
needs_fashion = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                   reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
