"""Is the default ``fedfm run`` steady? Today's ``bbc-lora`` defaults against candidate defaults, over seeds.

Workload (identical for every arm): the built-in ``bbc-lora`` config (all-MiniLM-L6-v2 + LoRA r=8 on query/value and
the classifier head; BBC News, 10 Dirichlet(0.5) clients, 5 a round, 10 rounds, 1 local epoch of AdamW at batch 16),
with ``federation.seed`` set to the seed (it draws the partition, the client sample and the model's fresh head).
Arms change only the keys they list in ``ARMS``; ``defaults`` is the config as shipped, so after the defaults change
its rows describe the new defaults (each line records its resolved client and server settings).

Per arm and seed, one process each (``--arm``): the held-out accuracy and the worst-10% client's local accuracy after
every round, the clients sampled each round, the best round, final − best, the mean of the last 3 rounds, and wall
seconds (``--threads``, default 1: the machine's cores are shared).

    PYTHONPATH=src python benchmarks/default_run.py [--seeds 0,1,2] [--only defaults,fedavgm] [--rounds 10]
    PYTHONPATH=src python benchmarks/default_run.py --render     # the table in docs/default_run.md

One JSON line per arm and seed is printed and appended to benchmarks/results/default_run.jsonl.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from pathlib import Path

from _results import arms_main, latest_records, seed_means, write_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "default_run.jsonl"
DOC = ROOT / "docs" / "default_run.md"
THREADS = 1
ARM_TIMEOUT_S = 3600
ARMS: dict[str, list[str]] = {
    "defaults": [],
    # the shipped defaults before this benchmark (commit 58c6048), spelled out so the arm stays the same after they change
    "before": ["client.lr=0.005", "server.optimizer=fedavg", "server.lr=1.0", "federation.clients_per_round=5"],
    # FedAvgM (Hsu et al. 2019): server momentum β averages the last rounds' skewed deltas; η(1−β)⁻¹ = 1 keeps the
    # steady-state step of plain averaging
    "fedavgm": ["client.lr=0.005", "server.optimizer=fedavgm", "server.momentum=0.5", "server.lr=0.5",
                "federation.clients_per_round=5"],
    # the same momentum at the optimizer's default η = 1 (so the config needs only server.optimizer and momentum)
    "fedavgm-lr1": ["client.lr=0.005", "server.optimizer=fedavgm", "server.momentum=0.5", "server.lr=1.0",
                    "federation.clients_per_round=5"],
    # every client in every round (full participation, as in cross-silo federations of a few owners): a round's label
    # mix is then the federation's, not the 5 sampled clients'
    "all10": ["client.lr=0.005", "server.optimizer=fedavg", "server.lr=1.0", "federation.clients_per_round=10"],
    # a smaller client step: each client drifts less towards its own labels (Karimireddy et al. 2020's client drift)
    "lr2e-3": ["client.lr=0.002", "server.optimizer=fedavg", "server.lr=1.0", "federation.clients_per_round=5"],
}


def _worst10(row: dict) -> float | None:
    return row.get("client_acc_worst10")


def run_arm(name: str, seed: int, rounds: int) -> dict:
    import torch

    from fedfm.config import load_config
    from fedfm.simulation import Simulation, prepare

    torch.set_num_threads(THREADS)
    overrides = [f"federation.seed={seed}", f"runtime.threads={THREADS}", f"federation.rounds={rounds}"] + ARMS[name]
    cfg = load_config("bbc-lora", overrides)
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    rows = Simulation(prepared).run()  # no run directory: nothing is written
    wall = time.perf_counter() - t0
    rows = [r for r in rows if r.get("round", 0) > 0]
    acc = [r.get("eval_accuracy") for r in rows]
    worst = [_worst10(r) for r in rows]
    best = max(range(len(acc)), key=lambda i: acc[i])
    part = prepared.data.describe()
    return {
        "benchmark": "default_run", "arm": name, "seed": seed, "overrides": overrides,
        "workload": "bbc-lora: minilm + lora r8 q,v + head, bbc-news, 10 dirichlet(0.5) clients, 5/round, 1 epoch",
        "client": {k: getattr(cfg.client, k) for k in ("optimizer", "lr", "epochs", "steps", "batch_size")},
        "server": {k: getattr(cfg.server, k) for k in ("optimizer", "lr", "momentum")},
        "rounds": len(rows), "accuracy": acc, "worst10": worst,
        "clients": [r.get("clients") for r in rows], "client_acc": [r.get("client_acc") for r in rows],
        "best_round": best + 1, "best": acc[best], "final": acc[-1], "final_minus_best": acc[-1] - acc[best],
        "last3": sum(acc[-3:]) / len(acc[-3:]), "final_worst10": worst[-1], "min_worst10_last3": min(worst[-3:]),
        "bytes_up": sum(r.get("bytes_up", 0) for r in rows), "bytes_down": sum(r.get("bytes_down", 0) for r in rows),
        "label_counts": [c["label_counts"] for c in part["clients"]],
        "wall_s": wall, "threads": THREADS, "machine": platform.machine(), "cpus": os.cpu_count(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def render() -> None:
    latest = latest_records(RESULTS, ARMS)
    order = list(ARMS)
    lines = ["| arm | seed | accuracy by round | worst-10% client by round | best (round) | final − best | "
             "last-3 mean | wall s |", "|---|---|---|---|---|---|---|---|"]
    for (arm, seed), r in sorted(latest.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        lines.append(f"| {arm} | {seed} | {' '.join(f'{a:.3f}' for a in r['accuracy'])} | "
                     f"{' '.join(f'{w:.2f}' for w in r['worst10'])} | {r['best']:.3f} ({r['best_round']}) | "
                     f"{r['final_minus_best']:+.3f} | {r['last3']:.3f} | {r['wall_s']:.0f} |")
    keys = ("best", "final", "final_minus_best", "last3", "final_worst10", "min_worst10_last3")
    means = seed_means(latest, order, keys)
    if means:
        lines += ["", "| arm | seeds | best | final | final − best | last-3 mean | final worst-10% | "
                  "lowest worst-10% of the last 3 |", "|---|---|---|---|---|---|---|---|"]
        for arm, m in means.items():
            lines.append(f"| {arm} | {m['seeds']} | {m['best']:.3f} | {m['final']:.3f} | "
                         f"{m['final_minus_best']:+.3f} | {m['last3']:.3f} | {m['final_worst10']:.2f} | "
                         f"{m['min_worst10_last3']:.2f} |")
    write_block(DOC, "default-run-table", lines)


def main() -> None:
    arms_main(__file__, list(ARMS), run_arm, render, RESULTS, ARM_TIMEOUT_S, default_rounds=10)


if __name__ == "__main__":
    main()
