"""How to run K clients' adapters through one base: ``torch.func.vmap`` over the client axis vs fedfm's segmented
matmuls (``runtime/batched.py``), against one client after another. Gradient computation only (forward + backward
of every client's own mean loss), which is where the ways differ.

Workload: the LLaMA-style model of overhead.py (~6.3M params, built from a config, seeded), LoRA r=8 on q,v (peft),
K clients with their own LoRA values, each a batch of 8 x 64 random tokens.

* sequential: load client k's LoRA values into the model, forward, backward (what the ``local`` runtime does);
* vmap: ``vmap(grad(functional_call(model, params_k, batch_k)))`` over the stacked parameters and batches;
* segmented: fedfm's stacked forward (one batched matmul per adapter over the client axis), the sum of the clients'
  mean losses, one backward.

Each is timed --repeats times (fastest kept), alternating; every line also carries the largest relative difference
of a client's gradient from the sequential one.

    python benchmarks/vmap_vs_segmented.py [--k 8] [--threads 2]

appends one JSON line to benchmarks/results/vmap_vs_segmented.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import torch

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results" / "vmap_vs_segmented.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from peft import LoraConfig, get_peft_model
    from torch.func import functional_call, grad, vmap

    from fedfm.runtime.batched import Segments, find_stackers, stacked_forward

    transformers.logging.set_verbosity_error()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    conf = transformers.AutoConfig.for_model(
        "llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=1536, vocab_size=1024, max_position_embeddings=128)
    model = get_peft_model(transformers.LlamaForCausalLM(conf), LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])).to(dev)
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    own = dict(model.named_parameters())
    K = args.k
    g = torch.Generator().manual_seed(1)
    stacked = {n: (own[n].detach().cpu().unsqueeze(0) + 0.02 * torch.randn(K, *own[n].shape, generator=g)).to(dev)
               for n in names}
    x = torch.randint(0, conf.vocab_size, (K, 8, 64), generator=g).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def sequential():
        grads = []
        for k in range(K):
            with torch.no_grad():
                for n in names:
                    own[n].copy_(stacked[n][k])
            model(input_ids=x[k], labels=x[k]).loss.backward()
            grads.append({n: own[n].grad.detach().clone() for n in names})
            model.zero_grad(set_to_none=True)
        return {n: torch.stack([gr[n] for gr in grads]) for n in names}

    def loss_fn(p, ids):
        return functional_call(model, p, args=(), kwargs={"input_ids": ids, "labels": ids}, strict=False).loss

    def vmapped():
        return vmap(grad(loss_fn))(stacked, x)

    stackers, missing = find_stackers(model, names)
    assert not missing, missing
    seg = Segments()
    seg.set(list(range(K)), [8] * K, K, dev)
    leaves = {n: torch.nn.Parameter(stacked[n].clone()) for n in names}

    def segmented():
        flat = x.reshape(K * 8, 64)
        with stacked_forward(stackers, leaves, seg):
            logits = model(input_ids=flat).logits
        per_tok = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), flat[:, 1:].flatten(),
                                                    reduction="none").view(K, -1)
        per_tok.mean(1).sum().backward()
        out = {n: leaves[n].grad.detach().clone() for n in names}
        for p in leaves.values():
            p.grad = None
        return out

    ways = {"sequential": sequential, "vmap": vmapped, "segmented": segmented}
    results, times = {}, {w: [] for w in ways}
    for w, fn in ways.items():  # warm-up
        results[w] = fn()
    for _ in range(args.repeats):
        for w, fn in ways.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[w].append(time.perf_counter() - t0)

    def diff(w):
        ref, got = results["sequential"], results[w]
        return max(float((ref[n][k] - got[n][k]).norm() / ref[n][k].norm().clamp_min(1e-30))
                   for n in names for k in range(K) if ref[n][k].norm() > 0)

    best = {w: min(t) for w, t in times.items()}
    rec = {"benchmark": "vmap_vs_segmented", "workload": "llama-6.3M lora r8 q,v; per-client batch 8 x 64",
           "k": K, **{f"{w}_s": round(best[w], 4) for w in ways},
           "vmap_speedup": round(best["sequential"] / best["vmap"], 3),
           "segmented_speedup": round(best["sequential"] / best["segmented"], 3),
           "vmap_max_rel_grad_diff": diff("vmap"), "segmented_max_rel_grad_diff": diff("segmented"),
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "threads": args.threads,
           "torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    emit(rec, None if args.no_save else RESULTS)


if __name__ == "__main__":
    main()
