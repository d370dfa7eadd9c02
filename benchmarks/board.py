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
    from fedfm.tuning import load_summary, render as render_table

    spec, summary = load_summary(spec_path(board), out_dir(board))
    done = sum(a["seeds"] for a in summary["arms"])
    if not done:
        write_block(DOC, "table:board", [f"Not run yet: `python benchmarks/board.py --board {board}` runs it."])
        return
    lines = [f"Measured with `python benchmarks/board.py --board {board}` (`fedfm sweep "
             f"benchmarks/boards/chatterbot-{board}.yaml`), then `--render`; every run's JSON line is in "
             f"`benchmarks/results/sweeps/chatterbot-board-{board}/trials.jsonl`. {done} of "
             f"{len(spec.arms) * len(spec.seeds)} entry runs recorded.", "", render_table(summary, spec).rstrip()]
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
