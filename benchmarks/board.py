"""The instruction-tuning board of docs/instruction-board.md: SmolLM2-135M-Instruct on the chatterbot conversations
(one client per category), a fixed budget of bytes, entries ranked by held-out response loss, with ROUGE-L and exact
match beside it. Each entry is one arm of ``benchmarks/boards/chatterbot-<cpu|gpu>.yaml``, run by ``fedfm sweep``.

    PYTHONPATH=src python benchmarks/board.py [--board cpu] [--threads 2]     # runs (or continues) the board
    PYTHONPATH=src python benchmarks/board.py --render [--board cpu]          # its table into the doc

Every entry's JSON line is in benchmarks/results/sweeps/chatterbot-board-<board>/trials.jsonl (committed, so a
later session continues where this one stopped).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _results import write_block

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "instruction-board.md"


def spec_path(board: str) -> Path:
    return ROOT / "benchmarks" / "boards" / f"chatterbot-{board}.yaml"


def out_dir(board: str) -> Path:
    return ROOT / "benchmarks" / "results" / "sweeps" / f"chatterbot-board-{board}"


def render(board: str) -> None:
    """The board: one run per entry (seed 0), ranked by held-out response loss within the byte budget, with the
    wall time each entry took (the CPU board's 30-minute claim)."""
    from fedfm.tuning import Sweep, load_spec, summarize

    spec, base = load_spec(spec_path(board))
    sweep = Sweep(spec, base, out_dir(board)).load_records()  # trials.jsonl read once: the summary and the rows
    summary = summarize(spec, sweep.records, sweep.chosen(), frozenset(sweep.pending()))
    done = sum(a["seeds"] for a in summary["arms"])
    if not done:
        write_block(DOC, "table:board", [f"Not run yet: `python benchmarks/board.py --board {board}` runs it."])
        return
    setting = {a["arm"]: a["setting"] for a in summary["arms"]}
    finals = {r["arm"]: r for r in sweep.records  # the last record of each entry, at its chosen setting as summarized
              if r["phase"] == "final" and r["params"] == setting[r["arm"]]}
    cols = ["held-out loss", "ROUGE-L", "exact match (short answers)", "exact match (all)", "perplexity", "rounds",
            "MB (up + down)", "wall time", "status"]
    lines = [f"Measured with `python benchmarks/board.py --board {board}` (`fedfm sweep "
             f"benchmarks/boards/chatterbot-{board}.yaml`), then `--render`; every run's JSON line is in "
             f"`benchmarks/results/sweeps/chatterbot-board-{board}/trials.jsonl`. {done} of "
             f"{len(spec.arms) * len(spec.seeds)} entries recorded.", "",
             "| rank | entry | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    rank = 0
    for a in summary["arms"]:
        r = finals.get(a["arm"])
        if r is None:
            lines.append(f"| | {a['arm']} | " + " | ".join(["not run yet"] + [""] * (len(cols) - 1)) + " |")
            continue
        rank += 1
        last = {name: (vals[max(vals, key=int)] if vals else None) for name, vals in r.get("report", {}).items()}

        def f(v, digits=3):
            return "—" if v is None else f"{v:.{digits}f}"

        lines.append(f"| {rank} | {a['arm']} | {f(r.get('final'))} | {f(last.get('rougeL'))} | "
                     f"{f(last.get('exact_match_short'))} | {f(last.get('exact_match'))} | "
                     f"{f(last.get('perplexity'), 2)} | {r.get('rounds')} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['wall_s'] / 60:.1f} min ({r.get('threads')} threads) | {r['status']} |")
    lines += ["", f"One run per entry (seed {spec.seeds[0]}), so no interval: read differences of a few hundredths of "
              "loss as unresolved. Ranked by the held-out response loss after the last round the budget allows (lower "
              "is better). Wall time: the whole entry, model load and the final score included, at "
              "`runtime.threads` 2 (runs while other work shared the 2 cores are slower than on idle ones)."]
    write_block(DOC, "table:board", lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--board", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        render(args.board)
        return
    from fedfm.tuning import run_sweep

    run_sweep(spec_path(args.board), out_dir(args.board), parallel=1, threads=args.threads,
              log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
