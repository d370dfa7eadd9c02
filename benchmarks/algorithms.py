"""The algorithm comparison of docs/algorithms.md: every federated algorithm of the library, tuned on validation
data, on 3 seeds, under Dirichlet(0.1) and Dirichlet(1.0) label splits, made with ``fedfm sweep``.

Workload (identical for every algorithm; ``benchmarks/sweeps/algorithms-dir*.yaml``): all-MiniLM-L6-v2 + LoRA (r=8,
alpha 16, query/value, the classifier head trained and shared) on BBC News (max_length 32), 10 clients, 5 sampled
a round, 30 rounds of 5 local steps of batch 16. Each algorithm's keys (client lr, server lr, μ, momentum) are tuned
on a validation split of 10% of the clients' own training data (seed 0, the mean validation accuracy of the last 3
rounds); the chosen setting then runs on seeds 0, 1, 2 with the test split scored.

    PYTHONPATH=src python benchmarks/algorithms.py [--parallel 2 --threads 1] [--only dir0.1]   # runs the sweeps
    PYTHONPATH=src python benchmarks/algorithms.py --render      # the tables into docs/algorithms.md, the plots
                                                                 # into docs/algorithms-<split>.png

The sweeps record every run in benchmarks/results/sweeps/<name>/trials.jsonl and continue where they stopped.
``--render`` works on whatever is recorded (arms still tuning say so).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _results import write_block

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = {"dir0.1": "Dirichlet(0.1)", "dir1.0": "Dirichlet(1.0)"}
DOC = ROOT / "docs" / "algorithms.md"


def spec_path(key: str) -> Path:
    return ROOT / "benchmarks" / "sweeps" / f"algorithms-{key}.yaml"


def out_dir(key: str) -> Path:
    return ROOT / "benchmarks" / "results" / "sweeps" / f"algorithms-{key}"


def inside_best(summary: dict) -> str:
    """Which arms' intervals overlap the best arm's (their difference from it is inside the intervals); the
    personalized arms are compared among themselves (another model, another test split)."""
    from fedfm.tuning import resolved

    out = []
    for group, what in ((False, "global model"), (True, "personalized")):
        done = [a for a in summary["arms"] if a["personalized"] is group and a["final"][0] is not None
                and not a["pending"]]
        if not done:
            continue
        if len(done) < 2:
            out.append(f"Only {done[0]['arm']} is {what}." if group else "Too few arms have finished to compare.")
            continue
        best = done[0]
        inside = [a["arm"] for a in done[1:] if a["overlaps_best"]]
        outside = [a["arm"] for a in done[1:] if a["overlaps_best"] is False]
        seed_by_seed = [a["arm"] for a in done[1:] if resolved(a["paired_vs_best"])]
        out.append(f"Best {what} by mean final accuracy: {best['arm']}. Inside its 95% interval (the difference is "
                   f"not resolved by 3 seeds): {', '.join(inside) or 'none'}. Outside it: {', '.join(outside) or 'none'}. "
                   f"Resolved seed by seed (the paired interval excludes 0): {', '.join(seed_by_seed) or 'none'}.")
    return " ".join(out) or "Too few arms have finished to compare."


def plot_path(key: str) -> Path:
    return ROOT / "docs" / f"algorithms-{key}.png"


def draw(summary: dict, spec, title: str, path: Path) -> bool:
    """One panel per arm (its mean test accuracy per round with the 95% band over seeds, clipped to [0, 1]; FedAvg's
    mean dotted in each global model's panel for reference): thirteen bands in one panel hide each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedfm.tuning import draw_curves

    arms = [a for a in summary["arms"] if a["curve"]]
    if not arms:
        return False
    cols = 5
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.5 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, (i, a) in zip(axes.flat, enumerate(arms)):
        # a personalized arm is another model on other test splits: no global reference beside it
        draw_curves(summary, spec, ax, arms=[a["arm"]], reference=None if a["personalized"] else "FedAvg",
                    color=f"C{i % 10}")
        ax.set_title(f"{a['arm']}\nfinal {a['final'][0]:.3f}" + (f" ± {a['final'][1]:.3f}" if a["final"][1] is not None
                                                              else ""), fontsize=8)
        ax.set_ylim(0, 1)
        ax.label_outer()
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(arms):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: mean test accuracy of seeds 0, 1, 2 per round, 95% band", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def render() -> None:
    from fedfm.tuning import load_summary, render as render_table

    lines = ["Measured with `python benchmarks/algorithms.py` (the sweeps `benchmarks/sweeps/algorithms-dir0.1.yaml` "
             "and `-dir1.0.yaml`, run by `fedfm sweep`), then `--render`; every run's JSON line is in "
             "`benchmarks/results/sweeps/algorithms-*/trials.jsonl`.", ""]
    for key, title in SWEEPS.items():
        spec, summary = load_summary(spec_path(key), out_dir(key))
        if any(a["pending"] for a in summary["arms"]):  # a table of dashes says nothing: say how far it is
            lines += [f"**{title}**: in progress, {progress(key)}.", ""]
            tuned = [a for a in summary["arms"] if a["tuning"]]  # the tuning runs recorded so far
            lines += [f"- {a['arm']}: " + "; ".join(
                ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()) +
                ": " + (f"{t['score']:.3f}" if t["status"] == "ok" else t["status"]) for t in a["tuning"]) +
                (" (chosen: " + ", ".join(f"{k}={v:g}" for k, v in a["setting"].items()) + ")" if a["setting"] else "")
                for a in tuned]
            if tuned and any(a["tuning"] for a in tuned):
                lines += ["", "(validation accuracy, mean of the last 3 rounds, seed 0)", ""]
            continue
        lines += [f"**{title}**", "", render_table(summary, spec).rstrip(), "", inside_best(summary), ""]
        if draw(summary, spec, title, plot_path(key)):
            lines += [f"![{title}: mean test accuracy per round, 95% bands]({plot_path(key).name})", ""]
    write_block(DOC, "table:algorithms", lines)


def progress(key: str) -> str:
    """How many of the sweep's runs are recorded."""
    from fedfm.tuning import Sweep, load_spec

    spec, base = load_spec(spec_path(key))
    sweep = Sweep(spec, base, out_dir(key)).load_records()
    done = sweep.done()
    tuning = sweep.tuning_trials()
    finals = len(spec.arms) * len(spec.seeds)
    n_final = sum(t.id in done for t in sweep.final_trials(sweep.chosen()))  # of the chosen settings only
    return (f"{sum(t.id in done for t in tuning)} of {len(tuning)} tuning runs and {n_final} of {finals} final runs "
            f"recorded (`python benchmarks/algorithms.py` continues it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SWEEPS), help="which sweeps: dir0.1, dir1.0")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        render()
        return
    from fedfm.tuning import run_sweep

    for key in args.only.split(","):
        run_sweep(spec_path(key), out_dir(key), parallel=args.parallel, threads=args.threads,
                  log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
