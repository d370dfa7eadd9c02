"""Federated prompt learning for CLIP: CoOp (Zhou et al. 2022) trained as in PromptFL (Guo et al. 2023).

Each client learns the context vectors [V]_1..[V]_M of the class prompts ``[SOS] [V]_1..[V]_M <class name> . [EOS]``
on its own images with CLIP's image and text towers frozen (``models/coop.py``); only the context travels and the
server averages it (FedAvg, or any server optimizer). The class names are the data's label names; with
``adapter.context_init: "a photo of a"`` and ``adapter.num_virtual_tokens: 4`` the first prompts are CLIP's zero-shot
prompts ``a photo of a <class name>.``, so round 0 scores zero-shot CLIP.

The image tower is frozen and in eval mode, so an image's feature is a fixed function of its pixels: it is computed
the first time the image is met and kept (keyed by a hash of the image's bytes), so from the second epoch on a step
costs only the text side (K prompts through the text transformer) and no image forward at all.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from . import TASKS, Task

BARE_NUMBER = re.compile(r"-?\d+(\.\d+)?")
PLACEHOLDER = "X"  # CoOp's placeholder token, one per context vector, replaced by [V]_i before the text transformer


class ClipPreprocessor:
    """What a CLIP task reads its input with: the text tokenizer (class prompts) and the image processor (pixels)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def save_pretrained(self, path: str) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def class_prompt_names(label_names, source: str) -> list[str]:
    """The class names read into the prompts: the data's label names, which must be names, not bare numbers."""
    if not label_names:
        raise DataError(f"data.label_names: task clip_prompt reads each class's name into its prompt; {source} gives "
                        f"no label names (set data.label_names to the class names, in label order)")
    if all(BARE_NUMBER.fullmatch(str(n).strip()) for n in label_names):
        shown = ", ".join(map(str, label_names[:5])) + (" …" if len(label_names) > 5 else "")
        raise DataError(f"data.label_names: task clip_prompt reads each class's name into its prompt ('a photo of a "
                        f"<name>.'), but the labels of {source} are bare numbers ({shown}); set data.label_names to the "
                        f"class names (e.g. [t-shirt, trouser, ...]), one per label, and label the rows by those names")
    return [str(n).replace("_", " ").strip() for n in label_names]


