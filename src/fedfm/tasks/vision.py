"""Image classification with any Hugging Face image model (ViT, DeiT, DINOv2, the vision tower of CLIP or SigLIP).

The model's own image processor resizes and crops each image once (``task.image_size`` scales its recipe to another
side); the encoding keeps those pixels as uint8 (70,000 images at 224 px are 10.5 GB as uint8, 42 GB as float32) and
each batch is rescaled and normalised as the processor would, on the model's device, when it is drawn.
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import TASKS, Classification

CHUNK = 512  # images through the processor at a time (its float32 intermediates stay small)


def image_model_config(config, by_type: bool = False) -> bool:
    """Whether a transformers config is an image model: a vision tower (``vision_config``), image channels
    (``num_channels``), or no vocabulary at all; with ``by_type`` also a type transformers classifies images with
    (ImageGPT has a vocabulary of colour clusters), read from transformers' model tables, which only an image task,
    about to load its model anyway, imports."""
    if (getattr(config, "vision_config", None) is not None or getattr(config, "num_channels", None) is not None
            or getattr(config, "vocab_size", None) is None):
        return True
    if not by_type:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES


def check_modality(run_cfg, images: bool) -> None:
    """A text task on an image model, or an image task on a text model, refused before anything loads (the model's
    config from what is at hand: ``models.loader.peek_config``; nothing is checked when it is not at hand)."""
    from ..models.loader import peek_config

    _check_modality(run_cfg, peek_config(run_cfg.model), images)


def _check_modality(run_cfg, config, images: bool) -> None:
    if config is None or image_model_config(config, by_type=images) == images:
        return
    model = run_cfg.model.name_or_path or f"model.from_config ({config.model_type})"
    if images:
        raise ConfigError(f"task.name {run_cfg.task.name!r} reads images, but model.name_or_path {model!r} "
                          f"(model_type {config.model_type!r}) is a text model; use an image model (dinov2-small, "
                          f"google/vit-base-patch16-224, openai/clip-vit-base-patch32, ...)")
    raise ConfigError(f"task.name {run_cfg.task.name!r} reads text, but model.name_or_path {model!r} "
                      f"(model_type {config.model_type!r}) is an image model; use task.name image_classification")


ALWAYS_INTERPOLATES = {"dinov2", "dinov2_with_registers"}  # resize their position grid to any input


def _check_image_size(run_cfg, config) -> None:
    """``task.image_size``: at least one patch, and a size the model's position embeddings can be used at."""
    side = run_cfg.task.image_size
    if side is None or config is None:
        return
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    vision = getattr(config, "vision_config", None) or config
    patch, own = getattr(vision, "patch_size", None), getattr(vision, "image_size", None)
    if isinstance(patch, int) and side < patch:
        raise ConfigError(f"task.image_size {side} is smaller than one {patch} x {patch} patch of model "
                          f"{run_cfg.model.name_or_path or config.model_type!r}")
    if own is None or own in (side, [side, side], (side, side)) or config.model_type in ALWAYS_INTERPOLATES:
        return
    cls = getattr(transformers, MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type, ""), None)
    if cls is not None and "interpolate_pos_encoding" not in inspect.signature(cls.forward).parameters:
        raise ConfigError(f"task.image_size {side}: {cls.__name__} has position embeddings for {own} px and cannot "
                          f"interpolate them; set task.image_size to {own} or leave it unset")


def _sized(processor, side: int) -> dict[str, Any]:
    """Processor arguments that make its output ``side`` x ``side``: the crop (when it crops) is ``side`` and the
    resize keeps the processor's own resize-to-crop ratio (DINOv2: 256 -> 224); a processor that only resizes
    resizes to ``side``."""
    size = dict(getattr(processor, "size", None) or {})
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    kwargs: dict[str, Any] = {}
    if crop:
        kwargs["crop_size"] = {"height": side, "width": side}
        if "shortest_edge" in size:
            ratio = size["shortest_edge"] / min(crop["height"], crop["width"])
            kwargs["size"] = {"shortest_edge": max(side, int(round(side * ratio)))}
        else:
            kwargs["size"] = {"height": side, "width": side}
    elif "shortest_edge" in size:
        kwargs["size"] = {"shortest_edge": side}
        kwargs["crop_size"] = {"height": side, "width": side}
        kwargs["do_center_crop"] = True
    else:
        kwargs["size"] = {"height": side, "width": side}
    return kwargs


