"""The dashboard's ``/api/state`` on a long run: what one poll costs while a run appends rows.

A synthetic run directory (``--rounds`` rows of ``--per-round`` clients drawn from ``--clients``, each row with its
client_stats and per-client accuracy, as ``fedfm run`` writes them) is read through the app (starlette's TestClient,
so JSON encoding is included). Both sides in one run, after each of ``--appends`` rows appended:

* ``incremental``: the app as served: one ``RunState`` that reads ``metrics.jsonl`` on from where it stopped and adds
  only the new rows to its client table;
* ``from_scratch``: a new app per poll, which parses the whole file and builds the table again.

    python benchmarks/dashboard.py [--rounds 1000] [--per-round 10] [--clients 10000] [--appends 20]

appends one JSON line to benchmarks/results/dashboard.jsonl (median seconds per poll of each side).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dashboard.jsonl"


def row(rnd: int, rng: random.Random, per_round: int, clients: int) -> dict:
    ids = rng.sample(range(clients), per_round)
    return {"round": rnd, "clients": ids, "dropped": [{"id": ids[0], "error": "timeout"}], "bytes_up": 1000 * per_round,
            "bytes_down": 1000 * per_round, "wall_s": 1.0, "eval_accuracy": 0.5, "eval_loss": 1.0,
            "client_acc": {str(i): 0.5 for i in ids}, "client_acc_worst10": 0.4, "train_loss": 1.1,
            "client_stats": [{"id": i, "examples": 100, "bytes_up": 1000, "bytes_down": 1000, "seconds": 1.0,
                              "epsilon": None} for i in ids[1:]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--appends", type=int, default=20)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(1)
    from starlette.testclient import TestClient

    from fedfm.dashboard.app import make_app

    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="fedfm-dashboard-bench-") as tmp:
        run = Path(tmp)
        (run / ".fedfm-run").write_text(json.dumps({"fedfm": "bench", "created": "2026-01-01T00:00:00+00:00"}))
        (run / "config.yaml").write_text(f"name: bench\nfederation:\n  rounds: {args.rounds + args.appends}\n")
        (run / "partition.json").write_text(json.dumps({
            "method": "dirichlet", "label_names": [f"l{j}" for j in range(10)],
            "clients": [{"id": i, "name": str(i), "n_train": 100, "n_test": 10, "label_counts": [10] * 10}
                        for i in range(args.clients)]}))
        with open(run / "metrics.jsonl", "w") as f:
            for r in range(1, args.rounds + 1):
                f.write(json.dumps(row(r, rng, args.per_round, args.clients)) + "\n")
        served = TestClient(make_app(run))
        t = time.perf_counter()
        first = served.get("/api/state")
        first_s = time.perf_counter() - t
        times: dict[str, list[float]] = {"incremental": [], "from_scratch": []}
        for k in range(args.appends):
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row(args.rounds + k + 1, rng, args.per_round, args.clients)) + "\n")
            t = time.perf_counter()
            inc = served.get("/api/state")
            times["incremental"].append(time.perf_counter() - t)
            t = time.perf_counter()
            fresh = TestClient(make_app(run)).get("/api/state")
            times["from_scratch"].append(time.perf_counter() - t)
            a, b = inc.json(), fresh.json()
            a.pop("since_update_s"), b.pop("since_update_s"), a.pop("elapsed_s"), b.pop("elapsed_s")
            assert a == b, "the incremental state differs from the one read from scratch"
        metrics_mb = (run / "metrics.jsonl").stat().st_size / 1e6
    emit({"benchmark": "dashboard_state", "date": _dt.date.today().isoformat(), "rounds": args.rounds,
          "per_round": args.per_round, "clients": args.clients, "metrics_mb": round(metrics_mb, 2),
          "state_kb": len(first.content) // 1000, "first_poll_s": round(first_s, 4),
          "incremental_s": round(statistics.median(times["incremental"]), 4),
          "from_scratch_s": round(statistics.median(times["from_scratch"]), 4), "threads": 1}, RESULTS)


if __name__ == "__main__":
    main()
