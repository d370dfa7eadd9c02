"""Black-box tuning (FedBPT on BBT's subspace): does the learned soft prompt beat no prompt, and what does it cost in
calls to the owner's forward-only service?

Workload: SmolLM2-135M-Instruct behind the inference service (its own process, started by the run on 127.0.0.1,
``runtime.threads`` threads), as a causal LM scoring one label word per BBC News topic after the template
"<text>\\nTopic:"; texts cut to ``task.max_length`` = 32 tokens; 3 clients (Dirichlet 0.5), all 3 every round; each
client runs CMA-ES on z ∈ R^50 (a prompt of 5 tokens) from the global z: ``--iterations`` iterations of ``--popsize``
candidates, each one forward call on the same mini-batch of 8 of its own examples; FedAvg on z. The server scores the
global prompt and the zero-prompt baseline (the same model, no soft prompt) through the same service on the same
seeded 60 held-out examples: both sides of the comparison in one run.

Per round (one JSON line each, then a summary line): held-out accuracy and loss of the global prompt, of no prompt,
API calls and examples scored per client (counted by the service), bytes up/down per client, wall seconds.

    PYTHONPATH=src python benchmarks/blackbox.py [--rounds 3] [--popsize 4] [--iterations 4]

Lines are printed and appended to benchmarks/results/blackbox.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "blackbox.jsonl"
THREADS = 2


def overrides(args, out_dir: str) -> list[str]:
    return [
        "name=blackbox", "model.name_or_path=smollm2-135m-instruct", "client.algorithm=fedbpt",
        "adapter.method=prompt", f"adapter.num_virtual_tokens={args.tokens}", "adapter.target_modules=null",
        "task.max_length=32", "partition.num_clients=3", "federation.clients_per_round=3", "federation.min_clients=2",
        f"federation.rounds={args.rounds}", "client.batch_size=8", f"blackbox.intrinsic_dim={args.dim}",
        f"blackbox.popsize={args.popsize}", f"blackbox.iterations={args.iterations}", f"blackbox.sigma={args.sigma}",
        "eval.every=1", "eval.initial=true", "eval.per_client=false", "eval.max_examples=60", "eval.batch_size=25",
        "blackbox.timeout_s=600",  # a busy 2-core machine takes minutes for a batch: slow is not gone
        f"runtime.threads={THREADS}", f"output.dir={out_dir}", f"federation.seed={args.seed}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--popsize", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=5)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="federation.seed: the partition, held-out sample, A, CMA-ES")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # this process only talks to the service; the service has THREADS
    from fedfm.config import load_config
    from fedfm.simulation import Simulation, prepare

    sink = None if args.no_save else RESULTS
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": THREADS,
               "python": platform.python_version(), "torch": torch.__version__,
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("bbc-lora", overrides(args, str(Path(tmp) / "run")))
        sim = Simulation(prepare(cfg))
        build_s = time.perf_counter() - t0
        rows = sim.run()
    total_s = time.perf_counter() - t0
    settings = {k: getattr(args, k) for k in ("rounds", "popsize", "iterations", "dim", "tokens", "sigma", "seed")}
    for r in rows:
        k = max(len(r.get("clients", [])), 1)
        emit({"bench": "blackbox", "round": r["round"], **settings,
              "accuracy": r.get("eval_accuracy"), "loss": r.get("eval_loss"),
              "zero_prompt_accuracy": r.get("eval_zero_prompt_accuracy"),
              "zero_prompt_loss": r.get("eval_zero_prompt_loss"),
              "api_calls_per_client": r.get("api_calls_per_client"),
              "api_examples_per_client": r.get("api_examples_per_client"),
              "bytes_up_per_client": r["bytes_up"] / k if "bytes_up" in r else None,
              "bytes_down_per_client": r["bytes_down"] / k if "bytes_down" in r else None,
              "train_loss": r.get("train_loss"), "wall_s": r.get("wall_s")}, sink)
    last = rows[-1]
    best = max(r.get("eval_accuracy", 0.0) for r in rows)
    emit({"bench": "blackbox", "summary": True, **settings, "final_accuracy": last.get("eval_accuracy"),
          "best_accuracy": best, "round0_accuracy": rows[0].get("eval_accuracy"),
          "zero_prompt_accuracy": last.get("eval_zero_prompt_accuracy"),
          "beats_zero_prompt": (last.get("eval_accuracy") or 0) > (last.get("eval_zero_prompt_accuracy") or 0),
          "eval_examples": 60, "build_s": round(build_s, 1), "total_s": round(total_s, 1),
          "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2), **machine,
          "workload": "smollm2-135m-instruct behind the service, bbc-news, verbalizer after '\\nTopic:', "
                      "max_length 32, 3 dirichlet(0.5) clients, all per round, batch 8, fedavg on z"}, sink)


if __name__ == "__main__":
    sys.exit(main())
