"""Shared by the benchmarks: print one measurement as a JSON line and append it to its results file."""
from __future__ import annotations

import json
from pathlib import Path


def emit(record: dict, path: Path | None) -> str:
    """Print ``record`` as one JSON line; append it to ``path`` (None: print only)."""
    line = json.dumps(record)
    print(line, flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    return line


def arms_main(script: str, arms: list[str], run_arm, render, results: Path, timeout_s: float,
              default_rounds: int) -> None:
    """The command line of a benchmark that compares arms over seeds: ``--render`` (the docs table), ``--arm A
    --seed S`` (one arm in this process: its JSON line printed and appended to ``results``), or every arm of
    ``--only`` (default all) for each of ``--seeds``, one child process each, so that no arm's allocations or
    caches help another."""
    import argparse
    import os
    import subprocess
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--only", default="")
    ap.add_argument("--arm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=default_rounds)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        render()
        return
    if args.arm:
        emit(run_arm(args.arm, args.seed, args.rounds), results)
        return
    root = Path(script).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'benchmarks'}"}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in [a for a in args.only.split(",") if a] or arms:
            subprocess.run([sys.executable, script, "--arm", arm, "--seed", str(seed), "--rounds", str(args.rounds)],
                           env=env, check=True, timeout=timeout_s)


def latest_records(results: Path, arms=None) -> dict:
    """``{(arm, seed): record}``: the last line of ``results`` for each arm and seed (only ``arms``' when given)."""
    latest: dict[tuple[str, int], dict] = {}
    for line in results.read_text().splitlines():
        rec = json.loads(line)
        if arms is None or rec["arm"] in arms:
            latest[(rec["arm"], rec["seed"])] = rec
    return latest


def seed_means(latest: dict, arms, keys) -> dict:
    """``{arm: {key: mean over its seeds}}`` for each arm measured on more than one seed (``latest``: the latest
    record of each (arm, seed))."""
    out = {}
    for arm in arms:
        runs = [r for (a, _), r in latest.items() if a == arm]
        if len(runs) > 1:
            out[arm] = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
            out[arm]["seeds"] = len(runs)
    return out


def write_block(doc: Path, name: str, lines: list[str]) -> None:
    """Replace what lies between ``<!-- name -->`` and ``<!-- /name -->`` in ``doc`` with ``lines``; print them."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = doc.read_text()
    head, rest = text.split(begin)
    doc.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
    print("\n".join(lines))
