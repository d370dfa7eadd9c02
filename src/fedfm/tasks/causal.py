"""The causal-LM task base: next-token cross-entropy on target tokens (labels != -100), loss and perplexity."""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from . import Task


def shifted_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions p whose next token is a target in some row: the only positions whose logits the loss needs."""
    return torch.nonzero((labels[:, 1:] != -100).any(0)).flatten()


class CausalLMLoss:
    """Sum and count of next-token cross-entropy on target tokens, computing vocabulary logits only where needed."""

    def __init__(self):
        self._keep: dict[int, bool] = {}

    def accepts_keep(self, model) -> bool:
        key = id(model)
        if key not in self._keep:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            self._keep[key] = "logits_to_keep" in inspect.signature(base.forward).parameters
        return self._keep[key]

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits, targets = self.logits_and_targets(model, batch)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return loss_sum, int((targets != -100).sum())

    def per_row(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed target-token loss and its number of target tokens."""
        logits, targets = self.logits_and_targets(model, batch)
        tok = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        return tok.view(targets.shape).sum(1), (targets != -100).sum(1)

    def logits_and_targets(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        T = labels.shape[1]
        pos = shifted_positions(labels)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        prompt_learning = getattr(model, "active_peft_config", None) is not None and \
            getattr(model.active_peft_config, "is_prompt_learning", False)
        if self.accepts_keep(model) and not prompt_learning:
            logits = model(**inputs, logits_to_keep=pos).logits
        else:
            logits = model(**inputs).logits
            logits = logits[:, logits.shape[1] - T:][:, pos]  # drop virtual-token positions (prompt tuning)
        return logits, labels[:, pos + 1]


class CausalLM(Task):
    """What ``instruction`` and ``lm`` share: a causal LM, its masked next-token loss and token-weighted evaluation."""

    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    head_names: list[str] = []

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.causal_loss = CausalLMLoss()

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            total, count = self.causal_loss(model, batch)
        return total / max(count, 1)

    def segment_losses(self, model, batch, sizes):
        """Each client's mean loss over its own target tokens (what ``loss`` gives on its rows alone)."""
        with self.autocast():
            sums, counts = self.causal_loss.per_row(model, batch)
        return torch.stack([s.sum() / max(int(c.sum()), 1) for s, c in zip(sums.split(sizes), counts.split(sizes))])

    @torch.no_grad()
    def evaluate(self, model, enc, indices, batch_size: int) -> dict[str, float]:
        """Token-weighted mean loss over the target tokens, and perplexity = exp(loss)."""
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        for batch in self.batches(enc, indices, batch_size):
            with self.autocast():
                s, k = self.causal_loss(model, batch)
            total += float(s)
            tokens += k
        model.train(was_training)
        if tokens == 0:
            return {}
        loss = total / tokens
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0)))}
