"""Causal language modelling (continued pre-training / pre-training from scratch): loss and perplexity on text."""
from __future__ import annotations

import numpy as np
import torch

from . import TASKS, Task, _need_tokenizer, _pad_rows


@TASKS.register("lm")
class LanguageModeling(Task):
    """Causal language modelling on raw text or pre-tokenized ``input_ids`` rows; loss and perplexity."""

    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    head_names: list[str] = []

    def encode(self, examples) -> dict[str, torch.Tensor]:
        L = self.cfg.task.max_length
        if examples.input_ids is not None:
            rows = [list(r)[:L] for r in examples.input_ids]
        else:
            _need_tokenizer(self.tokenizer)
            rows = self.tokenizer(list(examples.texts), truncation=True, max_length=L)["input_ids"]
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        ids, mask, lengths = _pad_rows(rows, pad if pad is not None else 0)
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "lengths": lengths}

    @torch.no_grad()
    def evaluate(self, model, enc, indices, batch_size: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        for batch in self.batches(enc, indices, batch_size):
            with self.autocast():
                out = model(**batch)
            k = int((batch["labels"][:, 1:] != -100).sum())
            total += float(out.loss) * k
            tokens += k
        model.train(was_training)
        if tokens == 0:
            return {}
        loss = total / tokens
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}
