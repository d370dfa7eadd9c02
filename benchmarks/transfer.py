"""Knowledge transfer between different models (client.algorithm fedmd) against training alone and FedAvg among the
clients of the same architecture, on the same clients, data and local steps.

Workload (identical for every arm): BBC News (5 classes, ``task.max_length`` 32), ``transfer.public_fraction`` of the
examples carved as the unlabelled public set before partitioning, the rest held out (20 %) and split into
``--clients`` Dirichlet(0.5) clients, every client every round; half the clients run all-MiniLM-L6-v2 + LoRA r=8
(query, value) and its head, the other half SmolLM2-135M-Instruct as a sequence classifier + LoRA r=8 (q_proj,
v_proj) and its head (``--smollm2`` sets how many); the server's foundation model is SmolLM2-135M-Instruct + LoRA
(its base shared with the SmolLM2 clients' in the process, its state its own). ``--rounds`` rounds of
``client.steps`` local AdamW steps.

Arms (one process, one after the other, each building its own ``hetero.HeteroSimulation``):
- ``alone``: each client trains on its own data only, for the same local steps;
- ``fedavg``: FedAvg among the clients of the same architecture (each group's model, its clients' trained states
  averaged by example count every round; bytes: the fp32 trainable state down and up);
- ``transfer``: fedmd (clients distil toward the foundation model's logits, train, send logits of the public set; the
  server distils their consensus into its foundation model).

Measured: each client's accuracy on its own test split and on the server's held-out sample after the last round, in
every arm; the foundation model's held-out accuracy before and after; bytes per round up and down; wall seconds.

    PYTHONPATH=src python benchmarks/transfer.py [--rounds 3] [--clients 6] [--smollm2 3]   # appends JSON lines
    PYTHONPATH=src python benchmarks/transfer.py --combine     # arms run apart (--arms): one summary line
    PYTHONPATH=src python benchmarks/transfer.py --render      # the latest summary as the table in docs/ownership.md

One JSON line per arm and one summary line are printed and appended to benchmarks/results/transfer.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import torch

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "transfer.jsonl"
THREADS = 2
MINILM = {"model": {"name_or_path": "minilm"}, "adapter": {"method": "lora", "r": 8, "alpha": 16,
                                                         "target_modules": ["query", "value"]}}
SMOLLM2 = {"model": {"name_or_path": "smollm2-135m-instruct"},
           "adapter": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}


def config(args):
    from fedfm.config import load_config

    minilm = args.clients - args.smollm2
    ov = {
        "name": "transfer", "client.algorithm": "fedmd", "task.max_length": 32,
        "partition.num_clients": args.clients, "partition.alpha": 0.5,
        "federation.rounds": args.rounds, "federation.clients_per_round": args.clients, "federation.min_clients": 1,
        "client.steps": args.steps, "client.epochs": None, "client.lr": 5e-3, "client.batch_size": 16,
        "eval.every": args.rounds, "eval.max_examples": args.eval_examples, "eval.batch_size": 64,
        "transfer.public_fraction": args.public_fraction,
        "transfer.groups": [{**MINILM, "clients": minilm}, {**SMOLLM2, "clients": args.smollm2}],
        "transfer.server_model": SMOLLM2["model"], "transfer.server_adapter": SMOLLM2["adapter"],
        "transfer.client_distill_steps": args.client_distill_steps,
        "transfer.server_distill_steps": args.server_distill_steps, "transfer.server_lr": 5e-3,
        "transfer.temperature": args.temperature, "runtime.threads": THREADS, "data.tokenized_cache": False,
    }
    return load_config("bbc-lora", [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) or v is None else v}"
                                    for k, v in ov.items()])


def arm(prepared, mode: str) -> dict:
    from fedfm.hetero import HeteroSimulation

    t0 = time.perf_counter()
    sim = HeteroSimulation(prepared, mode=mode)
    build_s = time.perf_counter() - t0
    rows = sim.run(initial=mode == "transfer")  # the initial models are the same in every arm: scored once
    trained = [r for r in rows if r["round"] > 0]
    arch = {str(c): ("minilm" if g.cfg.model.name_or_path == "minilm" else "smollm2")
            for g in sim.groups for c in g.clients}
    out = {
        "arm": mode, "rounds": len(trained), "seconds": time.perf_counter() - t0, "build_seconds": build_s,
        "bases_loaded": sim.bases_loaded,
        "client_acc": rows[-1]["client_acc"], "client_acc_global": rows[-1]["client_acc_global"],
        "client_acc_before": rows[0]["client_acc"] if rows[0]["round"] == 0 else None, "architecture": arch,
        "n_train": {str(c.id): int(len(c.train)) for c in sim.data.clients},
        "n_test": {str(c.id): int(len(c.test)) for c in sim.data.clients},
        "bytes_up_per_round": sum(r["bytes_up"] for r in trained) / len(trained),
        "bytes_down_per_round": sum(r["bytes_down"] for r in trained) / len(trained),
        "trainable": {name: next(g.ctx.spec.numel for g in sim.groups if arch[str(g.clients[0])] == name)
                      for name in set(arch.values())},
        "public_rows": int(len(sim.data.public)), "classes": sim.num_classes,
        "held_out_rows": int(len(sim.eval_rows)),
    }
    if mode == "transfer":
        out.update(fm_accuracy_before=rows[0]["fm_accuracy"], fm_accuracy_after=rows[-1]["fm_accuracy"],
                   server_kl=[[r["server_kl_before"], r["server_kl_after"]] for r in trained],
                   distill_loss=[r.get("distill_loss") for r in trained],
                   bytes_down_round2_on=sum(r["bytes_down"] for r in trained[1:]) / max(len(trained) - 1, 1))
    return out


DOC = ROOT / "docs" / "ownership.md"


def summarize(common: dict, arms: dict) -> dict:
    """One line: per client its accuracies in the three arms, the foundation model's, the bytes, the seconds."""
    t = arms["transfer"]
    summary = {**common, "arm": "summary", "clients": {}}
    for cid, name in t["architecture"].items():
        summary["clients"][cid] = {"architecture": name, "n_train": t["n_train"][cid],
                                   **{f"{m}_own": arms[m]["client_acc"].get(cid) for m in arms},
                                   **{f"{m}_global": arms[m]["client_acc_global"].get(cid) for m in arms}}
    summary.update(fm_accuracy_before=t["fm_accuracy_before"], fm_accuracy_after=t["fm_accuracy_after"],
                   transfer_bytes_per_round={"up": t["bytes_up_per_round"], "down": t["bytes_down_round2_on"]},
                   fedavg_bytes_per_round={"up": arms["fedavg"]["bytes_up_per_round"],
                                           "down": arms["fedavg"]["bytes_down_per_round"]},
                   seconds={m: arms[m]["seconds"] for m in arms},
                   load_average_end=max(arms[m]["load_average_end"] for m in arms))
    return summary


