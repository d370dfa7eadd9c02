"""Pre-training from scratch (task ``lm``): the built-in ``tiny-lm`` config, and a folder of .txt files with one client
per file run through ``fedfm run``."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import fedfm.cli as cli
from fedfm.cli import app
from fedfm.config import load_config
from fedfm.simulation import Simulation, prepare

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32}


def _overrides(tmp_path, **extra) -> list[str]:
    ov = {"model.from_config": TINY_LLAMA, "model.train_tokenizer.vocab_size": 400, "task.max_length": 32,
          "federation.rounds": 2, "client.steps": 4, "client.lr": 0.01, "eval.initial": True, "eval.max_examples": 16,
          "eval.per_client": False, "runtime.threads": 1, "output.dir": str(tmp_path / "run"), **extra}
    return [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) or v is None else v}" for k, v in ov.items()]


def test_tiny_lm_config_model_size():
    import transformers

    cfg = load_config("tiny-lm")
    assert cfg.task.name == "lm" and cfg.adapter.method == "full" and cfg.model.train_tokenizer is not None
    conf = dict(cfg.model.from_config)
    conf = transformers.AutoConfig.for_model(conf.pop("model_type"), vocab_size=cfg.model.train_tokenizer.vocab_size,
                                             **conf)
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(conf).parameters())
    assert 2e6 <= n <= 6e6


def test_tiny_lm_loss_falls_round_over_round(tmp_path):
    cfg = load_config("tiny-lm", _overrides(tmp_path, **{"data.max_examples": 150}))
    prepared = prepare(cfg)
    assert [c.name for c in prepared.data.clients] == ["business", "entertainment", "politics", "sports", "tech"]
    server = Simulation(prepared)
    assert len(server.bundle.tokenizer) <= 400 and server.model.config.vocab_size == len(server.bundle.tokenizer)
    rows = server.run()
    losses = [r["eval_loss"] for r in rows]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert losses[0] > losses[1] > losses[2], losses
    assert rows[-1]["eval_perplexity"] == pytest.approx(math.exp(losses[-1]))


WORDS = ("river stone bridge market harbour winter garden letter engine signal forest doctor "
         "music station window summer village paper island school").split()


def test_txt_folder_one_client_per_file_through_the_cli(tmp_path, monkeypatch):
    import random

    rng = random.Random(0)
    folder = tmp_path / "corpus"
    (folder / "more").mkdir(parents=True)
    files = ["a.txt", "b.txt", "c.txt", "d.txt", "more/e.txt", "more/f.txt"]
    for name in files:
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(3)]
        (folder / name).write_text("\n\n".join(paragraphs))
    monkeypatch.setattr(cli.console, "_width", 1000)
    res = CliRunner().invoke(app, ["run", "tiny-lm", *_overrides(
        tmp_path, **{"data.source": str(folder), "partition.method": "by_file", "data.client_column": None,
                     "data.test_fraction": 0.2, "federation.clients_per_round": 3,
                     "model.train_tokenizer.vocab_size": 300})])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    part = json.loads((run / "partition.json").read_text())
    names = [c["name"] for c in part["clients"]]
    assert part["num_clients"] == len(files) - 1 and part["test_size"] == 1  # one file is the server's held-out text
    assert len(set(names)) == len(names) and set(names) < set(files)  # one client per file, named by its path
    assert all(c["n_train"] == 1 for c in part["clients"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["eval_perplexity"] > 1 for r in rows)
    assert (run / "model" / "tokenizer.json").exists()  # the trained tokenizer is saved with the model