def image_key(image: np.ndarray) -> int:
    """A 63-bit hash of an image's shape and bytes: equal images share a key (and so their cached feature)."""
    h = hashlib.blake2b(str(image.shape).encode(), digest_size=8)
    h.update(np.ascontiguousarray(image).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


@TASKS.register("clip_prompt")
class ClipPrompt(Task):
    """CoOp prompt learning on a frozen CLIP: cross-entropy of s · cos(f(image), w(prompt of c)) over the classes c;
    loss and accuracy."""

    auto_class = "AutoModel"  # CLIPModel for a CLIP config
    needs_labels = True
    reads_images = True
    learns_context = True  # adapter.method coop's prompts are built here
    cache_image_features = True  # the frozen image tower's features, once per image (see the module's docstring)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.class_names: list[str] = []
        self.notes: list[str] = []
        self._features: dict[int, torch.Tensor] = {}  # image key -> feature (on the model's device)

    # -------------------------------------------------------------------------------------------- setup

    @classmethod
    def load_preprocessor(cls, model_cfg, public_texts: list[str] | None = None) -> ClipPreprocessor:
        from ..models.loader import load_image_processor, load_tokenizer

        tokenizer = load_tokenizer(model_cfg)
        if tokenizer is None:
            raise ConfigError("model.tokenizer: task clip_prompt tokenizes its class prompts; a model built from "
                              "model.from_config needs model.tokenizer (e.g. minilm)")
        return ClipPreprocessor(tokenizer, load_image_processor(model_cfg))

    @classmethod
    def check_config(cls, cfg) -> None:
        """Before anything loads: CoOp is what this task trains (whose own check refuses a model without CLIP's text
        and vision towers), and class names given in the config are names."""
        if cfg.adapter.method != "coop":
            raise ValueError(f"task.name 'clip_prompt' learns CoOp's prompt context on a frozen CLIP; adapter.method "
                             f"{cfg.adapter.method!r} is not supported with it (set adapter.method: coop)")
        if cfg.data.label_names is not None:
            try:
                class_prompt_names(cfg.data.label_names, "data.label_names")
            except DataError as e:
                raise ValueError(str(e)) from None

    def model_kwargs(self, examples) -> dict[str, Any]:
        """Checks the class names and the initial context against the tokenizer before the base loads."""
        self.class_names = class_prompt_names(examples.label_names, examples.source or "the data")
        if examples.labels is not None and len(examples.labels) and int(np.max(examples.labels)) >= len(self.class_names):
            raise DataError(f"data.label_names: {len(self.class_names)} class name(s) for labels up to "
                            f"{int(np.max(examples.labels))}; give one name per class")
        ids, eos = self._prompt_rows()
        self._context_tokens()
        from ..models.loader import peek_config

        limit = getattr(getattr(peek_config(self.cfg.model), "text_config", None), "max_position_embeddings", None)
        if limit is not None and ids.shape[1] > limit:
            longest = self.class_names[int(eos.argmax())]
            raise ConfigError(f"adapter.num_virtual_tokens: the prompts are up to {ids.shape[1]} tokens ([SOS], "
                              f"{self.cfg.adapter.num_virtual_tokens} context vectors, the class name, e.g. "
                              f"{longest!r}, '.' and [EOS]); the text model reads at most {limit}")
        return {}

    def _placeholder_id(self) -> int:
        ids = self.tokenizer.tokenizer(PLACEHOLDER, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"model.tokenizer: CoOp's placeholder {PLACEHOLDER!r} is {len(ids)} tokens for this "
                              f"tokenizer; expected one")
        return ids[0]

    def _prompt_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of every class prompt ``[SOS] X..X name . [EOS]`` (padded after [EOS]) and each [EOS] position."""
        tok, m = self.tokenizer.tokenizer, self.cfg.adapter.num_virtual_tokens
        x = self._placeholder_id()
        texts = [" ".join([PLACEHOLDER] * m) + f" {name}." for name in self.class_names]
        rows = tok(texts, add_special_tokens=True)["input_ids"]
        for name, row in zip(self.class_names, rows):
            if row[1:1 + m] != [x] * m or len(row) < m + 3 or row[-1] not in tok.all_special_ids:
                raise ConfigError(f"model.tokenizer: the prompt of class {name!r} does not tokenize as [SOS] and "
                                  f"{m} placeholders (adapter.num_virtual_tokens) followed by the name and [EOS]")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return ids, torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)

    def _context_tokens(self) -> list[int] | None:
        """The token ids of ``adapter.context_init`` (one per context vector), or None when it is unset."""
        phrase, m = self.cfg.adapter.context_init, self.cfg.adapter.num_virtual_tokens
        if phrase is None:
            return None
        ids = self.tokenizer.tokenizer(phrase, add_special_tokens=False)["input_ids"]
        if len(ids) != m:
            raise ConfigError(f"adapter.context_init: {phrase!r} is {len(ids)} tokens, and its token embeddings are "
                              f"the initial context: set adapter.num_virtual_tokens to {len(ids)} (it is {m}), or "
                              f"adapter.context_init to null for a random context")
        return ids

    def prepare_model(self, model) -> None:
        """The class prompts and the initial context: ``adapter.context_init``'s token embeddings (round 0 is then
        zero-shot CLIP with the prompts ``<context_init> <class name>.``), else N(0, 0.02) as in CoOp."""
        from ..randomness import Randomness

        ids, eos = self._prompt_rows()
        model.set_prompts(ids, eos, self.class_names)
        init = self._context_tokens()
        with torch.no_grad():
            if init is not None:
                model.context.copy_(model.token_embeddings(torch.tensor(init)))
            else:
                gen = Randomness.from_config(self.cfg).torch("coop_context")
                model.context.copy_(torch.randn(model.context.shape, generator=gen) * 0.02)
        start = f"{self.cfg.adapter.context_init!r}" if init is not None else "N(0, 0.02)"
        self.notes.append(f"clip_prompt: CoOp, {model.num_context} context vectors from {start}, "
                          f"{len(self.class_names)} classes ({', '.join(self.class_names[:5])}"
                          f"{' …' if len(self.class_names) > 5 else ''})")

    # -------------------------------------------------------------------------------------------- data

    def encode(self, examples) -> dict[str, torch.Tensor]:
        """The images as they are (uint8, padded to the largest; ``image_size`` keeps each one's own), a key per
        image for its cached feature, and the labels. Pixels are made model inputs by the image processor only for
        images whose feature is not cached yet."""
        if examples.images is None:
            raise DataError(f"data.source: task clip_prompt learns from images; {examples.source or 'the data'} has "
                            f"none (a folder of images per class, an image column, or an .npz of arrays)")
        images = [np.asarray(im) for im in examples.images]
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise DataError(f"data.source: image {i} of {examples.source or 'the data'} is {im.dtype} "
                                f"{'x'.join(map(str, im.shape))}; expected H x W x 3 uint8 RGB")
        n = len(images)
        h = max((im.shape[0] for im in images), default=1)
        w = max((im.shape[1] for im in images), default=1)
        pixels = np.zeros((n, h, w, 3), dtype=np.uint8)
        for i, im in enumerate(images):
            pixels[i, :im.shape[0], :im.shape[1]] = im
        return {"images": torch.from_numpy(pixels),
                "image_size": torch.tensor([im.shape[:2] for im in images], dtype=torch.long).reshape(n, 2),
                "image_key": torch.tensor([image_key(im) for im in images], dtype=torch.long),
                "labels": torch.as_tensor(examples.labels, dtype=torch.long),
                "lengths": torch.ones(n, dtype=torch.long)}

    def collate(self, enc: dict[str, torch.Tensor], sel: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows ``sel``: images stay on the CPU (the image processor reads them there), labels on the device."""
        return {"images": enc["images"][sel], "image_size": enc["image_size"][sel], "image_key": enc["image_key"][sel],
                "labels": enc["labels"][sel].to(self.device)}

    def image_features(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """f for each image of the batch: from the cache, the frozen image tower computing only those not in it."""
        keys = batch["image_key"].tolist()
        todo = [i for i, k in enumerate(keys) if k not in self._features] if self.cache_image_features else \
            list(range(len(keys)))
        fresh: dict[int, torch.Tensor] = {}
        if todo:
            sizes = batch["image_size"].tolist()
            pics = [batch["images"][i, :sizes[i][0], :sizes[i][1]].numpy() for i in todo]
            pixels = self.tokenizer.image_processor(images=pics, return_tensors="pt")["pixel_values"]
            with torch.no_grad(), self.autocast():
                feats = model.image_features(pixels.to(self.device)).float()
            fresh = {i: f for i, f in zip(todo, feats)}
            if self.cache_image_features:
                self._features.update((keys[i], f) for i, f in fresh.items())
        return torch.stack([fresh[i] if i in fresh else self._features[k] for i, k in enumerate(keys)])

    # -------------------------------------------------------------------------------------------- loss, metrics

    def logits(self, model, batch: dict[str, torch.Tensor], text_features: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.image_features(model, batch)
        with self.autocast():
            text = model.text_features() if text_features is None else text_features
            return model.logits(feats, text).float()

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"])

    def segment_losses(self, model, batch, sizes):
        """Mean cross-entropy over each run of rows (one client's, or one example's under DP-SGD)."""
        per_row = F.cross_entropy(self.logits(model, batch), batch["labels"], reduction="none")
        return torch.stack([part.mean() for part in per_row.split(sizes)])

    @torch.no_grad()
    def evaluate(self, model, enc, indices, batch_size: int) -> dict[str, float]:
        """Mean cross-entropy and accuracy over the rows ``indices`` (the text features computed once)."""
        was_training = model.training
        model.eval()
        with self.autocast():
            text = model.text_features()
        total, correct, n = 0.0, 0, 0
        for batch in self.batches(enc, indices, batch_size):
            logits = self.logits(model, batch, text)
            total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            n += len(batch["labels"])
        model.train(was_training)
        if n == 0:
            return {}
        return {"loss": total / n, "accuracy": correct / n}
