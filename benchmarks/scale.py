"""Scale: peak memory and seconds per round for 10 … 10,000 registered clients with per-client state kept.

Workload (one child process per client count, torch threads pinned): the ~6.3M LLaMA-style causal LM built from a
config, LoRA r=8 on q,v (32,768 trainable values = 128 KiB per client), SCAFFOLD (each client keeps its control
variate c_i in the client state store), 4 pre-tokenized rows of 32 tokens per client, 10 clients sampled per round,
3 rounds, 1 local step each, a real run directory (checkpoint every round). Before the rounds every registered
client is given a state (as after a long run), so the store holds N states: ``runtime.cache_clients`` of them in
memory, the rest spilled to versioned safetensors files in the run's ``client_state/``.

Reported per N: RSS after set-up (model + data + tokenized rows: the "base"), the peak RSS while the N states are
written and the rounds run (sampled every 5 ms), seconds per round, checkpoint size, and the target
peak <= base + 1.5 x cache (cache = cache_clients x 128 KiB). The growth over the base also holds the training
working set (activations, optimizer state), which the smallest N shows on its own: growth_beyond_smallest_run_mb
is what the client count adds.

    python benchmarks/scale.py [--clients 10,100,1000,10000] [--cache 200]

appends one JSON line per N to benchmarks/results/scale.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.jsonl"
LLAMA = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "intermediate_size": 1536, "vocab_size": 1024, "max_position_embeddings": 64}
ROWS, SEQ, ROUNDS, PER_ROUND = 4, 32, 3, 10


def child(n: int, cache: int, work: Path) -> dict:
    import numpy as np
    import psutil
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "src"))
    from fedfm.config import validate_config
    from fedfm.simulation import Simulation, prepare
    from fedfm.tracking import RunDir

    proc = psutil.Process()
    rng = np.random.default_rng(0)
    data = work / "tokens.jsonl"
    with open(data, "w") as f:
        for i, row in enumerate(rng.integers(0, LLAMA["vocab_size"], size=(n * ROWS + 16, SEQ))):
            train = i < n * ROWS
            f.write(json.dumps({"input_ids": row.tolist(), "client": int(i // ROWS) if train else 0,
                                "__split__": "train" if train else "test"}) + "\n")
    cfg = validate_config({
        "name": "scale", "model": {"name_or_path": None, "from_config": dict(LLAMA)},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "task": {"name": "lm", "max_length": SEQ},
        "data": {"source": str(data), "text_column": "text", "label_column": None, "client_column": "client"},
        "partition": {"method": "by_column", "local_test_fraction": 0.0},
        "federation": {"rounds": ROUNDS, "clients_per_round": PER_ROUND, "min_clients": 1, "seed": 0},
        "client": {"algorithm": "scaffold", "optimizer": "sgd", "lr": 0.05, "steps": 1, "epochs": None,
                   "batch_size": 4},
        "runtime": {"cache_clients": cache, "threads": 1},
        "eval": {"every": 0}, "output": {"dir": str(work / "run")},
    })
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    assert len(prepared.data.clients) == n, len(prepared.data.clients)
    run_dir = RunDir(cfg.output_dir())
    run_dir.create(overwrite=False)
    server = Simulation(prepared, run_dir)
    setup_s = time.perf_counter() - t0
    base_rss = proc.memory_info().rss
    state_bytes = server.spec.numel * 4

    peak = [base_rss]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t1 = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    for cid in range(n):  # every registered client holds a control variate, as after a long run
        server.store.put(cid, {"scaffold.c_i": 1e-3 * torch.randn(server.spec.numel, generator=g)})
    fill_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    rows = server.run()
    rounds_s = time.perf_counter() - t2
    stop.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    cks = run_dir.list_checkpoints()
    state_files = list((run_dir.path / "client_state").glob("*.safetensors"))
    return {
        "clients": n, "cache_clients": cache, "state_bytes_per_client": state_bytes,
        "cache_mb": round(cache * state_bytes / 2**20, 2), "setup_s": round(setup_s, 2),
        "fill_states_s": round(fill_s, 2), "seconds_per_round": round(rounds_s / ROUNDS, 3),
        "base_rss_mb": round(base_rss / 2**20, 1), "peak_rss_mb": round(peak[0] / 2**20, 1),
        "growth_mb": round((peak[0] - base_rss) / 2**20, 1),
        "in_memory_states": server.store.in_memory, "stored_states": len(server.store),
        "state_files": len(state_files), "checkpoint_kb": round(cks[-1].stat().st_size / 1024, 1),
        "aggregated_rounds": sum(bool(r.get("aggregated")) for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="10,100,1000,10000")
    ap.add_argument("--cache", type=int, default=200)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.cache, args.work)), flush=True)
        return
    import torch

    first_growth = None  # the smallest N's growth: the training working set, with next to no client state
    for n in [int(x) for x in args.clients.split(",")]:
        with tempfile.TemporaryDirectory(prefix="fedfm-scale-") as tmp:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            p = subprocess.run([sys.executable, __file__, "--child", str(n), "--cache", str(args.cache),
                                "--work", tmp], capture_output=True, text=True, env=env)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not lines:
                sys.stderr.write(p.stderr[-3000:])
                raise SystemExit(f"child for {n} clients failed ({p.returncode})")
            rec = {"benchmark": "scale", **json.loads(lines[-1])}
            allowed = 1.5 * rec["cache_mb"]
            if first_growth is None:
                first_growth = (n, rec["growth_mb"])
            rec["growth_beyond_smallest_run_mb"] = round(rec["growth_mb"] - first_growth[1], 1)
            rec["smallest_run_clients"] = first_growth[0]
            rec.update(target="peak_rss <= base_rss + 1.5 x cache", target_growth_mb=round(allowed, 1),
                       target_met=rec["growth_mb"] <= allowed, threads=1, torch=torch.__version__,
                       date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            emit(rec, None if args.no_save else RESULTS)


if __name__ == "__main__":
    main()
