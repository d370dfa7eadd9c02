"""Start-up: seconds from the command to the first client step, against the time to load the model alone.

For each config, three kinds of child process, each timed from the parent's ``Popen`` to the moment the child
reports (the clocks are the same machine's ``time.time``), so interpreter start-up and imports are included:

* ``fedfm run CONFIG`` (in-process through the CLI entry point) until its first client loss is computed, with the
  tokenized-data cache empty (the data is tokenized);
* the same again, the cache now holding the tokenized rows (the usual re-run);
* a plain script that imports transformers and loads the same base model with ``from_pretrained``, nothing else.

Each kind runs --repeats times, alternating; the minimum is reported.

    python benchmarks/startup.py [--configs bbc-lora,smollm2-chat] [--repeats 2]

appends one JSON line per config to benchmarks/results/startup.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "startup.jsonl"


def child_run(config: str, out: str) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import fedfm.tasks as tasks
    from fedfm.cli import app

    def first_step(self, *a, **k):  # the first client loss: report the time and stop
        print(json.dumps({"event": "first_step", "t": time.time()}), flush=True)
        os._exit(0)

    tasks.Task.loss = first_step
    for cls in (tasks.TASKS.get(n) for n in tasks.TASKS.names()):
        cls.loss = first_step
    app(["run", config, f"output.dir={out}", "federation.rounds=1", "eval.initial=false"], standalone_mode=False)


def child_load(config: str) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import transformers

    from fedfm.config import load_config
    from fedfm.models.loader import model_path
    from fedfm.tasks import TASKS

    cfg = load_config(config)
    path = model_path(cfg.model)  # resolves the alias (a converted GGUF is already in the cache)
    transformers.logging.set_verbosity_error()
    cls = getattr(transformers, TASKS.get(cfg.task.name).auto_class)
    cls.from_pretrained(path)
    print(json.dumps({"event": "loaded", "t": time.time()}), flush=True)


def timed(args: list[str], env: dict) -> float:
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('{"event"')]
    if not lines:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-3000:])
        raise SystemExit(f"child {args} failed ({p.returncode})")
    return json.loads(lines[-1])["t"] - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="bbc-lora,smollm2-chat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--child", choices=["run", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "run":
        child_run(args.config, args.out)
        return
    if args.child == "load":
        child_load(args.config)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from fedfm.models.loader import cache_root

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    tokenized = cache_root() / "tokenized"
    for config in args.configs.split(","):
        cold, warm, load = [], [], []
        with tempfile.TemporaryDirectory(prefix="fedfm-startup-") as tmp:
            timed(["--child", "load", "--config", config], env)  # converts a GGUF once, warms the page cache
            for i in range(args.repeats):
                shutil.rmtree(tokenized, ignore_errors=True)
                cold.append(timed(["--child", "run", "--config", config, "--out", f"{tmp}/c{i}"], env))
                warm.append(timed(["--child", "run", "--config", config, "--out", f"{tmp}/w{i}"], env))
                load.append(timed(["--child", "load", "--config", config], env))
        rec = {"benchmark": "startup", "config": config,
               "to_first_step_tokenizing_s": round(min(cold), 3), "to_first_step_cached_s": round(min(warm), 3),
               "model_load_alone_s": round(min(load), 3),
               "overhead_cached_s": round(min(warm) - min(load), 3),
               "ratio_cached": round(min(warm) / min(load), 3),
               "runs": {"tokenizing": [round(x, 3) for x in cold], "cached": [round(x, 3) for x in warm],
                        "load": [round(x, 3) for x in load]},
               "threads": args.threads, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        emit(rec, None if args.no_save else RESULTS)


if __name__ == "__main__":
    main()