@TASKS.register("image_classification")
class ImageClassification(Classification):
    """Image classification: cross-entropy on the label; accuracy. Examples are ``Examples.images`` (H x W x 3
    uint8 RGB); the model is transformers' ``AutoModelForImageClassification`` with a fresh ``classifier``."""

    auto_class = "AutoModelForImageClassification"
    peft_task_type = None  # peft has no image-classification task type: the head is kept by modules_to_save
    head_names = ["classifier"]
    needs_labels = True
    reads_images = True

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self._extra: dict[tuple, dict[str, Any]] = {}
        if cfg.task.image_size and tokenizer is not None:  # the run's processor is at task.image_size (and saved so
            # beside the adapter); none when only the model is rebuilt (fedfm export)
            for key, value in _sized(tokenizer, cfg.task.image_size).items():
                setattr(tokenizer, key, value)
        mean, std = getattr(tokenizer, "image_mean", None), getattr(tokenizer, "image_std", None)
        normalize = getattr(tokenizer, "do_normalize", False) and mean is not None and std is not None
        self.scale = float(tokenizer.rescale_factor) if getattr(tokenizer, "do_rescale", False) else 1.0
        self.mean = torch.tensor(mean if normalize else [0.0] * 3, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std if normalize else [1.0] * 3, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def load_preprocessor(cls, model_cfg, public_texts=None):
        from ..models.loader import load_image_processor

        return load_image_processor(model_cfg)

    @classmethod
    def check_config(cls, run_cfg) -> None:
        """An image model, at an image size it can take (the adapter methods that need text refuse image tasks
        themselves: ``models.adapters``)."""
        from ..models.loader import peek_config

        config = peek_config(run_cfg.model)
        _check_modality(run_cfg, config, images=True)
        _check_image_size(run_cfg, config)

    def encode(self, examples) -> dict[str, torch.Tensor]:
        """Every image through the processor once (resize, crop), kept as uint8 [N, 3, S, S]; the labels."""
        if examples.images is None:
            raise DataError(f"data.source {examples.source!r}: task.name {self.cfg.task.name!r} needs images, the "
                            f"source has {'texts' if examples.texts is not None else 'none'}")
        kwargs = dict(do_rescale=False, do_normalize=False, input_data_format="channels_last", return_tensors="np")
        chunks = []
        for i in range(0, len(examples.images), CHUNK):
            pixels = self.tokenizer(list(examples.images[i:i + CHUNK]), **kwargs)["pixel_values"]
            chunks.append(torch.from_numpy(np.clip(np.round(pixels), 0, 255).astype(np.uint8)))
        pixels = torch.cat(chunks) if chunks else torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
        return {"pixels": pixels, "labels": torch.as_tensor(examples.labels, dtype=torch.long)}

    def collate(self, enc, sel) -> dict[str, torch.Tensor]:
        """One batch: the uint8 pixels rescaled and normalised (the processor's ``rescale_factor``, ``image_mean``,
        ``image_std``) on the model's device."""
        x = enc["pixels"][sel].to(self.device, non_blocking=True).float()
        pixel_values = (x * self.scale - self.mean.to(x.device)) / self.std.to(x.device)
        return {"pixel_values": pixel_values, "labels": enc["labels"][sel].to(self.device)}

    def forward(self, model, batch):
        """A model whose position embeddings are for another size (ViT at ``task.image_size``) interpolates them."""
        shape = tuple(batch["pixel_values"].shape[-2:])
        key = (id(model), shape)
        if key not in self._extra:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            config = getattr(base.config, "vision_config", None) or base.config
            size = getattr(config, "image_size", None)
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            takes = "interpolate_pos_encoding" in inspect.signature(base.forward).parameters
            self._extra[key] = {"interpolate_pos_encoding": True} if takes and size != shape else {}
        with self.autocast():
            return model(**batch, **self._extra[key])
