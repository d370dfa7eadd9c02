"""Tasks: how examples become batches, the loss and the metrics. One registry, keyed by ``task.name``."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import Registry

TASKS: Registry[type] = Registry("task")
NOT_MODEL_INPUTS = ("lengths", "example")  # bookkeeping columns of an encoding


class Task:
    """Base of a task. Subclasses set the transformers auto class, the peft task type and the head names."""

    auto_class = ""
    peft_task_type = ""
    head_names: list[str] = []
    needs_labels = False
    reads_chat = False  # examples are conversations (instruction data), not texts
    reads_images = False  # examples are images (``Examples.images``), not texts
    cached_attrs: tuple[str, ...] = ()  # what ``encode`` sets on the task besides the tensors (kept by the cache)

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = torch.device("cpu")  # set to the model's device by build_model

    @classmethod
    def check_config(cls, run_cfg) -> None:
        """Called with the run's config before anything loads: a text task refuses an image model (read with
        transformers' ``AutoConfig``: its import, about 3 s, is paid at config time instead of at model load)."""
        from .vision import check_modality

        check_modality(run_cfg, images=cls.reads_images)

    @classmethod
    def load_preprocessor(cls, model_cfg, public_texts: list[str] | None = None):
        """What turns raw examples into model inputs, built once per process and passed to the task as its
        ``tokenizer``: a tokenizer for text tasks; image tasks return their image processor (or a processor pair)."""
        from ..models.loader import load_tokenizer

        return load_tokenizer(model_cfg, public_texts)

    def autocast(self):
        """bf16/fp16 autocast around forward passes when ``model.autocast`` asks for it (weights stay fp32)."""
        mode = self.cfg.model.autocast
        if mode is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)

    def rows(self, enc: dict[str, torch.Tensor], indices: np.ndarray) -> np.ndarray:
        """Encoded rows of the given examples. Identity, unless encoding split examples into several rows (then
        ``enc["example"]`` says which example each row came from, e.g. text chunks of one document)."""
        indices = np.asarray(indices, dtype=np.int64)
        if "example" not in enc:
            return indices
        return np.flatnonzero(np.isin(enc["example"].numpy(), indices))

    def model_kwargs(self, examples) -> dict[str, Any]:
        return {}

    def prepare_model(self, model) -> None:
        """What the task sets on the adapted model, once, before the server reads the initial shared state (CoOp:
        the class prompts and the initial context)."""

    def encode(self, examples) -> dict[str, torch.Tensor]:
        """Tokenize every example once per run: a dict of tensors with N rows."""
        raise NotImplementedError

    def batches(self, enc: dict[str, torch.Tensor], indices: np.ndarray, batch_size: int,
                generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Mini-batches over the rows of the examples ``indices`` (shuffled with ``generator`` when given), trimmed to
        their longest row and moved to the model's device."""
        idx = torch.as_tensor(self.rows(enc, indices))
        if generator is not None:
            idx = idx[torch.randperm(len(idx), generator=generator)]
        elif "lengths" in enc:  # evaluation: rows of similar length together, so batches carry little padding
            idx = idx[torch.argsort(enc["lengths"][idx], stable=True)]
        for i in range(0, len(idx), batch_size):
            yield self.collate(enc, idx[i:i + batch_size])

    def collate(self, enc: dict[str, torch.Tensor], sel: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch of exactly the rows ``sel``, trimmed to the longest, on the model's device."""
        width = int(enc["lengths"][sel].max())
        return {k: (v[sel, :width] if v.ndim == 2 else v[sel]).to(self.device)
                for k, v in enc.items() if k not in NOT_MODEL_INPUTS}

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            return model(**batch).loss

    def segment_losses(self, model, batch: dict[str, torch.Tensor], sizes: list[int]) -> torch.Tensor:
        """One loss per run of rows (``sizes``: rows per client, in order), each what ``loss`` gives on those rows
        alone: the batched runtime's per-client losses from one forward pass."""
        raise NotImplementedError(f"task {type(self).__name__} has no per-client losses")

    @torch.no_grad()
    def evaluate(self, model, enc, indices, batch_size: int) -> dict[str, float]:
        raise NotImplementedError


def _need_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise ConfigError("model.tokenizer: a model built from model.from_config needs model.tokenizer to read text "
                          "(or data with a pre-tokenized input_ids column)")


def _pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return ids, mask, lengths


@TASKS.register("classification")
class Classification(Task):
    """Sequence classification: cross-entropy on the label; accuracy."""

    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    head_names = ["classifier", "score"]
    needs_labels = True

    def model_kwargs(self, examples) -> dict[str, Any]:
        names = examples.label_names
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}}

    def encode(self, examples) -> dict[str, torch.Tensor]:
        _need_tokenizer(self.tokenizer)
        tok = self.tokenizer(list(examples.texts), truncation=True, max_length=self.cfg.task.max_length)
        ids, mask, lengths = _pad_rows(tok["input_ids"], self.tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.as_tensor(examples.labels, dtype=torch.long),
                "lengths": lengths}

    def forward(self, model, batch: dict[str, torch.Tensor]):
        """The model's output on one batch (under ``autocast``)."""
        with self.autocast():
            return model(**batch)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(model, batch).loss

    def segment_losses(self, model, batch, sizes):
        """Mean cross-entropy over each client's rows (the transformers head's loss, per client)."""
        logits = self.forward(model, {k: v for k, v in batch.items() if k != "labels"}).logits
        per_row = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
        return torch.stack([part.mean() for part in per_row.split(sizes)])

    @torch.no_grad()
    def evaluate(self, model, enc, indices, batch_size: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total_loss, correct, n = 0.0, 0, 0
        for batch in self.batches(enc, indices, batch_size):
            out = self.forward(model, batch)
            k = len(batch["labels"])
            total_loss += float(out.loss) * k
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            n += k
        model.train(was_training)
        if n == 0:
            return {}
        return {"loss": total_loss / n, "accuracy": correct / n}


def make_task(cfg, tokenizer) -> Task:
    return TASKS.get(cfg.task.name)(cfg, tokenizer)


from . import clip, instruction, lm, vision  # noqa: E402,F401  (register the CLIP, causal-LM and image tasks)
