"""The ``lm`` task: whole documents cut into max_length chunks (nothing truncated), rows mapped back to documents,
token-weighted loss and perplexity."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfm.config import TokenizerTrainConfig
from fedfm.data.sources import Examples
from fedfm.models.tokenizer import train_bpe_tokenizer
from fedfm.tasks import make_task

from tests.conftest import make_rows

DOCS = [r["text"] for r in make_rows(40)]
LONG = " ".join(DOCS[:12])  # a document many chunks long


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(DOCS * 3, TokenizerTrainConfig(vocab_size=300, min_frequency=1))


def _task(tiny_config, tok, max_length):
    cfg = tiny_config(**{"task.name": "lm", "task.max_length": max_length, "data.label_column": None,
                         "partition.method": "iid"})
    return make_task(cfg, tok)


def _chunks_of(enc, rows):
    return [t for r in rows for t in enc["input_ids"][r, :enc["lengths"][r]].tolist()]


def test_long_document_becomes_chunks_mapped_to_it(tiny_config, tok):
    tokens = tok(LONG)["input_ids"] + [tok.eos_token_id]  # the document, ended with eos
    L = 2 * len(tokens) // 5  # the document is 2.5 x max_length tokens
    assert 2.5 * L <= len(tokens) < 2.5 * L + 3
    task = _task(tiny_config, tok, L)
    ex = Examples(texts=[DOCS[0], LONG, DOCS[1]])
    enc = task.encode(ex)
    mine = np.flatnonzero(enc["example"].numpy() == 1)
    assert len(mine) == 3 and enc["lengths"][mine].tolist() == [L, L, len(tokens) - 2 * L]
    assert task.rows(enc, np.array([1])).tolist() == mine.tolist()
    assert _chunks_of(enc, mine) == tokens  # no token lost
    for i, doc in enumerate([DOCS[0], LONG, DOCS[1]]):  # every document, in order
        assert _chunks_of(enc, task.rows(enc, [i])) == tok(doc)["input_ids"] + [tok.eos_token_id]
    pad = enc["attention_mask"] == 0
    assert pad.any() and (enc["labels"][pad] == -100).all()
    assert torch.equal(enc["labels"][~pad], enc["input_ids"][~pad])
    batches = list(task.batches(enc, np.array([1, 2]), batch_size=2))
    assert sum(len(b["input_ids"]) for b in batches) == 4
    assert all(set(b) == {"input_ids", "attention_mask", "labels"} for b in batches)


def test_texts_are_tokenized_in_one_call(tiny_config, tok):
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, texts, **kw):
            calls.append(len(texts))
            return tok(texts, **kw)

    _task(tiny_config, Spy(), 16).encode(Examples(texts=DOCS))
    assert calls == [len(DOCS)]


def test_pre_tokenized_rows_are_chunked(tiny_config):
    task = _task(tiny_config, None, 4)
    ids = [list(range(1, 11)), [7, 8], [9]]  # 4+4+2 | 2 | 1 token: a row must predict at least one token
    enc = task.encode(Examples(texts=None, input_ids=ids))
    assert enc["example"].tolist() == [0, 0, 0, 1]
    assert enc["lengths"].tolist() == [4, 4, 2, 2]
    assert enc["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0], [7, 8, 0, 0]]
    assert task.rows(enc, [2]).tolist() == []


def test_eval_loss_is_token_weighted(tiny_config, tok):
    import transformers

    task = _task(tiny_config, tok, 24)
    enc = task.encode(Examples(texts=DOCS[:6] + [LONG]))
    conf = transformers.AutoConfig.for_model("llama", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, vocab_size=len(tok), max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(conf)
    idx = np.arange(7)
    total, count = 0.0, 0
    with torch.no_grad():  # by hand: per row, next-token cross-entropy summed over its real tokens
        for r in task.rows(enc, idx):
            n = int(enc["lengths"][r])
            logits = model(input_ids=enc["input_ids"][r:r + 1, :n]).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits[:-1], enc["input_ids"][r, 1:n], reduction="sum"))
            count += n - 1
    for bs in (1, 3, 64):  # batch composition must not change the result
        out = task.evaluate(model, enc, idx, batch_size=bs)
        assert out["loss"] == pytest.approx(total / count, rel=1e-4)
        assert out["perplexity"] == pytest.approx(np.exp(total / count), rel=1e-4)
