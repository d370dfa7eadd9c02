"""Variants of one built-in config, side by side: each is a whole ``fedfm run CONFIG overrides…`` in its own process.

How the defaults of ``smollm2-chat`` were chosen: the variants in ``benchmarks/sweeps/smollm2-chat.txt`` (one per
line, ``name|key=value key=value…``) were run 8 at a time on one H100 (fp32, the same arithmetic as the CPU run up to
float rounding; the default run gave 2.9178 → 2.2436 on both). Each variant evaluates every round, so the JSON line
carries the whole held-out loss curve, not only its end.

    python benchmarks/sweep.py smollm2-chat benchmarks/sweeps/smollm2-chat.txt [--parallel 8] [--threads 2]

prints one JSON line per variant (name, overrides, rc, wall_s, eval {round: held-out loss}, rel_final) and appends
them to benchmarks/results/sweep.jsonl. Wall times of variants that shared the machine are not comparable with a
run alone (``concurrent_runs`` says how many ran at once).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sweep.jsonl"


def read_variants(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "|" not in line:
            raise SystemExit(f"{path}:{n}: expected 'name|key=value …', got {line!r}")
        name, overrides = line.split("|", 1)
        out.append((name.strip(), overrides.split()))
    return out


def summary(config: str, name: str, overrides: list[str], run_dir: Path, rc: int, wall: float, parallel: int,
            device: str, log: Path) -> dict:
    evals = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "eval_loss" in row:
                evals[row["round"]] = round(row["eval_loss"], 4)
    first, last = evals.get(0), evals[max(evals)] if evals else None
    rec = {"benchmark": "sweep", "config": config, "name": name, "overrides": " ".join(overrides), "rc": rc,
           "wall_s": round(wall, 1), "eval": evals,
           "rel_final": round(last / first - 1, 4) if first and last is not None else None,
           "device": device, "concurrent_runs": parallel,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if rc:
        rec["error_tail"] = log.read_text()[-600:]
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("variants", type=Path)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each run (OMP_NUM_THREADS)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    variants = read_variants(args.variants)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="fedfm-sweep-") as tmp:
        work = Path(tmp)
        pending, running = list(variants), []
        while pending or running:
            for job in [j for j in running if j[3].poll() is not None]:
                running.remove(job)
                name, overrides, t0, proc = job
                rec = summary(args.config, name, overrides, work / name, proc.returncode, time.time() - t0,
                              args.parallel, device, work / f"{name}.log")
                print(json.dumps(rec), flush=True)
                if not args.no_save:
                    RESULTS.parent.mkdir(parents=True, exist_ok=True)
                    with open(RESULTS, "a") as f:
                        f.write(json.dumps(rec) + "\n")
            while pending and len(running) < args.parallel:
                name, overrides = pending.pop(0)
                cmd = [sys.executable, "-m", "fedfm", "run", args.config, f"output.dir={work / name}", *overrides]
                with open(work / f"{name}.log", "w") as log:
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((name, overrides, time.time(), proc))
            if running:
                time.sleep(0.5)


if __name__ == "__main__":
    main()
