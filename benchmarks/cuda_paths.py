"""The memory options of a causal-LM run on a GPU: fp32, bf16 autocast, gradient checkpointing, QLoRA 4-bit / 8-bit.

Workload (the same for every variant): the ``smollm2-chat`` config (SmolLM2-135M-Instruct + LoRA r=8 on
q/k/v/o over chatterbot-qa), with ``task.packing`` on and ``task.max_length=128``, so every training batch is
8 rows x 128 tokens of real conversations (loss on response tokens only). Each variant builds the model the way
``fedfm run`` does (``prepare`` + ``Simulation``), trains one client once to warm up, then runs real client trainings
(decode the global state, local AdamW steps, encode the delta) of ``--steps`` steps each on ``--clients`` clients.

Per variant one JSON line: tokens/s (real tokens: the attention mask's sum, padding excluded), the base's GPU
memory after loading, the peak GPU memory while training (``torch.cuda.max_memory_allocated``), the adapter's
dtype and upload size, and the mean train loss of the first and last client training.

    python benchmarks/cuda_paths.py [--variants fp32,bf16,...] [--steps 20] [--clients 3]

appends to benchmarks/results/cuda_paths.jsonl. Needs a CUDA GPU (4bit/8bit also need bitsandbytes).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results" / "cuda_paths.jsonl"

VARIANTS = {
    "fp32": [],
    "bf16": ["model.autocast=bf16"],
    "bf16+ckpt": ["model.autocast=bf16", "model.gradient_checkpointing=true"],
    "4bit": ["model.quantization=4bit", "model.autocast=bf16"],
    "4bit+ckpt": ["model.quantization=4bit", "model.autocast=bf16", "model.gradient_checkpointing=true"],
    "8bit": ["model.quantization=8bit", "model.autocast=bf16"],
}
BASE = ["task.packing=true", "task.max_length=128", "client.batch_size=8", "eval.initial=false"]


def measure(variant: str, steps: int, clients: int, config: str) -> dict:
    from fedfm.client import ClientTask
    from fedfm.config import load_config
    from fedfm.simulation import Simulation, prepare

    cfg = load_config(config, BASE + VARIANTS[variant] + [f"client.steps={steps}"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    server = Simulation(prepare(cfg))
    load_s = time.perf_counter() - t0
    base_mb = torch.cuda.memory_allocated() / 2**20 if cuda else float("nan")
    counted = {"real": 0, "rows": 0}
    loss_fn = server.task.loss

    def counting_loss(model, batch):
        counted["real"] += int(batch["attention_mask"].sum())
        counted["rows"] += int(batch["input_ids"].shape[0])
        return loss_fn(model, batch)

    server.task.loss = counting_loss
    order = sorted(range(len(server.data.clients)), key=lambda c: -len(server.data.clients[c].train))[:clients]

    def train(cid: int, rnd: int):
        payload, extras = server.broadcast(rnd, cid)
        return server.client_algo(ClientTask(client_id=cid, round=rnd, payload=payload, seed=1000 * rnd + cid,
                                             extras=extras))

    train(order[0], 0)  # warm-up: kernels, allocator, autotuning
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    counted.update(real=0, rows=0)
    losses, t1 = [], time.perf_counter()
    results = []
    for i, cid in enumerate(order):
        res = train(cid, 1)
        if res.error:
            raise RuntimeError(f"client {cid}: {res.error}")
        results.append(res)
        losses.append(res.metrics["train_loss"])
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t1
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in server.spec.params.values()})
    base_dtypes = sorted({str(p.dtype).replace("torch.", "") for n, p in server.model.named_parameters()
                          if n not in server.spec.params})
    n_steps = sum(r.metrics["steps"] for r in results)
    out = {
        "benchmark": "cuda_paths", "variant": variant, "config": config,
        "overrides": VARIANTS[variant], "steps_per_client": steps, "clients": len(order), "steps": n_steps,
        "batch": "8 x 128 packed", "train_s": round(wall, 3), "tokens": counted["real"],
        "tokens_per_s": round(counted["real"] / wall, 1), "steps_per_s": round(n_steps / wall, 3),
        "load_s": round(load_s, 2), "base_gpu_mb": round(base_mb, 1), "peak_gpu_mb": round(peak_mb, 1),
        "adapter_dtypes": dtypes, "base_dtypes": base_dtypes, "upload_bytes": len(results[0].update),
        "trainable": server.spec.numel, "train_loss_first_client": round(losses[0], 4),
        "train_loss_last_client": round(losses[-1], 4),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "date": _dt.date.today().isoformat(),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--config", default="smollm2-chat")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure one variant, print its JSON line
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.clients, args.config)), flush=True)
        return
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; expected some of {', '.join(VARIANTS)}")
    for v in args.variants.split(","):
        # each variant in its own process, so one's allocations never count in another's memory figures
        child = subprocess.run([sys.executable, __file__, "--one", v, "--steps", str(args.steps), "--clients",
                                str(args.clients), "--config", args.config], capture_output=True, text=True)
        lines = [ln for ln in child.stdout.splitlines() if ln.startswith("{")]
        if child.returncode == 0 and lines:
            rec = json.loads(lines[-1])
        else:  # one failing variant is recorded and the others still run
            err = (child.stderr.strip().splitlines() or ["no output"])[-1]
            rec = {"benchmark": "cuda_paths", "variant": v, "error": err, "date": _dt.date.today().isoformat()}
        emit(rec, None if args.no_save else RESULTS)


if __name__ == "__main__":
    main()
