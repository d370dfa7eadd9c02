"""Batched vs sequential client training: the same K clients, the same steps, through one shared base.

For each workload and each K in --k, one server is built the way ``fedfm run`` builds it; the same K client tasks
(the global state, each client's seed) then go through the sequential ``local`` runtime and the ``batched``
runtime, alternating A B A B (--repeats pairs; the fastest of each side is reported, the machine being shared).
The first pair is preceded by one warm-up of each. Each JSON line also carries the largest relative difference
between a client's sequential and batched update, so a speedup can never come from doing different work.

Workloads:
  llama    a LLaMA-style causal LM built from a config (hidden 256, 4 layers, FFN 1536, vocab 1024: ~6.3M params),
           LoRA r=8 on q,v; each client 64 random sequences of 64 tokens; batch 8; AdamW; 4 steps per client.
  minilm   all-MiniLM-L6-v2 + LoRA r=8 on query,value + classification head, BBC News (IID over 16 clients),
           max_length 32, batch 16; 4 steps per client; model.dropout=0 (so both sides can give the same update).
  smollm2  SmolLM2-135M-Instruct + LoRA r=8 on q,k,v,o over chatterbot-qa, packed rows of 128 tokens, batch 8
           (per-client batch 8 x 128); the K largest categories; 4 steps per client. Meant for a GPU.

    python benchmarks/batched.py [--workload llama,minilm] [--k 1,2,4,8,16] [--threads 2] [--repeats 2]

Causal-LM lines also carry ``ceiling_speedup``: K forward/backward passes of the plain model over one client's batch
shape against one pass over K times the rows, the most that any way of batching could give on this device.

prints one JSON line per (workload, K) with workload, k, sequential_s, batched_s, speedup and appends them to
benchmarks/results/batched.jsonl. Targets: K=8 at least 1.5x on this CPU (llama); at least 4x on an H100 (smollm2).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results" / "batched.jsonl"

LLAMA = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "intermediate_size": 1536, "vocab_size": 1024, "max_position_embeddings": 128}
TARGETS = {("llama", "cpu"): 1.5, ("smollm2", "cuda"): 4.0}


def llama_config(work: Path, clients: int, steps: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    path = work / "tokens.jsonl"
    with open(path, "w") as f:
        for i, row in enumerate(rng.integers(0, LLAMA["vocab_size"], size=(clients * 64 + 8, 64))):
            train = i < clients * 64
            f.write(json.dumps({"input_ids": row.tolist(), "client": int(i // 64) if train else 0,
                                "__split__": "train" if train else "test"}) + "\n")
    return {
        "name": "batched-llama", "model": {"name_or_path": None, "from_config": dict(LLAMA)},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "task": {"name": "lm", "max_length": 64},
        "data": {"source": str(path), "text_column": "text", "label_column": None, "client_column": "client"},
        "partition": {"method": "by_column", "local_test_fraction": 0.0},
        "federation": {"rounds": 1, "clients_per_round": 1, "min_clients": 1, "seed": 0},
        "client": {"optimizer": "adamw", "lr": 1e-3, "steps": steps, "epochs": None, "batch_size": 8},
        "eval": {"every": 0}, "output": {"dir": str(work / "run")},
    }


def build(workload: str, kmax: int, steps: int, work: Path, extra: list[str]):
    from fedfm.config import load_config, validate_config
    from fedfm.simulation import Simulation, prepare

    if workload == "llama":
        from fedfm.config import apply_overrides

        cfg = validate_config(apply_overrides(llama_config(work, kmax, steps), extra))
    elif workload == "minilm":
        cfg = load_config("bbc-lora", ["partition.method=iid", "model.dropout=0.0", f"partition.num_clients={max(kmax, 2)}",
                                       "federation.clients_per_round=1", "federation.min_clients=1",
                                       f"client.steps={steps}", "client.epochs=null", "eval.every=0",
                                       f"output.dir={work / 'run'}", *extra])
    elif workload == "smollm2":
        cfg = load_config("smollm2-chat", ["task.packing=true", "task.max_length=128", "client.batch_size=8",
                                           f"client.steps={steps}", "eval.every=0", "eval.initial=false",
                                           "federation.clients_per_round=1", "federation.min_clients=1",
                                           f"output.dir={work / 'run'}", *extra])
    else:
        raise SystemExit(f"--workload: unknown workload {workload!r}; expected llama, minilm or smollm2")
    return Simulation(prepare(cfg))


def tasks_for(server, k: int):
    from fedfm.client import ClientTask

    order = sorted(range(len(server.data.clients)), key=lambda c: (-len(server.data.clients[c].train), c))[:k]
    out = []
    for cid in order:
        payload, extras = server.broadcast(1, cid)
        out.append(ClientTask(client_id=cid, round=1, payload=payload, seed=server.derive_seed(1, cid), extras=extras))
    return out


def timed(runtime, tasks, cuda: bool):
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = runtime.run(tasks)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, results


def ceiling(server, k: int, repeats: int, cuda: bool) -> float | None:
    """The most any batching can give on this device: K forward/backward passes of the plain model over one client's
    batch shape, against one pass over K times the rows (no fedfm code, no adapters per client). Causal LMs only."""
    if server.cfg.task.name not in ("lm", "instruction"):
        return None
    model, dev = server.model, next(server.model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    rows, length = server.cfg.client.batch_size, server.cfg.task.max_length
    gen = torch.Generator().manual_seed(0)
    one = torch.randint(0, vocab, (rows, length), generator=gen).to(dev)
    many = torch.randint(0, vocab, (k * rows, length), generator=gen).to(dev)

    def passes(x, n):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            with server.task.autocast():
                model(input_ids=x, labels=x).loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    passes(one, 1), passes(many, 1)
    seq, bat = [], []
    for _ in range(repeats):
        seq.append(passes(one, k))
        bat.append(passes(many, 1))
    model.zero_grad(set_to_none=True)
    return round(min(seq) / min(bat), 3)


def measure(workload: str, ks: list[int], steps: int, repeats: int, work: Path, extra: list[str]) -> list[dict]:
    from fedfm.runtime.batched import BatchedRuntime
    from fedfm.runtime.local import LocalRuntime

    server = build(workload, max(ks), steps, work, extra)
    cuda = server.model.device.type == "cuda" if hasattr(server.model, "device") else torch.cuda.is_available()
    seq_rt = LocalRuntime(server.cfg, server.client_algo)
    bat_rt = BatchedRuntime(server.cfg, server.client_algo)
    if bat_rt.reason:
        raise SystemExit(f"{workload}: cannot batch: {bat_rt.reason}")
    warm = tasks_for(server, min(2, max(ks)))
    timed(seq_rt, warm, cuda)
    timed(bat_rt, warm, cuda)
    out = []
    for k in ks:
        tasks = tasks_for(server, k)
        if len(tasks) < k:
            print(f"{workload}: only {len(tasks)} clients, skipping k={k}", file=sys.stderr)
            continue
        seq_times, bat_times = [], []
        for _ in range(repeats):
            s, seq_res = timed(seq_rt, tasks, cuda)
            b, bat_res = timed(bat_rt, tasks, cuda)
            seq_times.append(s)
            bat_times.append(b)
        diffs = []
        for a, b in zip(seq_res, bat_res):
            da, db = server.server.check(a)[0], server.server.check(b)[0]
            diffs.append(float((da - db).norm() / da.norm()))
        tokens = sum(int(r.metrics["steps"]) for r in seq_res)
        device = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
        rec = {
            "benchmark": "batched", "workload": workload + "".join(f" {o}" for o in extra), "k": k, "steps_per_client": steps,
            "sequential_s": round(min(seq_times), 4), "batched_s": round(min(bat_times), 4),
            "speedup": round(min(seq_times) / min(bat_times), 3),
            "sequential_runs_s": [round(t, 4) for t in seq_times], "batched_runs_s": [round(t, 4) for t in bat_times],
            "client_steps": tokens, "max_rel_update_diff": max(diffs),
            "trainable_per_client": server.spec.numel,
            "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        rec["ceiling_speedup"] = ceiling(server, k, repeats, cuda)
        target = TARGETS.get((workload, "cuda" if cuda else "cpu"))
        if target is not None and k == 8:
            rec.update(target_speedup=target, target_met=rec["speedup"] >= target)
        out.append(rec)
        emit(rec, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="llama,minilm")
    ap.add_argument("--k", default="1,2,4,8,16")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for both sides (e.g. model.autocast=bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ks = [int(k) for k in args.k.split(",")]
    for w in args.workload.split(","):
        with tempfile.TemporaryDirectory(prefix="fedfm-batched-") as tmp:
            for rec in measure(w, ks, args.steps, args.repeats, Path(tmp), args.overrides):
                if not args.no_save:
                    RESULTS.parent.mkdir(parents=True, exist_ok=True)
                    with open(RESULTS, "a") as f:
                        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
