"""CoOp on a frozen CLIP: a local training step with the image features cached per image (``clip_prompt``'s
default) against the same step recomputing them (the image processor and the image tower on every batch).

Workload: a CLIP of ViT-B/32's shape (text: 12 layers of 512; vision: 12 layers of 768 on 224 x 224, patch 32;
projection 512; ~150M parameters) built from a config with random weights (no checkpoint is reachable offline; speed
does not depend on the weights), the MiniLM tokenizer, CLIP's image processor at 224, 10 classes named as
Fashion-MNIST's, 28 x 28 images, M = 4 context vectors, AdamW, batches of --batch images.

* recompute: ``task.cache_image_features = False``: every step preprocesses its images and runs the image tower;
* cached: the same steps once the features are in the cache (every epoch after the first); the first, cold pass is
  reported too.

Both sides run the same batches from the same context and their losses must agree (``max_loss_diff``); each side is
timed --repeats times, alternating, fastest kept.

    python benchmarks/clip_prompt.py [--steps 4] [--batch 16] [--threads 1] [--device cpu] [--no-save]

appends one JSON line to benchmarks/results/clip_prompt.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results" / "clip_prompt.jsonl"

VIT_B32 = {"model_type": "clip", "projection_dim": 512,
           "text_config": {"vocab_size": 30522, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                           "num_attention_heads": 8, "max_position_embeddings": 77, "bos_token_id": 101,
                           "eos_token_id": 102, "pad_token_id": 0},
           "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                             "num_attention_heads": 12, "image_size": 224, "patch_size": 32}}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fedfm.config import validate_config
    from fedfm.data.sources import Examples
    from fedfm.models import build_model

    cfg = validate_config({
        "model": {"name_or_path": None, "from_config": VIT_B32, "tokenizer": "minilm", "device": args.device,
                  "image_processor": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
                                      "crop_size": {"height": 224, "width": 224}}},
        "adapter": {"method": "coop", "num_virtual_tokens": 4, "context_init": "a photo of a", "target_modules": None},
        "task": {"name": "clip_prompt"}, "data": {"source": "memory"}})
    n = args.steps * args.batch
    rng = np.random.default_rng(0)
    labels = np.arange(n) % len(CLASSES)
    examples = Examples(texts=None, images=list(rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)), labels=labels,
                        label_names=CLASSES, source="memory")
    bundle = build_model(cfg, examples)
    model, task = bundle.model, bundle.task
    enc = task.encode(examples)
    batches = [task.collate(enc, torch.arange(i, i + args.batch)) for i in range(0, n, args.batch)]
    start = model.context.detach().clone()

    def sync() -> None:
        if task.device.type == "cuda":
            torch.cuda.synchronize()

    def run(cached: bool) -> tuple[float, list[float]]:
        """Seconds for the steps, and their losses, from the same initial context."""
        task.cache_image_features = cached
        with torch.no_grad():
            model.context.copy_(start)
        opt = torch.optim.AdamW([model.context], lr=1e-3)
        losses = []
        sync()
        t0 = time.perf_counter()
        for batch in batches:
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        sync()
        return time.perf_counter() - t0, losses

    task._features.clear()
    cold, cold_losses = run(True)  # fills the cache
    best = {"recompute": float("inf"), "cached": float("inf")}
    losses = {}
    for _ in range(args.repeats):
        for side in ("recompute", "cached"):
            t, losses[side] = run(side == "cached")
            best[side] = min(best[side], t)
    diff = max(abs(a - b) for a, b in zip(losses["recompute"], losses["cached"]))
    record = {
        "benchmark": "clip_prompt", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "CLIP ViT-B/32 shape, random weights", "params": sum(p.numel() for p in model.parameters()),
        "device": str(task.device), "threads": args.threads, "steps": args.steps, "batch": args.batch,
        "classes": len(CLASSES), "context": int(model.num_context),
        "step_s_recompute": best["recompute"] / args.steps, "step_s_cached": best["cached"] / args.steps,
        "step_s_cold": cold / args.steps, "speedup": best["recompute"] / best["cached"],
        "max_loss_diff": diff, "cold_loss_diff": max(abs(a - b) for a, b in zip(cold_losses, losses["cached"])),
    }
    emit(record, None if args.no_save else RESULTS)


if __name__ == "__main__":
    main()
