"""Causal language modelling (continued pre-training / pre-training from scratch): loss and perplexity on text."""
from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from . import TASKS, _need_tokenizer
from .causal import CausalLM


def chunk_documents(docs: list[list[int]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Cut each document's tokens into rows of ``length`` tokens (a last, shorter chunk is kept if it has >= 2
    tokens: one prediction); ``example`` gives each row's document. One vectorized gather, no per-row loop."""
    sizes = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(sizes.sum()))
    doc_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(docs) else np.zeros(0, np.int64)
    per_doc = -(-sizes // length)  # ceil
    example = np.repeat(np.arange(len(docs)), per_doc)
    offset = (np.arange(len(example)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)) * length
    lengths = np.minimum(length, sizes[example] - offset)
    keep = lengths >= 2
    example, start, lengths = example[keep], doc_start[example[keep]] + offset[keep], lengths[keep]
    width = int(lengths.max()) if len(lengths) else 1
    pos = np.arange(width)
    mask = pos[None, :] < lengths[:, None]
    ids = np.where(mask, flat[np.minimum(start[:, None] + pos[None, :], max(len(flat) - 1, 0))], pad_id)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
            "lengths": torch.from_numpy(lengths), "example": torch.from_numpy(example)}


@TASKS.register("lm")
class LanguageModeling(CausalLM):
    """Causal language modelling on raw text or pre-tokenized ``input_ids`` rows; loss and perplexity.

    Every document is tokenized whole (one batched call), ended with the tokenizer's eos token when it has one, and
    cut into ``task.max_length`` chunks, one row each, so no text is lost to truncation; ``enc["example"]`` maps rows
    back to documents, and a client's examples are all the chunks of its documents. Pre-tokenized rows are chunked as
    they are (no eos added).
    """

    def encode(self, examples) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        if examples.input_ids is not None:
            docs = [list(map(int, r)) for r in examples.input_ids]
        else:
            _need_tokenizer(tok)
            docs = tok(list(examples.texts), truncation=False, verbose=False)["input_ids"]
            if tok.eos_token_id is not None:
                docs = [d + [tok.eos_token_id] for d in docs]
        pad = tok.pad_token_id if tok is not None else None
        return chunk_documents(docs, self.cfg.task.max_length, pad if pad is not None else 0)
