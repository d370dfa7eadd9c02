"""Pre-tokenized data are cached on disk by a hash of the data, tokenizer and task settings, and memory-mapped on the
next run, so a re-run does not tokenize again."""
from __future__ import annotations

import torch

from fedfm.simulation import Simulation, prepare


def test_a_rerun_reads_the_tokenized_rows_from_the_cache(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(**{"federation.rounds": 1})
    first = Simulation(prepare(cfg))
    assert first.tokenized_from_cache is False
    entries = list((tmp_path / "cache" / "tokenized").iterdir())
    assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == ["meta.json", "tensors.pt"]

    from fedfm.tasks import Classification

    def no_tokenizing(self, examples):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(Classification, "encode", no_tokenizing)
    second = Simulation(prepare(cfg))
    assert second.tokenized_from_cache is True
    for cid, own in first.local.items():  # every client's own rows, as read from the cache
        assert own.encoded.keys() == second.local[cid].encoded.keys()
        for k in own.encoded:
            assert torch.equal(own.encoded[k], second.local[cid].encoded[k])
    assert second.run()[-1]["aggregated"] is True


def test_the_key_changes_with_the_data_the_tokenizer_settings_and_the_task(tiny_config, tmp_path, monkeypatch):
    from fedfm.tasks.cache import cache_key

    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    base = Simulation(prepare(tiny_config(**{"federation.rounds": 1})))
    key = cache_key(base.task, base.data.examples)
    assert key == cache_key(base.task, base.data.examples)  # deterministic
    longer = Simulation(prepare(tiny_config(**{"task.max_length": 24})))
    assert cache_key(longer.task, longer.data.examples) != key
    fewer = Simulation(prepare(tiny_config(**{"data.max_examples": 100})))
    assert cache_key(fewer.task, fewer.data.examples) != key
    base.task.tokenizer.chat_template = "{{ messages }}"
    assert cache_key(base.task, base.data.examples) != key


def test_instruction_prompts_come_back_with_the_cached_rows(tmp_path, monkeypatch):
    import json

    from fedfm.config import load_config

    from ..test_tiny_lm import TINY_LLAMA  # noqa: TID252

    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    rows = [{"instruction": f"say {w}", "input": "", "output": f"{w}!", "site": f"s{i % 2}"}
            for i, w in enumerate("red green blue cyan pink gold gray navy lime teal".split())]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ov = {"adapter.target_modules": ["q_proj", "v_proj"], "model.name_or_path": None, "model.from_config": TINY_LLAMA, "model.tokenizer": "minilm",
          "task.name": "instruction", "data.source": str(path), "data.label_column": None,
          "data.client_column": "site", "partition.method": "by_column", "partition.local_test_fraction": 0.0,
          "data.test_fraction": 0.2, "federation.rounds": 1, "federation.clients_per_round": 2, "federation.min_clients": 1,
          "eval.every": 0,
          "output.dir": str(tmp_path / "run")}
    cfg = load_config("bbc-lora", [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) or v is None else v}"
                                   for k, v in ov.items()])
    first, second = Simulation(prepare(cfg)), Simulation(prepare(cfg))
    assert (first.tokenized_from_cache, second.tokenized_from_cache) == (False, True)
    assert second.task.prompts == first.task.prompts and second.task.answers == first.task.answers
    assert second.task.questions == first.task.questions
