"""Synthetic data from the foundation model against non-IID clients: the same federation with and without
``data.synthetic``.

Workload (identical for both arms): the built-in ``bbc-lora`` config (all-MiniLM-L6-v2 + LoRA r=8 on query/value and
the classifier head, BBC News, 5 topics, 10 clients, 5 a round, 1 local epoch, 10 rounds) with
``partition.alpha=0.1`` (Dirichlet(0.1): most clients hold one or two topics). The ``synthetic`` arm adds
``data.synthetic`` with its defaults: SmolLM2-135M-Instruct writes 40 rows per topic from the public prompt, and each
client gets round(0.5 x its real training rows) of them, shared by the topics that are under 10% of its rows.

Per arm and seed (``federation.seed``; the synthetic pool's seed follows it), one process each (``--arm``):
- final and best held-out accuracy (the server's own 20% split, never touched by synthetic rows);
- the clients' local test accuracy under the global model after the last round: mean and worst 10%
  (``eval.per_client``; each client's test rows are its own real rows);
- the pool's size and generation time, and the synthetic rows the clients got;
- wall seconds.

    PYTHONPATH=src python benchmarks/synthetic.py [--seeds 0,1] [--only none,synthetic]   # appends JSON lines
    PYTHONPATH=src python benchmarks/synthetic.py --render                               # table + rows in docs

One JSON line per arm and seed is printed and appended to benchmarks/results/synthetic.jsonl; ``--render`` writes the
latest line of each (arm, seed) and a sample of the generated rows into docs/ownership.md (between markers).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from pathlib import Path

from _results import arms_main, latest_records, seed_means

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "synthetic.jsonl"
DOC = ROOT / "docs" / "ownership.md"
THREADS = 2
ARM_TIMEOUT_S = 2 * 3600

# 5 clients a round: the workload these results recorded (bbc-lora trains all 10 since docs/default_run.md)
BASE = ["partition.alpha=0.1", "federation.clients_per_round=5", "eval.per_client=true", "eval.every=1",
        f"runtime.threads={THREADS}", "name=synthetic"]
ARMS = {"none": [], "synthetic": ["data.synthetic={}"]}
SAMPLE_PER_CLASS = 2


def run_arm(name: str, seed: int, rounds: int) -> dict:
    import torch

    from fedfm.config import load_config
    from fedfm.simulation import Simulation, prepare

    torch.set_num_threads(THREADS)
    overrides = BASE + [f"federation.seed={seed}", f"federation.rounds={rounds}"] + ARMS[name]
    cfg = load_config("bbc-lora", overrides)
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    prepare_s = time.perf_counter() - t0
    sim = Simulation(prepared)
    rows = [r for r in sim.run() if r["round"] > 0]
    wall = time.perf_counter() - t0
    acc = [r["eval_accuracy"] for r in rows]
    last = rows[-1]
    syn = prepared.synthetic
    rec = {
        "benchmark": "synthetic", "arm": name, "seed": seed, "overrides": overrides, "rounds": len(rows),
        "workload": "bbc-lora: minilm + lora r8 q,v + head, bbc-news, 10 dirichlet(0.1) clients, 5/round",
        "accuracy": acc, "final_accuracy": acc[-1], "best_accuracy": max(acc),
        "client_acc_mean": last.get("client_acc_mean"), "client_acc_worst10": last.get("client_acc_worst10"),
        "client_acc": last.get("client_acc"),
        "real_train_rows": int(sum(len(c.train) for c in prepared.data.clients)
                               - (sum(map(len, syn.assigned.values())) if syn else 0)),
        "wall_s": wall, "prepare_s": prepare_s, "threads": THREADS, "machine": platform.machine(),
        "processor": platform.processor(), "cpus": os.cpu_count(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if syn is not None:
        by_class = syn.pool.by_class
        rec.update({
            "pool_rows": len(syn.pool.rows), "pool_per_class": {k: len(v) for k, v in by_class.items()},
            "generation_s": syn.pool.seconds, "pool_from_cache": syn.pool.from_cache,
            "synthetic_rows": sum(map(len, syn.assigned.values())),
            "per_client": {str(k): v for k, v in syn.per_client.items()}, "capped": len(syn.capped),
            "sample": [syn.pool.rows[k] for v in by_class.values() for k in v[:SAMPLE_PER_CLASS]],
        })
    return rec


def render() -> None:
    latest = latest_records(RESULTS)
    lines = ["| arm | seed | rounds | final acc | best acc | clients' mean acc | clients' worst-10% acc | synthetic "
             "rows (pool) | generation s | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (arm, seed), r in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        syn = f"{r['synthetic_rows']} ({r['pool_rows']})" if "pool_rows" in r else "—"
        gen = (f"{r['generation_s']:.0f}" if not r.get("pool_from_cache") else "cached") if "pool_rows" in r else "—"
        lines.append(f"| {arm} | {seed} | {r['rounds']} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | "
                     f"{r['client_acc_mean']:.4f} | {r['client_acc_worst10']:.4f} | {syn} | {gen} | "
                     f"{r['wall_s']:.0f} |")
    for arm, mean in seed_means(latest, ARMS, ("final_accuracy", "best_accuracy", "client_acc_mean",
                                                "client_acc_worst10")).items():
        lines.append(f"| {arm} | mean of {mean['seeds']} | | {mean['final_accuracy']:.4f} | {mean['best_accuracy']:.4f} "
                     f"| {mean['client_acc_mean']:.4f} | {mean['client_acc_worst10']:.4f} | | | |")
    sample = next((r["sample"] for (a, _), r in sorted(latest.items()) if a == "synthetic"), [])
    if sample:
        lines += ["", f"A sample of the generated rows ({SAMPLE_PER_CLASS} per topic, verbatim, seed "
                      f"{min(s for a, s in latest if a == 'synthetic')}):", "",
                  "| label | text |", "|---|---|"]
        lines += [f"| {r['label']} | {r['text'].replace('|', '/')} |" for r in sample]
    begin, end = "<!-- synthetic-table -->", "<!-- /synthetic-table -->"
    text = DOC.read_text()
    block = "\n" + "\n".join(lines) + "\n"
    head, rest = text.split(begin)
    DOC.write_text(head + begin + block + end + rest.split(end, 1)[1])
    print("\n".join(lines))


def main() -> None:
    arms_main(__file__, list(ARMS), run_arm, render, RESULTS, ARM_TIMEOUT_S, default_rounds=10)

if __name__ == "__main__":
    main()