def combine() -> dict:
    """The summary of the latest line of each arm run with the same arguments (arms run in separate processes)."""
    lines = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()]
    last = {}
    for x in lines:
        if x["arm"] != "summary":
            last[x["arm"]] = x
    args = last["transfer"]["args"]
    keep = {k: v for k, v in args.items() if k not in ("arms", "no_save")}
    arms = {m: x for m, x in last.items() if {k: x["args"].get(k) for k in keep} == keep}
    common = {k: last["transfer"][k] for k in ("benchmark", "date", "machine", "cpus", "threads", "torch",
                                               "load_average_start", "args")}
    common["load_average_start"] = max(x["load_average_start"] for x in arms.values())
    return summarize(common, arms)


def render() -> str:
    """The latest summary line of the results file as the markdown table of docs/ownership.md (between markers)."""
    lines = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()]
    s = next(x for x in reversed(lines) if x["arm"] == "summary")
    a = s["args"]

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    out = [f"Measured {s['date']} on {s['cpus']} CPU cores ({s['machine']}, torch {s['torch']}, {s['threads']} threads; "
           f"load average {s['load_average_start']:.1f} at the start and {s['load_average_end']:.1f} at the end: the "
           f"machine was shared), `python benchmarks/transfer.py` ({a['clients']} clients, {a['smollm2']} of them "
           f"SmolLM2, {a['rounds']} rounds × {a['steps']} local steps, public fraction {a['public_fraction']}, "
           f"{a['client_distill_steps']} client / {a['server_distill_steps']} server distillation steps, "
           f"T = {a['temperature']}). Accuracy (%) after the last round, on the client's own test split and on "
           f"the server's held-out sample:", "",
           "| client | model | train examples | alone: own | FedAvg (same model): own | fedmd: own | alone: held-out | "
           "FedAvg: held-out | fedmd: held-out |", "|---|---|---|---|---|---|---|---|---|"]
    for cid, c in s["clients"].items():
        out.append(f"| {cid} | {c['architecture']} | {c['n_train']} | {pct(c['alone_own'])} | {pct(c['fedavg_own'])} | "
                   f"{pct(c['transfer_own'])} | {pct(c['alone_global'])} | {pct(c['fedavg_global'])} | "
                   f"{pct(c['transfer_global'])} |")
    for name in ("minilm", "smollm2", None):
        mine = [c for c in s["clients"].values() if name in (None, c["architecture"])]
        means = [pct(sum(c[f"{arm}_{where}"] for c in mine) / len(mine)) if mine else "–"
                 for where in ("own", "global") for arm in ("alone", "fedavg", "transfer")]
        out.append(f"| mean | {name or 'all'} | | " + " | ".join(means) + " |")
    tb, fb = s["transfer_bytes_per_round"], s["fedavg_bytes_per_round"]
    out += ["", f"Foundation model (SmolLM2-135M-Instruct + LoRA, held-out sample): {pct(s['fm_accuracy_before'])} % "
                f"before distillation, {pct(s['fm_accuracy_after'])} % after.", "",
            f"Bytes per round, all clients together: fedmd {tb['up']:.0f} up and {tb['down']:.0f} down (logits "
            f"only, fp32; none down in round 1); FedAvg within each architecture {fb['up']:.0f} up and "
            f"{fb['down']:.0f} down (the fp32 LoRA + head states): {fb['up'] / max(tb['up'], 1):.0f}× fedmd's upload.",
            "", "Wall seconds per arm (shared machine): " + ", ".join(f"{m} {v:.0f}" for m, v in s["seconds"].items())
            + "."]
    return "\n".join(out)


