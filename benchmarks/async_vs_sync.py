"""Synchronous FedAvg vs FedBuff by simulated time-to-accuracy, on the same heterogeneous clients.

Workload: the built-in ``bbc-lora`` (MiniLM + LoRA, BBC News, 10 Dirichlet(0.5) clients), client speeds drawn
lognormal (sigma 1.0: the slowest client is several times slower than the fastest), 1 simulated second per local
step of a speed-1 client. Both schedules do the same client work: ``--updates`` client trainings in all.
  * sync: 5 clients per round, the round lasts as long as its slowest client;
  * fedbuff: 5 clients training at once, a server step at every 5 results, staleness weight (1 + tau)^-1/2.
Both are evaluated after every server step. Reported: accuracy against simulated seconds, and the simulated time at
which each first reaches 85% test accuracy.

    PYTHONPATH=src python benchmarks/async_vs_sync.py [--updates 40]

prints one JSON line per schedule and appends it to benchmarks/results/async_vs_sync.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import time
from pathlib import Path

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "async_vs_sync.jsonl"
TARGET = 0.85
COMMON = ["clock.speed_distribution=lognormal", "clock.speed_sigma=1.0", "eval.per_client=false",
          "runtime.threads=2", "name=async_vs_sync", "federation.clients_per_round=5"]
SCHEDULES = {
    "sync": [],
    "fedbuff": ["federation.schedule=fedbuff", "federation.concurrency=5", "federation.buffer_size=5"],
}


def run(schedule: str, updates: int) -> dict:
    import torch

    from fedfm.config import load_config
    from fedfm.simulation import Simulation, prepare

    torch.set_num_threads(2)
    overrides = COMMON + SCHEDULES[schedule] + [f"federation.rounds={updates // 5}"]
    cfg = load_config("bbc-lora", overrides)
    t0 = time.perf_counter()
    rows = Simulation(prepare(cfg)).run()
    reached = next((r["sim_time_s"] for r in rows if r["eval_accuracy"] >= TARGET), None)
    return {"benchmark": "async_vs_sync", "schedule": schedule, "overrides": overrides, "client_updates": updates,
            "sim_time_s": [r["sim_time_s"] for r in rows], "accuracy": [r["eval_accuracy"] for r in rows],
            "sim_seconds_to_85": reached, "final_accuracy": rows[-1]["eval_accuracy"],
            "total_sim_s": rows[-1]["sim_time_s"], "wall_s": time.perf_counter() - t0,
            "date": _dt.datetime.now().isoformat(timespec="seconds")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=40)
    args = ap.parse_args()
    for schedule in SCHEDULES:
        emit(run(schedule, args.updates), RESULTS)


if __name__ == "__main__":
    main()
