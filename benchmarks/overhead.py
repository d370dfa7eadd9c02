"""Framework overhead: fedfm vs a plain PyTorch + peft loop doing the same federated LoRA work.

Workload (identical on both sides):
  * a LLaMA-style causal LM built from a config (hidden 256, 4 layers, 4 heads, FFN 1536, vocab 1024, ~6.3M params),
    seeded with the same seed, LoRA r=8 alpha=16 on q_proj/v_proj (peft);
  * 10 clients x 64 pre-tokenized sequences x 64 tokens (random ids, fixed numpy seed, generated once in the parent);
  * 5 rounds, 5 clients per round (the same clients: fedfm's seeded sampling), 1 local epoch at batch 8,
    AdamW lr 1e-3 (weight decay 0, a fresh optimizer per client), grad clip 1.0, causal-LM loss;
  * FedAvg of the deltas weighted by the example counts; no evaluation on either side.

The fedfm side goes through the public API as a real run does (config validation, ``prepare``, a ``RunDir`` with
config.yaml / partition.json / metrics.jsonl / per-round checkpoints / final adapter, ``Simulation.run``), so everything
the framework adds around the training is in its number. The plain side is one model whose LoRA tensors are swapped
per client, with no framework, no checkpoint and no file output.

Each side runs in its own subprocess with ``torch.set_num_threads(1)``, alternating A B A B. A child measures its
wall time with ``time.perf_counter`` from the top of the file (so the imports of torch/transformers/peft/fedfm are
included) and its peak RSS with ``getrusage(RUSAGE_SELF).ru_maxrss``, and prints one JSON line.

    PYTHONPATH=src python benchmarks/overhead.py [--repeats 2]

prints one JSON line and appends it to benchmarks/results/overhead.jsonl.
Target: fedfm / plain <= 1.05 in wall time and <= 1.10 in peak RSS.
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()  # the child's clock starts before any heavy import

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from _results import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "overhead.jsonl"

SEED = 0
NUM_CLIENTS = 10
ROWS_PER_CLIENT = 64
SEQ_LEN = 64
HELD_OUT_ROWS = 8  # a held-out split the source declares (unused: no evaluation); keeps every client at 64 rows
CLIENTS_PER_ROUND = 5
ROUNDS = 5
BATCH_SIZE = 8
LR = 1e-3
WEIGHT_DECAY = 0.0  # fedfm's client.weight_decay default
GRAD_CLIP = 1.0  # fedfm's client.grad_clip default
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16, ["q_proj", "v_proj"]
MODEL_CONFIG = {
    "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "intermediate_size": 1536, "vocab_size": 1024, "max_position_embeddings": 128,
}
WORKLOAD = "llama-6.3M lora r8 q,v; 10 clients x 64 x 64 tok; 5/round; 5 rounds"
TARGET_WALL, TARGET_RSS = 1.05, 1.10


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _finish(side: str, t_import: float, t_setup: float, t_train: float, extra: dict) -> None:
    out = {"side": side, "wall_s": time.perf_counter() - _T0, "cpu_s": _cpu_s(), "rss_mb": _peak_rss_mb(),
           "import_s": t_import - _T0, "setup_s": t_setup - t_import, "train_s": t_train - t_setup, **extra}
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- data (parent)

def make_data(directory: Path) -> Path:
    """640 training rows (64 per client, client-major) + a few rows the source marks as its test split."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    n_train = NUM_CLIENTS * ROWS_PER_CLIENT
    ids = rng.integers(0, MODEL_CONFIG["vocab_size"], size=(n_train + HELD_OUT_ROWS, SEQ_LEN))
    path = directory / "tokens.jsonl"
    with open(path, "w") as f:
        for i, row in enumerate(ids):
            train = i < n_train
            f.write(json.dumps({"input_ids": row.tolist(), "client": int(i // ROWS_PER_CLIENT) if train else 0,
                                "__split__": "train" if train else "test"}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- fedfm child

def fedfm_config(data: Path, out_dir: Path, runtime: str = "local") -> dict:
    return {
        "name": "overhead",
        "model": {"name_or_path": None, "from_config": dict(MODEL_CONFIG)},
        "adapter": {"method": "lora", "r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": LORA_TARGETS},
        "task": {"name": "lm", "max_length": SEQ_LEN},
        # no `text` column in the file, so the pre-tokenized `input_ids` column is used; the `__split__` column
        # marks the held-out rows, so data.test_fraction does not take rows away from the clients
        "data": {"source": str(data), "text_column": "text", "label_column": None, "client_column": "client"},
        "partition": {"method": "by_column", "local_test_fraction": 0.0},
        "federation": {"rounds": ROUNDS, "clients_per_round": CLIENTS_PER_ROUND, "min_clients": 1, "seed": SEED},
        "client": {"algorithm": "local", "optimizer": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY, "epochs": 1,
                   "batch_size": BATCH_SIZE, "grad_clip": GRAD_CLIP, "grad_accum": 1},
        "server": {"aggregator": "fedavg", "optimizer": "fedavg", "lr": 1.0},
        "codec": {"name": "fp32"},
        "runtime": {"name": runtime, "threads": 1},
        "eval": {"every": 0, "initial": False},
        "output": {"dir": str(out_dir)},
    }


def child_fedfm(data: Path, out_dir: Path, runtime: str = "local") -> None:
    import torch

    torch.set_num_threads(1)
    from fedfm.config import validate_config
    from fedfm.simulation import Simulation, prepare
    from fedfm.tracking import RunDir

    t_import = time.perf_counter()
    cfg = validate_config(fedfm_config(data, out_dir, runtime))
    prepared = prepare(cfg)
    sizes = [len(c.train) for c in prepared.data.clients]
    assert sizes == [ROWS_PER_CLIENT] * NUM_CLIENTS, sizes
    run_dir = RunDir(cfg.output_dir())  # as `fedfm run` does it
    run_dir.create(overwrite=False)
    run_dir.write_config(cfg.to_yaml())
    run_dir.write_json("partition.json", prepared.data.describe())
    server = Simulation(prepared, run_dir)
    t_setup = time.perf_counter()
    rows = server.run()
    t_train = time.perf_counter()
    _finish("fedfm" if runtime == "local" else f"fedfm-{runtime}", t_import, t_setup, t_train, {
        "params": sum(p.numel() for p in server.model.parameters()), "trainable": server.spec.numel,
        "train_loss": [r["train_loss"] for r in rows], "clients": [r["clients"] for r in rows],
        "global_norm": float(server.global_flat.norm()),
    })


# ---------------------------------------------------------------------------------------------- plain child

def _derive_seed(*parts: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def child_plain(data: Path) -> None:
    import torch

    torch.set_num_threads(1)
    import numpy as np
    import transformers
    from peft import LoraConfig, get_peft_model

    t_import = time.perf_counter()
    transformers.logging.set_verbosity_error()
    per_client: dict[int, list[list[int]]] = {c: [] for c in range(NUM_CLIENTS)}
    with open(data) as f:
        for line in f:
            row = json.loads(line)
            if row["__split__"] == "train":
                per_client[row["client"]].append(row["input_ids"][:SEQ_LEN])
    tokens = {c: torch.tensor(rows, dtype=torch.long) for c, rows in per_client.items()}

    conf = dict(MODEL_CONFIG)
    torch.manual_seed(SEED)
    base = transformers.LlamaForCausalLM(transformers.AutoConfig.for_model(conf.pop("model_type"), **conf))
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    global_state = [p.detach().clone() for p in params]
    t_setup = time.perf_counter()

    losses, sampled = [], []
    for rnd in range(1, ROUNDS + 1):
        rng = np.random.default_rng([SEED, 3, rnd])  # the same clients fedfm samples
        clients = np.sort(rng.choice(NUM_CLIENTS, size=CLIENTS_PER_ROUND, replace=False))
        deltas, weights, client_losses = [], [], []
        for c in clients:
            with torch.no_grad():
                for p, g in zip(params, global_state):
                    p.copy_(g)
            seed = _derive_seed(SEED, 4, rnd, c)
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
            x_all = tokens[int(c)]
            order = torch.randperm(len(x_all), generator=gen)
            total, n = 0.0, 0
            for i in range(0, len(order), BATCH_SIZE):
                x = x_all[order[i:i + BATCH_SIZE]]
                loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                opt.step()
                opt.zero_grad(set_to_none=True)
                total += float(loss.detach())
                n += 1
            deltas.append([p.detach() - g for p, g in zip(params, global_state)])
            weights.append(float(len(x_all)))
            client_losses.append(total / n)
        w = torch.tensor(weights)
        w = w / w.sum()
        global_state = [g + sum(wk * d[i] for wk, d in zip(w, deltas)) for i, g in enumerate(global_state)]
        losses.append(float(sum(wk * l for wk, l in zip(w.tolist(), client_losses))))
        sampled.append([int(c) for c in clients])
    with torch.no_grad():
        for p, g in zip(params, global_state):
            p.copy_(g)
    t_train = time.perf_counter()
    _finish("plain", t_import, t_setup, t_train, {
        "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params),
        "train_loss": losses, "clients": sampled,
        "global_norm": float(torch.cat([g.reshape(-1) for g in global_state]).norm()),
    })


# ---------------------------------------------------------------------------------------------- parent

def run_child(side: str, data: Path, work: Path, k: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--data", str(data),
           "--out", str(work / f"run-{side}-{k}")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    outer = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{side} child failed with exit code {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    res = json.loads(line)
    res["process_s"] = outer  # as seen from the parent: interpreter start-up included
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="A B pairs to run (alternating A B A B)")
    ap.add_argument("--child", choices=["fedfm", "fedfm-batched", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--batched", action="store_true", help="also run fedfm with runtime: batched (a third side)")
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/overhead.jsonl")
    args = ap.parse_args(argv)
    if args.child in ("fedfm", "fedfm-batched"):
        child_fedfm(args.data, args.out, "batched" if args.child == "fedfm-batched" else "local")
        return {}
    if args.child == "plain":
        child_plain(args.data)
        return {}

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedfm-overhead-") as tmp:
        work = Path(tmp)
        data = make_data(work)
        for k in range(args.repeats):
            for side in ("fedfm", "plain") + (("fedfm-batched",) if args.batched else ()):
                res = run_child(side, data, work, k)
                print(f"[{side} #{k}] wall {res['wall_s']:.2f}s cpu {res['cpu_s']:.2f}s (import {res['import_s']:.2f}, setup "
                      f"{res['setup_s']:.2f}, train {res['train_s']:.2f}) rss {res['rss_mb']:.1f} MB", file=sys.stderr)
                runs.append(res)

    def side(name: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["side"] == name]

    f_runs, p_runs = [r for r in runs if r["side"] == "fedfm"], [r for r in runs if r["side"] == "plain"]
    # the same work: same clients, and the same losses up to float summation order
    same_clients = f_runs[0]["clients"] == p_runs[0]["clients"]
    loss_diff = max(abs(a - b) for a, b in zip(f_runs[0]["train_loss"], p_runs[0]["train_loss"]))
    fw, pw = statistics.median(side("fedfm", "wall_s")), statistics.median(side("plain", "wall_s"))
    fr, pr = statistics.median(side("fedfm", "rss_mb")), statistics.median(side("plain", "rss_mb"))
    import torch

    result = {
        "benchmark": "overhead",
        "workload": WORKLOAD,
        "fedfm_wall_s": round(fw, 3), "plain_wall_s": round(pw, 3), "wall_ratio": round(fw / pw, 4),
        "fedfm_rss_mb": round(fr, 1), "plain_rss_mb": round(pr, 1), "rss_ratio": round(fr / pr, 4),
        "target_wall_ratio": TARGET_WALL, "target_rss_ratio": TARGET_RSS,
        "wall_ok": fw / pw <= TARGET_WALL, "rss_ok": fr / pr <= TARGET_RSS,
        "stat": "median over repeats",
        "fedfm_wall_min_s": round(min(side("fedfm", "wall_s")), 3),
        "plain_wall_min_s": round(min(side("plain", "wall_s")), 3),
        "wall_ratio_min": round(min(side("fedfm", "wall_s")) / min(side("plain", "wall_s")), 4),
        # CPU time (user + sys) is much less sensitive than wall time to other load on a shared machine
        "fedfm_cpu_s": round(statistics.median(side("fedfm", "cpu_s")), 3),
        "plain_cpu_s": round(statistics.median(side("plain", "cpu_s")), 3),
        "cpu_ratio": round(statistics.median(side("fedfm", "cpu_s")) / statistics.median(side("plain", "cpu_s")), 4),
        "fedfm_train_s": round(statistics.median(side("fedfm", "train_s")), 3),
        "plain_train_s": round(statistics.median(side("plain", "train_s")), 3),
        "params": f_runs[0]["params"], "trainable": f_runs[0]["trainable"],
        **({} if not args.batched else {
            "batched_wall_s": round(statistics.median(side("fedfm-batched", "wall_s")), 3),
            "batched_train_s": round(statistics.median(side("fedfm-batched", "train_s")), 3),
            "batched_rss_mb": round(statistics.median(side("fedfm-batched", "rss_mb")), 1),
            "batched_vs_plain_wall": round(statistics.median(side("fedfm-batched", "wall_s")) / pw, 4),
            "batched_vs_plain_rss": round(statistics.median(side("fedfm-batched", "rss_mb")) / pr, 4),
            "batched_max_round_loss_diff": max(abs(a - b) for a, b in zip(
                [r for r in runs if r["side"] == "fedfm-batched"][0]["train_loss"], f_runs[0]["train_loss"])),
        }),
        "same_clients": same_clients, "max_round_loss_diff": loss_diff,
        "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                  if k not in ("clients", "train_loss")} for r in runs],
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "threads": 1, "repeats": args.repeats,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    emit(result, None if args.no_save else RESULTS)
    return result


if __name__ == "__main__":
    main()
