"""Offsite tuning (Xiao et al. 2023) on SmolLM2-135M-Instruct with instruction data, as the paper's tables report it.

Workload: the built-in ``smollm2-chat`` config (SmolLM2-135M-Instruct, chatterbot-corpus English Q/A, one client per
category, a 10% held-out split), shortened to ``--rounds`` rounds of ``--clients`` clients × ``--steps`` local steps,
with ``client.algorithm: offsite`` (k = 2 adapter blocks at each end, half of the 26 middle blocks dropped: an
emulator of 17 of the 30 blocks). Two arms in one run: the adapter tuned whole (``adapter.method: full``, the
paper's), LoRA r=8 on q/k/v/o of the adapter blocks only (``lora``, as FederatedScope-LLM), and the adapter tuned
whole on an emulator the owner first distilled for 40 steps on its held-out text (``full+distill``).

Per arm, from the run's own rows (the server's held-out set, the same examples every evaluation):
- the full model zero-shot (round 0's ``plugged_*``: the untrained adapter is the full model's own blocks, or LoRA
  with B = 0), the emulator zero-shot (round 0's ``eval_*``), the emulator fine-tuned (the last round's ``eval_*``)
  and the full model with the tuned adapter plugged in (the last round's ``plugged_*``): response loss, perplexity,
  and exact match / ROUGE-L of greedy answers to ``--prompts`` held-out questions (``--eval-examples``: the same
  seeded subset of the held-out split every time);
- bytes to one client: the emulator directory once (``emulator_bytes``), the adapter per round (``bytes_down`` per
  client), against the full model's parameter bytes; bytes up per client and round;
- seconds (wall, building the emulator and every evaluation included).

    PYTHONPATH=src python benchmarks/offsite.py [--rounds 3] [--only full,lora]   # appends JSON lines

One JSON line per arm is printed and appended to benchmarks/results/offsite.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import platform
import tempfile
import time
from pathlib import Path

import torch

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "offsite.jsonl"
THREADS = 2
ARMS = {
    "full": ["adapter.method=full", "client.lr=0.0002"],
    "lora": ["adapter.method=lora"],
    # the paper's emulator distillation, on the server's held-out text (the owner's public text), before the run
    "full+distill": ["adapter.method=full", "client.lr=0.0002", "offsite.distill_steps=40",
                     "offsite.distill_lr=0.0001"],
}


def arm(name: str, args, work: Path) -> dict:
    from fedfm.config import load_config
    from fedfm.simulation import Simulation, prepare

    overrides = [
        "client.algorithm=offsite", "offsite.adapter_layers=2", "offsite.drop_ratio=0.5",
        f"federation.rounds={args.rounds}", f"federation.clients_per_round={args.clients}",
        f"client.steps={args.steps}", f"eval.every={args.rounds}", "eval.initial=true",
        f"eval.generation.num_prompts={args.prompts}", f"eval.max_examples={args.eval_examples}",
        f"runtime.threads={THREADS}", "name=offsite",
        f"output.dir={work / name}", *ARMS[name],
    ]
    cfg = load_config("smollm2-chat", overrides)
    t0 = time.perf_counter()
    sim = Simulation(prepare(cfg))
    built = time.perf_counter() - t0
    rows = sim.run()
    wall = time.perf_counter() - t0
    first, last = rows[0], rows[-1]
    trained = [r for r in rows if r["round"] > 0]
    emulator = sim.server.algo_server.emulator
    per_client_down = [r["bytes_down"] / len(r["clients"]) if "clients" in r else r["bytes_down"] / args.clients
                       for r in trained]
    metrics = ("loss", "perplexity", "exact_match", "rougeL")
    out = {
        "bench": "offsite", "arm": name, "overrides": overrides,
        "full_zero_shot": {m: first.get(f"plugged_{m}") for m in metrics},
        "emulator_zero_shot": {m: first.get(f"eval_{m}") for m in metrics},
        "emulator_tuned": {m: last.get(f"eval_{m}") for m in metrics},
        "plugged_in": {m: last.get(f"plugged_{m}") for m in metrics},
        "train_loss": [r.get("train_loss") for r in trained],
        "blocks": {"full": emulator.plan.depth, "emulator": len(emulator.plan.order),
                   "adapter": emulator.plan.adapter(emulator=False), "kept": list(emulator.plan.kept)},
        "emulator_bytes": emulator.nbytes, "full_model_bytes": emulator.full_bytes,
        "adapter_values": sim.spec.numel,
        "bytes_down_per_client_round": sum(per_client_down) / len(per_client_down),
        "bytes_up_per_client_round": sum(r["bytes_up"] for r in trained) / sum(
            len(r.get("clients", [])) or args.clients for r in trained),
        "rounds": args.rounds, "clients_per_round": args.clients, "steps": args.steps, "prompts": args.prompts,
        "eval_examples": args.eval_examples,
        "distill_mse": [emulator.distill_losses[0], emulator.distill_losses[-1]] if emulator.distill_losses else None,
        "build_s": round(built, 1), "wall_s": round(wall, 1),
        "threads": THREADS, "machine": platform.machine(), "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    del sim
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--eval-examples", type=int, default=32)
    ap.add_argument("--only", default=",".join(ARMS))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="fedfm-offsite-") as tmp:
        for name in args.only.split(","):
            emit(arm(name, args, Path(tmp)), None if args.no_save else RESULTS)


if __name__ == "__main__":
    main()
