"""What ``tracking.sinks`` costs a run: seconds to open each sink, and per round (a bbc-lora-sized row: 10 sampled
clients, every client's accuracy, client_stats), against no sink, all in one process on the same rows.

Each arm opens its sinks on a fresh run directory, then for R rounds writes the round's row to metrics.jsonl and its
checkpoint file (as the server does) and calls ``round_start``/``round_end`` as the loop does; ``finish`` logs a
2 MB adapter and the report as artifacts. MLflow uses its default local store (sqlite) in a fresh directory, whose
one-time table creation is reported apart (``mlflow_create_store_s``).

    python benchmarks/tracking_sinks.py [--rounds 30]

appends one JSON line to benchmarks/results/tracking_sinks.jsonl.
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
RESULTS = ROOT / "benchmarks" / "results" / "tracking_sinks.jsonl"


def row(rnd: int) -> dict:
    """A round's row as bbc-lora logs it (10 of 10 clients sampled)."""
    ids = list(range(10))
    return {"round": rnd, "clients": ids, "dropped": [], "bytes_up": 1_234_560, "bytes_down": 1_234_560,
            "wall_s": 12.5 + rnd / 100, "sim_time_s": 12.5 * rnd, "train_loss": 1.0 / rnd, "eval_accuracy": 0.9,
            "eval_loss": 0.3, "client_acc": {str(i): 0.8 + i / 100 for i in ids}, "client_acc_worst10": 0.8,
            "client_stats": [{"id": i, "examples": 150, "bytes_up": 123_456, "bytes_down": 123_456,
                              "seconds": 1.2, "epsilon": None} for i in ids]}


def arm(sinks_named: list[str], rounds: int, base: Path) -> dict:
    from fedfm.config import load_config
    from fedfm.tracking import RunDir
    from fedfm.tracking.sinks import open_sinks

    run_dir = RunDir(base / "run")
    cfg = load_config("bbc-lora", [f"output.dir={run_dir.path}", f"tracking.sinks={sinks_named}".replace("'", ""),
                                   "tracking.mlflow_experiment=bench"])
    t0 = time.perf_counter()
    sinks = open_sinks(cfg, run_dir, resume=False)
    open_s = time.perf_counter() - t0
    run_dir.create(overwrite=False)
    per_round = []
    for rnd in range(1, rounds + 1):
        r = row(rnd)
        run_dir.append_metrics(r)  # what the server does before the display hears of the round
        t = time.perf_counter()
        sinks.round_start(rnd, rounds, 10)
        sinks.round_end(r)
        per_round.append(time.perf_counter() - t)
        run_dir.save_checkpoint(rnd, {"round": rnd}, keep=2)
    (run_dir.path / "adapter").mkdir()
    (run_dir.path / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(2_000_000))
    (run_dir.report / "summary.md").write_text("# summary\n")
    t = time.perf_counter()
    sinks.finish(run_dir)
    sinks.close()
    finish_s = time.perf_counter() - t
    per_round.sort()
    return {"sinks": sinks_named, "open_s": round(open_s, 4),
            "round_median_ms": round(1000 * per_round[len(per_round) // 2], 3),
            "round_max_ms": round(1000 * per_round[-1], 3), "finish_s": round(finish_s, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # MLflow's default store: ./mlflow.db, artifacts ./mlruns
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        from mlflow.tracking import MlflowClient

        t = time.perf_counter()
        MlflowClient(tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}").search_experiments()  # creates the tables
        create_s = time.perf_counter() - t
        arms = {}
        for i, named in enumerate(([], ["tensorboard"], ["mlflow"], ["tensorboard", "mlflow"])):
            arms["+".join(named) or "none"] = arm(named, args.rounds, Path(tmp) / f"arm{i}")
    emit({"benchmark": "tracking_sinks", "rounds": args.rounds, "row": "bbc-lora-sized: 10 clients, client_acc, "
          "client_stats", "mlflow_create_store_s": round(create_s, 3), "arms": arms,
          "python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": 1,
          "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, RESULTS)


if __name__ == "__main__":
    main()
