"""Forgetting in a lifelong federation, with and without each mitigation (docs/continual.md).

Workload (identical for every arm): the built-in ``bbc-continual`` config (all-MiniLM-L6-v2 + LoRA r=8 on
query/value and the classifier head; BBC News with its five topics arriving in three stages, business+tech, then
politics+sports, then entertainment; 10 IID clients, 5 a round, 1 local epoch, 3 rounds a stage), the same seed and
the same rounds. Arms: ``none`` (no mitigation), ``replay`` (each client's reservoir buffer of 32 of its own rows),
``ewc`` (λ = ``continual.ewc.lam``, Fisher on 32 own examples per stage), ``olora`` (a new LoRA per stage,
λ1 = 0.5); and ``ewc-1e3``, ``ewc-1e4`` (EWC with λ = 1000, 10000), ``replay+olora`` (both).

Per arm and seed, one process each (``--arm``): the accuracy matrix R (after each stage, on the server's held-out
articles of every stage), and after the last stage the average accuracy, forgetting (Chaudhry et al. 2018), backward
and forward transfer (Lopez-Paz & Ranzato 2017), and wall seconds.

    PYTHONPATH=src python benchmarks/continual.py [--seeds 0] [--only none,replay] [--rounds 3]   # appends JSON lines
    PYTHONPATH=src python benchmarks/continual.py --render                                      # table in the docs

One JSON line per arm and seed is printed and appended to benchmarks/results/continual.jsonl; ``--render`` writes the
latest line of each (arm, seed) into docs/continual.md (between markers).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from pathlib import Path

from _results import arms_main, latest_records, seed_means, write_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "continual.jsonl"
DOC = ROOT / "docs" / "continual.md"
THREADS = 1
ARM_TIMEOUT_S = 3600
ARMS = {"none": [], "replay": ["continual.mitigations=[replay]"], "ewc": ["continual.mitigations=[ewc]"],
        "olora": ["continual.mitigations=[olora]"],
        # EWC's λ: the config's 100, and two stronger anchors (class-incremental EWC is known to be weak: van de Ven
        # et al. 2019), to tell a weak method from a mistuned one
        "ewc-1e3": ["continual.mitigations=[ewc]", "continual.ewc.lam=1000"],
        "ewc-1e4": ["continual.mitigations=[ewc]", "continual.ewc.lam=10000"],
        "replay+olora": ["continual.mitigations=[replay,olora]"]}


def run_arm(name: str, seed: int, rounds: int) -> dict:
    import torch

    from fedfm.config import load_config
    from fedfm.continual import ContinualSimulation, prepare_continual

    torch.set_num_threads(THREADS)
    overrides = [f"federation.seed={seed}", f"runtime.threads={THREADS}"] + ARMS[name]
    cfg = load_config("bbc-continual", overrides)
    cfg.continual.stages = [s.model_copy(update={"rounds": rounds}) for s in cfg.continual.stages]
    cfg.federation.rounds = 3 * rounds
    t0 = time.perf_counter()
    sim = ContinualSimulation(prepare_continual(cfg))
    sim.run()
    wall = time.perf_counter() - t0
    last = sim.stage_rows[-1]
    return {
        "benchmark": "continual", "arm": name, "seed": seed, "overrides": overrides,
        "workload": "bbc-continual: minilm + lora r8 q,v + head, bbc-news in 3 class stages, 10 iid clients, 5/round",
        "stages": sim.plan.names, "rounds_per_stage": rounds, "R": sim.R, "baseline": sim.baseline,
        "average": last["average"], "forgetting": last["forgetting"], "bwt": last["bwt"], "fwt": last["fwt"],
        "per_stage": [{k: r[k] for k in ("stage", "average", "forgetting", "bwt", "fwt")} for r in sim.stage_rows],
        "ewc_lam": cfg.continual.ewc.lam, "replay_size": cfg.continual.replay.size, "olora_lam": cfg.continual.olora.lam,
        "wall_s": wall, "threads": THREADS, "machine": platform.machine(), "cpus": os.cpu_count(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def render() -> None:
    latest = latest_records(RESULTS, ARMS)  # (the chatterbot-continual run's line is quoted in the docs by hand)
    lines = ["| arm | seed | rounds/stage | R after the last stage (" + " / ".join(
        next(iter(latest.values()))["stages"]) + ") | average acc A_T | forgetting F_T | BWT | FWT | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = list(ARMS)
    for (arm, seed), r in sorted(latest.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        lines.append(f"| {arm} | {seed} | {r['rounds_per_stage']} | {' / '.join(f'{v:.3f}' for v in r['R'][-1])} | "
                     f"{r['average']:.3f} | {r['forgetting']:.3f} | {r['bwt']:.3f} | {r['fwt']:.3f} | "
                     f"{r['wall_s']:.0f} |")
    for arm, mean in seed_means(latest, order, ("average", "forgetting", "bwt")).items():
        lines.append(f"| {arm} | mean of {mean['seeds']} | | | {mean['average']:.3f} | {mean['forgetting']:.3f} | "
                     f"{mean['bwt']:.3f} | | |")
    write_block(DOC, "continual-table", lines)


def main() -> None:
    arms_main(__file__, list(ARMS), run_arm, render, RESULTS, ARM_TIMEOUT_S, default_rounds=3)

if __name__ == "__main__":
    main()
