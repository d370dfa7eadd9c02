"""Faults (issue 15): a run killed with SIGKILL at seeded points across its rounds, checkpoints and final save, then
resumed until it finishes, ends with the adapter bytes of an uninterrupted run; and no ``--overwrite`` or
``--resume``, whatever the directory holds, removes or changes a file that is not the new run's own."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import fedfm
import fedfm.cli as cli
from fedfm.cli import app

from tests.conftest import make_rows, snapshot, tiny_overrides, write_csv

ROUNDS = 3
ADAPTER = Path("adapter") / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run of ROUNDS rounds (in this process), and how to start it again."""
    tmp = tmp_path_factory.mktemp("faults")
    data = write_csv(tmp / "tiny.csv", make_rows())
    overrides = tiny_overrides(data, tmp, **{"federation.rounds": ROUNDS})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.console, "_width", 1000)
        res = CliRunner().invoke(app, ["run", "bbc-lora", *overrides])
    assert res.exit_code == 0, res.output
    return {"run_dir": tmp / "run", "data": data, "tmp": tmp, "adapter": (tmp / "run" / ADAPTER).read_bytes()}


# ------------------------------------------------------------------ SIGKILL, then --resume until finished

PROGRESS = re.compile(r"model ready|round +\d+ \|")  # the lines a run prints as it builds and finishes each round


class Child:
    """``python -m fedfm run ...`` in its own process, its output read as it comes."""

    def __init__(self, args: list[str], cwd: Path):
        src = str(Path(fedfm.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
               "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen([sys.executable, "-m", "fedfm", "run", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.progress = 0
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.progress += bool(PROGRESS.search(line))
                self.changed.notify_all()
        with self.changed:
            self.proc.wait()
            self.changed.notify_all()

    def kill_after(self, progress: int, delay: float) -> bool:
        """SIGKILL ``delay`` seconds after the ``progress``-th progress line (0: the model is built); False when the
        run ended before."""
        with self.changed:
            self.changed.wait_for(lambda: self.progress > progress or self.proc.poll() is not None, timeout=300)
        time.sleep(delay)
        if self.proc.poll() is not None:
            return False
        self.proc.kill()
        self.proc.wait()
        return True

    def finish(self) -> int:
        return self.proc.wait(timeout=300)


def _last_checkpoint(run: Path) -> int:
    rounds = [int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("round_*.pt")] if run.exists() else []
    return max(rounds, default=0)


def test_a_run_killed_anywhere_and_resumed_ends_with_the_uninterrupted_adapter(reference, tmp_path):
    """Three kills, at seeded points: during a round (its checkpoint being written), just after the model is built
    (the run directory being made, round 1), and after the last round (its checkpoint, the final save, the report);
    then a last --resume runs to the end."""
    rng = random.Random(15)
    run = tmp_path / "run"
    fresh = ["bbc-lora", *tiny_overrides(reference["data"], tmp_path, **{"federation.rounds": ROUNDS}), "--overwrite"]
    log = []
    for phase in ["round", "build", "final", "end"]:
        resumable = (run / ".fedfm-run").exists() and (run / "config.yaml").exists()
        done = _last_checkpoint(run)
        child = Child(["--resume", str(run)] if resumable else fresh, tmp_path)
        if phase == "end":
            assert child.finish() == 0, "".join(child.lines)
            break
        # the progress line to kill after: 0 the model built, k the k-th round this process runs (its checkpoint
        # follows the line), the last one the final round (then the final save and the report)
        at = {"round": rng.randint(1, max(1, ROUNDS - done - 1)), "build": 0, "final": ROUNDS - done}[phase]
        delay = rng.uniform(0.0, 0.5 if phase == "final" else 0.3)
        killed = child.kill_after(at, delay)
        log.append((phase, done, at, round(delay, 3), killed, _last_checkpoint(run)))
        if not killed:
            assert child.finish() == 0, "".join(child.lines)
    assert sum(entry[4] for entry in log) >= 2, log
    assert (run / ADAPTER).read_bytes() == reference["adapter"], log
    rounds = [int(line.split('"round": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, ROUNDS + 1)), log


# ------------------------------------------------------------------ property: nothing that is not the run's own is lost

USER_DIRS = ["", "notes", "notes/deep", "report", "checkpoints"]  # report/, checkpoints/: inside a run's own folders

contents = st.fixed_dictionaries({
    "kind": st.sampled_from(["run", "config only", "empty", "absent"]),
    "user_files": st.lists(st.tuples(st.sampled_from(USER_DIRS), st.text("abc", min_size=1, max_size=3),
                                     st.binary(max_size=16)), max_size=4),
    "action": st.sampled_from(["--overwrite", "--resume", "plain"]),
})


def _make(target: Path, case: dict, reference: dict) -> None:
    kind = case["kind"]
    if kind == "run":
        shutil.copytree(reference["run_dir"], target)
    elif kind != "absent":
        target.mkdir()
        if kind == "config only":
            (target / "config.yaml").write_text((reference["run_dir"] / "config.yaml").read_text())
    for sub, name, data in case["user_files"]:
        folder = target / sub
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"user_{name}.txt").write_bytes(data)


@example(case={"kind": "run", "action": "--overwrite",
          "user_files": [("", "a", b"1"), ("report", "b", b"2"), ("checkpoints", "c", b"3"), ("notes/deep", "d", b"")]})
@example(case={"kind": "run", "action": "--resume", "user_files": [("report", "b", b"2"), ("checkpoints", "c", b"3")]})
@example(case={"kind": "config only", "action": "--overwrite", "user_files": []})
@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=contents)
def test_no_overwrite_or_resume_changes_a_file_that_is_not_the_new_runs_own(reference, case):
    with tempfile.TemporaryDirectory(dir=reference["tmp"]) as tmp:
        root = Path(tmp)
        target = root / "out"
        (root / "beside.txt").write_text("a file beside the run directory")
        _make(target, case, reference)
        before = snapshot(root)
        if case["action"] == "--resume":
            args = ["run", "--resume", str(target)]
        else:
            args = ["run", "bbc-lora", *tiny_overrides(reference["data"], root, **{"federation.rounds": 1,
                                                                                  "output.dir": str(target)})]
            args += ["--overwrite"] if case["action"] == "--overwrite" else []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cli.console, "_width", 1000)
            res = CliRunner().invoke(app, args)
        after = snapshot(root)
        is_run = case["kind"] == "run"
        has_files = case["kind"] in ("run", "config only") or bool(case["user_files"])
        may_run = is_run if case["action"] == "--resume" else \
            not has_files or (is_run and case["action"] == "--overwrite")
        if may_run:
            assert res.exit_code == 0, res.output
            assert (target / ADAPTER).exists()
        else:
            assert res.exit_code == 2 and "Traceback" not in res.output, res.output
            assert after == before
        user = {k: v for k, v in before.items() if not k.startswith("out/") or "/user_" in k}
        assert {k: after.get(k) for k in user} == user  # the user's files, and everything beside the run, as they were
        assert all(k == "out" or k.startswith("out/") or k in before for k in after)  # nothing new beside the run