def write_doc() -> None:
    text = DOC.read_text()
    begin, end = "<!-- transfer-table -->", "<!-- /transfer-table -->"
    head, rest = text.split(begin)
    DOC.write_text(head + begin + "\n" + render() + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--smollm2", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--public-fraction", type=float, default=0.04)
    ap.add_argument("--eval-examples", type=int, default=100)
    ap.add_argument("--client-distill-steps", type=int, default=3)
    ap.add_argument("--server-distill-steps", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--arms", default="transfer,alone,fedavg")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--render", action="store_true", help="write the latest summary into docs/ownership.md")
    ap.add_argument("--combine", action="store_true", help="a summary line from the latest line of each arm")
    args = ap.parse_args()
    if args.combine:
        emit(combine(), RESULTS)
        return
    if args.render:
        write_doc()
        print(render())
        return
    torch.set_num_threads(THREADS)
    from fedfm.hetero import prepare_transfer

    cfg = config(args)
    prepared = prepare_transfer(cfg)
    common = {"benchmark": "transfer", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "threads": THREADS, "torch": torch.__version__,
              "load_average_start": os.getloadavg()[0], "args": vars(args)}
    arms = {}
    for mode in args.arms.split(","):
        arms[mode] = {**arm(prepared, mode), "load_average_end": os.getloadavg()[0]}
        emit({**common, **arms[mode]}, None if args.no_save else RESULTS)
    if {"alone", "fedavg", "transfer"} <= set(arms):
        emit(summarize(common, arms), None if args.no_save else RESULTS)


if __name__ == "__main__":
    main()
