"""Fair comparisons (``fedfm sweep``): each arm (an algorithm, an adapter, a codec: a set of config overrides) is
tuned on validation data, then its best setting runs on several seeds, and the arms are compared by mean and a 95%
interval.

A sweep spec (YAML) names a base config, overrides every run shares (the task, the data, the budget of rounds and
client steps), the metric, and the arms. An arm with a ``grid`` is tuned first: a grid search over the named config
keys (a list of grids joins their points: a grid widened along one key), or ``search: random`` draws ``budget``
settings from it (a list is a choice; ``{log_uniform: [lo, hi]}`` and ``{uniform: [lo, hi]}`` are ranges). Tuning
runs score the global model on a validation split that each client carves from its own training data
(``partition.validation_fraction``; the rows' ``val_<metric>``) and never read the test split
(``eval.held_out: false``). An arm's setting is the one with the best mean ``val_<metric>`` over its last
3 evaluated rounds. That setting then runs on every seed of ``seeds`` with the test split scored (``eval_<metric>``).

Every run is one ``fedfm run`` in its own process and directory, and one JSON line in ``trials.jsonl``; a sweep
started again with the same spec and output directory skips the runs already recorded, so a long sweep continues
where it stopped. Runs that diverge (a non-finite loss, or accuracy at chance: at most 1/classes + 0.05) are
recorded and reported as diverged, never dropped: they count in the means. ``summary.md`` / ``summary.json``: per
arm the mean and 95% interval (Student's t over seeds) of the final metric, of the mean of the last 3 evaluated
rounds, of the rounds to ``target`` and of the bytes sent and received; ``curves.png``: the mean curves with bands.

Everything a spec names is checked before anything trains: every key of every setting (``fedfm.load_config``), no
empty grid, and a validation split with at least as many examples as classes (the data is read and partitioned, no
model is loaded).
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError, FedfmError

SWEEP_KEYS = {  # what the sweep itself sets in every run
    "federation.seed": "tune_seed while tuning, each of seeds after",
    "eval.held_out": "off while tuning, on after",
    "partition.validation_fraction": "the spec's validation_fraction",
    "output.dir": "each run's directory under the sweep's",
}
CHANCE_MARGIN = 0.05  # accuracy at most 1/classes + this is "at chance"
LAST = 3  # the last evaluated rounds averaged for the tuning score and the "last-3" column
TIE = 1e-9  # tuning scores closer than this are equal (the same accuracies summed in another order differ by ~1e-16)


class Range(BaseModel):
    """A range to draw from in a random search: ``{log_uniform: [lo, hi]}`` or ``{uniform: [lo, hi]}``."""

    model_config = ConfigDict(extra="forbid")
    log_uniform: Optional[tuple[float, float]] = None
    uniform: Optional[tuple[float, float]] = None

    def draw(self, rng: np.random.Generator) -> float:
        if self.log_uniform is not None:
            lo, hi = self.log_uniform
            return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        lo, hi = self.uniform
        return float(rng.uniform(lo, hi))


class Arm(BaseModel):
    """One entry of the comparison: its own overrides, and the keys it is tuned over (none: it runs as given)."""

    model_config = ConfigDict(extra="forbid")
    overrides: dict[str, Any] = {}
    # the tuned keys and their values: one grid (every combination), or a list of grids whose points are joined, so
    # a grid is widened along one key without rerunning the others' every combination (scikit-learn's ParameterGrid)
    grid: Union[dict[str, Union[list[Any], Range]], list[dict[str, Union[list[Any], Range]]]] = {}
    # a personalization method (personal parameters: FedSA-LoRA's lora_B, adapter.personal): what it delivers is each
    # client's own model, so it is scored that way: tuned on the clients' own validation splits under their own
    # models, and reported as client_<metric>_personal_mean (each client's model on its own test split, mean over the
    # clients), not as the global model on the server's test split, and ranked apart from the global models
    personalized: bool = False

    @property
    def grids(self) -> list[dict[str, Union[list[Any], Range]]]:
        """The grids joined: one for a single grid, none for an arm that runs as given."""
        if isinstance(self.grid, dict):
            return [self.grid] if self.grid else []
        return list(self.grid)

    @property
    def tuned_keys(self) -> list[str]:
        """Every tuned key, in the order the grids first name them."""
        return list(dict.fromkeys(k for g in self.grids for k in g))


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    base: str = "bbc-lora"  # a built-in config name or a YAML file (relative to the spec's own directory)
    overrides: dict[str, Any] = {}  # every run: the task, the data, the budget
    metric: str = "accuracy"  # scored as val_<metric> when tuning, eval_<metric> on the test split
    higher_is_better: Optional[bool] = None  # default: False for loss and perplexity, True otherwise
    report: list[str] = []  # further eval_<name> columns of the summary
    target: Optional[float] = None  # rounds to reach this eval_<metric>
    search: Literal["grid", "random"] = "grid"
    budget: Optional[int] = Field(None, ge=1)  # random: settings drawn per arm; grid: the most settings an arm may have
    validation_fraction: float = Field(0.1, ge=0, lt=1)  # partition.validation_fraction of every run
    tune_seed: int = 0
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    timeout_s: Optional[float] = Field(None, gt=0)  # a run still going after this long is stopped, recorded failed
    arms: dict[str, Arm]

    @field_validator("arms")
    @classmethod
    def _some(cls, arms: dict[str, Arm]) -> dict[str, Arm]:
        if not arms:
            raise ValueError("no arms: name at least one entry to compare")
        return arms

    @property
    def better_high(self) -> bool:
        if self.higher_is_better is not None:
            return self.higher_is_better
        return not self.metric.endswith(("loss", "perplexity"))


@dataclass
class Trial:
    """One run of the sweep: an arm's setting (``params``, the tuned keys) in a phase (``tune`` / ``final``)."""

    arm: str
    phase: str
    seed: int
    params: dict[str, Any]
    overrides: dict[str, Any]  # everything applied to the base, in order

    @property
    def id(self) -> str:
        key = json.dumps([self.arm, self.phase, self.seed, self.overrides], sort_keys=True, default=str)
        return f"{self.arm}-{self.phase}-s{self.seed}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"

    @property
    def slug(self) -> str:
        """The id as a file name: an arm may be named anything ("FlexLoRA (ranks 4/8/16)")."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.id)


@dataclass
class Sweep:
    spec: SweepSpec
    base: str  # the base config as load_config takes it
    out: Path
    records: list[dict] = field(default_factory=list)

    # ------------------------------------------------------------------ the settings
    def settings(self, arm: str) -> list[dict[str, Any]]:
        """The tuned settings of ``arm``: the grid's every point, or ``budget`` random draws ([{}]: no tuning)."""
        grids = self.spec.arms[arm].grids
        if not grids:
            return [{}]
        if self.spec.search == "grid":
            points: list[dict[str, Any]] = []
            for grid in grids:
                ranges = [k for k in grid if isinstance(grid[k], Range)]
                if ranges:
                    raise ConfigError(f"arms.{arm}.grid.{ranges[0]}: a range is drawn from in search: random; a grid "
                                      "search needs a list of values")
                for vals in itertools.product(*grid.values()):
                    point = dict(zip(grid, vals))
                    if point not in points:  # grids that overlap run their shared points once
                        points.append(point)
            if self.spec.budget is not None and len(points) > self.spec.budget:
                raise ConfigError(f"arms.{arm}.grid: {len(points)} settings, more than budget {self.spec.budget}")
            return points
        if len(grids) > 1:
            raise ConfigError(f"arms.{arm}.grid: a list of grids is joined in search: grid; search: random draws "
                              "from one grid (name each key once, with a list or a range)")
        grid = grids[0]
        from .randomness import Randomness

        rng = Randomness(self.spec.tune_seed).rng("sweep_settings", int(hashlib.sha1(arm.encode()).hexdigest()[:8], 16))
        out = []
        for _ in range(self.spec.budget):
            out.append({k: (v.draw(rng) if isinstance(v, Range) else v[int(rng.integers(len(v)))])
                        for k, v in grid.items()})
        return out

    def trial(self, arm: str, phase: str, seed: int, params: dict[str, Any]) -> Trial:
        ov = {**self.spec.overrides, "partition.validation_fraction": self.spec.validation_fraction,
              **self.spec.arms[arm].overrides, **params, "federation.seed": seed,
              "eval.held_out": phase == "final"}
        if self.spec.arms[arm].personalized and phase == "final":
            ov["eval.per_client"] = True  # the clients' own models on their own test splits
        return Trial(arm=arm, phase=phase, seed=seed, params=params, overrides=ov)

    def tuning_trials(self) -> list[Trial]:
        return [self.trial(a, "tune", self.spec.tune_seed, p) for a in self.spec.arms if self.spec.arms[a].grids
                for p in self.settings(a)]

    def final_trials(self, chosen: dict[str, Optional[dict[str, Any]]]) -> list[Trial]:
        """The chosen setting of every arm on every seed (an arm whose every tuning run diverged has none)."""
        return [self.trial(a, "final", s, chosen[a]) for a in self.spec.arms if chosen.get(a) is not None
                for s in self.spec.seeds]

    # ------------------------------------------------------------------ checks before anything trains
    def check(self) -> None:
        """Every run's config loads; no empty grid; a tuned arm has a validation split with at least as many
        examples as classes. Raises ConfigError naming the key; reads the data, loads no model."""
        from . import api

        spec = self.spec
        try:
            api.load_config(self.base)
        except FedfmError as e:
            raise ConfigError(f"base: {e}") from None
        try:
            api.load_config(self.base, dict(spec.overrides))
        except FedfmError as e:
            raise ConfigError(f"overrides: {e}") from None
        named = [("overrides", spec.overrides)]
        named += [(f"arms.{arm}.{part}", keys) for arm, a in spec.arms.items()
                  for part, keys in (("overrides", a.overrides), ("grid", a.tuned_keys))]
        for where, keys in named:
            owned = sorted(set(keys) & set(SWEEP_KEYS))
            if owned:
                raise ConfigError(f"{where}.{owned[0]}: the sweep sets it ({SWEEP_KEYS[owned[0]]})")
        for arm, a in spec.arms.items():
            if isinstance(a.grid, list) and (not a.grid or not all(a.grid)):
                raise ConfigError(f"arms.{arm}.grid: an empty grid in the list; give each one keys and the values to "
                                  "try (or drop grid to run the arm as given)")
            for grid in a.grids:
                for key, vals in grid.items():
                    if isinstance(vals, list) and not vals:
                        raise ConfigError(f"arms.{arm}.grid.{key}: an empty list; give the values to try")
            if a.grids and spec.search == "random" and spec.budget is None:
                raise ConfigError(f"budget: search: random draws `budget` settings per arm (arms.{arm} has a grid)")
            if a.grids and not spec.validation_fraction:
                raise ConfigError(f"validation_fraction: arms.{arm} is tuned, and tuning scores on a validation "
                                  "split of the clients' training data; set it above 0")
        trials = self.tuning_trials() + self.final_trials({a: self.settings(a)[0] for a in spec.arms})
        checked: dict[str, Any] = {}
        for t in trials:
            try:
                cfg = api.load_config(self.base, dict(t.overrides))
            except FedfmError as e:
                where = next((f"arms.{t.arm}.grid" for k in t.params if k in str(e)), f"arms.{t.arm}")
                raise ConfigError(f"{where}: {e}") from None
            if self.spec.arms[t.arm].personalized:
                from .models import personal_patterns

                if not personal_patterns(cfg.adapter):
                    raise ConfigError(f"arms.{t.arm}.personalized: its adapter ({cfg.adapter.method}) keeps no "
                                      "parameters on the clients; set adapter.personal or use a personalization "
                                      "method such as fedsa-lora, or drop personalized")
            if t.phase == "tune":
                data_key = json.dumps([cfg.data.model_dump(mode="json"), cfg.partition.model_dump(mode="json"),
                                       cfg.federation.seed], sort_keys=True)
                if data_key not in checked:
                    checked[data_key] = self._check_validation(t, cfg)

    def _check_validation(self, t: Trial, cfg) -> None:
        from .simulation import prepare

        data = prepare(cfg).data
        n_val = sum(len(c.val) for c in data.clients)
        k = data.examples.num_classes if data.examples.labels is not None else 1
        if n_val < max(k, 1):
            raise ConfigError(f"validation_fraction: {self.spec.validation_fraction:g} of the clients' training data "
                              f"is {n_val} example(s) (arms.{t.arm}), fewer than the {k} classes it must score; "
                              "raise validation_fraction or use more data")

    # ------------------------------------------------------------------ running
    def load_records(self) -> "Sweep":
        """The runs already recorded in the output directory's ``trials.jsonl`` (none if it has none)."""
        trials = self.out / "trials.jsonl"
        if trials.exists():
            self.records = [json.loads(line) for line in trials.read_text().splitlines() if line.strip()]
        return self

    def done(self) -> dict[str, dict]:
        """The recorded runs by trial id; a run that failed (not diverged: an error of the run itself) is run again."""
        return {r["trial"]: r for r in self.records if r["status"] != "failed"}

    def run_all(self, parallel: int, threads: Optional[int], log) -> None:
        """Tune every arm and run each chosen setting on every seed. An arm's final runs start as soon as its own
        tuning runs are recorded, so no process waits for the last arm's tuning (the tuning runs go first)."""
        chosen = {a: (s if s is not None else self.settings(a)[0]) for a, s in self.chosen().items()}
        every = self.tuning_trials() + self.final_trials(chosen)  # the count to log; a choice may still change
        done = self.done()
        log(f"{sum(t.id in done for t in every)} of {len(every)} already recorded; "
            f"{sum(t.id not in done for t in every)} to run")
        self._pool(self.next_trial, parallel, threads, log)

    def next_trial(self, started: set[str], running: set[str]) -> Optional[Trial]:
        """The next run to start: a tuning run not yet recorded, else a final run of an arm whose tuning is over
        (every tuning run recorded, or tried in this sweep: a run that failed is tried once a sweep), else none."""
        done = self.done()
        open_tuning = [t for t in self.tuning_trials()
                       if t.id not in done and (t.id not in started or t.id in running)]
        fresh = [t for t in open_tuning if t.id not in started]
        if fresh:
            return fresh[0]
        tuning = {t.arm for t in open_tuning}
        return next((t for t in self.final_trials(self.chosen())
                     if t.arm not in tuning and t.id not in done and t.id not in started), None)

    def _pool(self, next_trial, parallel: int, threads: Optional[int], log) -> None:
        """Start ``next_trial(started, running)`` while fewer than ``parallel`` run, until it gives none and none
        runs; each run is recorded as it ends."""
        running: list[tuple[Trial, subprocess.Popen, float, Any]] = []
        started: set[str] = set()
        ended = True  # what may start changes only when a run ends
        while True:
            while ended and len(running) < parallel:
                t = next_trial(started, {job[0].id for job in running})
                if t is None:
                    break
                started.add(t.id)
                running.append((t, *self._start(t, threads, parallel)))
            if not running:
                return
            time.sleep(0.5)
            ended = False
            limit = self.spec.timeout_s
            for job in list(running):
                t, proc, t0, fh = job
                late = limit is not None and proc.poll() is None and time.perf_counter() - t0 > limit
                if late:  # a hung run must not hang the sweep: stop it and record why
                    proc.kill()
                    proc.wait()
                elif proc.poll() is None:
                    continue
                running.remove(job)
                ended = True
                fh.close()
                rec = self._record(t, proc.returncode, time.perf_counter() - t0, parallel, threads,
                                   timed_out=limit if late else None)
                self._append(rec)
                log(f"{t.id}: {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else "") +
                    f", {rec['metric']} {_fmt(rec.get('final'))} in {rec['wall_s']:.0f} s")

    def _start(self, t: Trial, threads: Optional[int], parallel: int):
        run_dir = self.out / "runs" / t.slug
        cfg_file = self.out / "configs" / f"{t.slug}.yaml"
        cfg_file.parent.mkdir(parents=True, exist_ok=True)
        from . import api

        over = dict(t.overrides, **{"output.dir": str(run_dir), "output.keep_checkpoints": 1, "name": t.slug})
        if threads:
            over["runtime.threads"] = threads
        cfg_file.write_text(api.load_config(self.base, over).to_yaml())
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        (self.out / "logs").mkdir(exist_ok=True)
        log = open(self.out / "logs" / f"{t.slug}.log", "w")
        code = "import sys, fedfm; fedfm.run(sys.argv[1], overwrite=True, report=False)"
        proc = subprocess.Popen([sys.executable, "-c", code, str(cfg_file)], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        return proc, time.perf_counter(), log

    def _record(self, t: Trial, rc: int, wall: float, parallel: int, threads: Optional[int],
                timed_out: Optional[float] = None) -> dict:
        run_dir = self.out / "runs" / t.slug
        rows = []
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        classes = None
        part = run_dir / "partition.json"
        if part.exists():
            names = json.loads(part.read_text()).get("label_names")
            classes = len(names) if names else None
        rec = score_rows(rows, self.spec, t.phase, classes, personalized=self.spec.arms[t.arm].personalized)
        rec.update(sweep=self.spec.name, trial=t.id, run=f"runs/{t.slug}", arm=t.arm, phase=t.phase, seed=t.seed,
                   params=t.params,
                   overrides=t.overrides, rc=rc, fedfm=_version(), wall_s=round(wall, 1), concurrent_runs=parallel,
                   threads=threads,
                   date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        if timed_out is not None:  # whatever rounds it logged, it did not finish: failed (a rerun tries it again)
            rec["status"], rec["reason"] = "failed", f"timed out: still running after timeout_s {timed_out:g} s"
        elif rc != 0:
            tail = (self.out / "logs" / f"{t.slug}.log").read_text(errors="replace")[-800:]
            rec["error_tail"] = tail
            if rec["status"] != "diverged":
                nonfinite = any(w in tail.lower() for w in ("non-finite", "nan", "inf"))
                rec["status"], rec["reason"] = ("diverged", "non-finite values") if nonfinite else \
                    ("failed", tail.strip().splitlines()[-1] if tail.strip() else f"exit {rc}")
        for sub in ("checkpoints", "client_state"):  # the records and metrics stay; the bulky state goes
            _rmtree(run_dir / sub)
        return rec

    def _append(self, rec: dict) -> None:
        self.records.append(rec)
        with open(self.out / "trials.jsonl", "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    # ------------------------------------------------------------------ choosing
    def chosen(self) -> dict[str, Optional[dict[str, Any]]]:
        """Per arm, the setting with the best tuning score (diverged and failed runs are never chosen; None when
        every one did, or while a tuning run has no record yet)."""
        recorded = {r["trial"]: r for r in self.records}  # the last record of each run, failed ones too
        out = {}
        for arm in self.spec.arms:
            best, best_score = None, None
            runs = [recorded.get(self.trial(arm, "tune", self.spec.tune_seed, p).id) for p in self.settings(arm)]
            if not self.spec.arms[arm].grids:
                out[arm] = {}
                continue
            if any(r is None for r in runs):  # still tuning: no choice yet
                out[arm] = None
                continue
            for p, r in zip(self.settings(arm), runs):
                if r["status"] != "ok" or r.get("score") is None:
                    continue
                s = r["score"] if self.spec.better_high else -r["score"]
                if best_score is None or s > best_score + TIE:  # a tie goes to the setting listed first
                    best, best_score = p, s
            out[arm] = best
        return out

    def pending(self) -> set[str]:
        """The arms with a tuning run or a final run not yet recorded."""
        done = self.done()
        chosen = self.chosen()
        todo = [t for t in self.tuning_trials() if t.id not in done]
        todo += [t for t in self.final_trials(chosen) if t.id not in done]
        return {t.arm for t in todo}


@functools.lru_cache(maxsize=None)
def _version() -> str:
    """fedfm's version and, in a git checkout, its commit: which code a recorded run ran."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("fedfm")
    except PackageNotFoundError:
        __version__ = "unknown"
    try:
        head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        head = ""
    return f"{__version__}+{head}" if head else __version__


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4g}"


def score_key(spec: SweepSpec, phase: str, personalized: bool = False) -> str:
    """The row key a run is scored on: ``val_<metric>`` when tuning; when final, ``eval_<metric>`` (the global model
    on the server's test split), or for a personalized arm ``client_<metric>_personal_mean``."""
    if phase == "tune":
        return f"val_{spec.metric}"
    if personalized:
        return f"client_{'acc' if spec.metric == 'accuracy' else spec.metric}_personal_mean"
    return f"eval_{spec.metric}"


def score_rows(rows: list[dict], spec: SweepSpec, phase: str, classes: Optional[int],
               personalized: bool = False) -> dict:
    """What one run's rows say: its metric per evaluated round (``score_key``), the final value, the mean of the
    last 3 evaluated rounds (the tuning score), rounds to target, bytes, and whether it diverged (a non-finite loss
    or metric, or accuracy at chance)."""
    key = score_key(spec, phase, personalized)
    series = {int(r["round"]): r[key] for r in rows if key in r and r.get("round") is not None}
    extra = {name: {int(r["round"]): r[f"eval_{name}"] for r in rows if f"eval_{name}" in r}
             for name in spec.report} if phase == "final" else {}
    evaluated = [series[k] for k in sorted(series)]
    finite = [v for v in evaluated if v is not None and math.isfinite(v)]
    last = finite[-LAST:] if len(finite) == len(evaluated) else []
    rec: dict[str, Any] = {
        "metric": key, "series": series, "report": extra, "rounds": len(rows),
        "train_loss": {int(r["round"]): r.get("train_loss") for r in rows if "round" in r},
        "bytes": int(sum((r.get("bytes_up") or 0) + (r.get("bytes_down") or 0) for r in rows)),
        "final": evaluated[-1] if evaluated else None, "last3": float(np.mean(last)) if last else None,
        "status": "ok", "reason": None,
    }
    rec["score"] = rec["last3"]
    if spec.target is not None and phase == "final":
        hit = [k for k in sorted(series) if series[k] is not None and math.isfinite(series[k]) and
               (series[k] >= spec.target if spec.better_high else series[k] <= spec.target)]
        rec["rounds_to_target"] = hit[0] if hit else None
    losses = [v for v in rec["train_loss"].values() if v is not None]
    if any(not math.isfinite(v) for v in losses) or len(finite) != len(evaluated):
        rec["status"], rec["reason"] = "diverged", "non-finite loss or metric"
    elif spec.metric == "accuracy" and classes and rec["final"] is not None and \
            rec["final"] <= 1.0 / classes + CHANCE_MARGIN:
        rec["status"] = "diverged"
        rec["reason"] = f"accuracy at chance ({rec['final']:.3f} <= 1/{classes} + {CHANCE_MARGIN})"
    elif not evaluated:
        rec["status"], rec["reason"] = "failed", f"no {key} in the rows"
    return rec


# ---------------------------------------------------------------------- statistics
def interval(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """(mean, half-width of the 95% interval by Student's t over the values); half-width None for one value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = float(np.mean(vals))
    if len(vals) < 2:
        return mean, None
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / math.sqrt(len(vals)))
    return mean, half


def summarize(spec: SweepSpec, records: list[dict], chosen: dict[str, dict], pending: frozenset = frozenset()) -> dict:
    """Per arm: the chosen setting, its tuning runs, and mean ± 95% interval over the seeds of the final metric,
    the last-3 mean, rounds to target, bytes; the arms ranked by the mean final metric."""
    arms = []
    for arm in spec.arms:
        finals = [r for r in records if r["arm"] == arm and r["phase"] == "final" and r["params"] == chosen.get(arm)
                  and r["seed"] in spec.seeds]
        finals = list({r["seed"]: r for r in finals}.values())  # the last record of each seed
        tuning = sorted((r for r in records if r["arm"] == arm and r["phase"] == "tune"),  # in the grid's order
                        key=lambda r: [(k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))
                                       for k, v in sorted(r["params"].items())])
        row: dict[str, Any] = {"arm": arm, "setting": chosen.get(arm), "seeds": len(finals), "pending": arm in pending,
                               "personalized": spec.arms[arm].personalized,
                               "at_edge": grid_edges(spec.arms[arm], chosen.get(arm)),
                               "diverged": sum(r["status"] == "diverged" for r in finals),
                               "failed": sum(r["status"] == "failed" for r in finals),
                               "tuning": [{"params": r["params"], "score": r.get("score"), "status": r["status"],
                                           "reason": r.get("reason")} for r in tuning]}
        for col in ("final", "last3", "bytes", "rounds"):
            row[col] = interval([r.get(col) for r in finals])
        row["by_seed"] = {r["seed"]: r["final"] for r in finals if r.get("final") is not None}
        for name in spec.report:
            vals = [r["report"][name][max(r["report"][name], key=int)] for r in finals
                    if r.get("report", {}).get(name)]
            row[name] = interval(vals)
        if spec.target is not None:
            reached = [r["rounds_to_target"] for r in finals if r.get("rounds_to_target") is not None]
            row["rounds_to_target"] = interval(reached)
            row["reached"] = len(reached)
        curves = [r["series"] for r in finals if r["series"]]
        rounds = sorted({int(k) for c in curves for k in c})
        row["curve"] = {k: interval([c.get(k, c.get(str(k))) for c in curves]) for k in rounds}
        arms.append(row)
    sign = 1 if spec.better_high else -1
    # the global models ranked first, then the personalized arms ranked among themselves: their score is another
    # measurement (each client's own model on its own test split), not comparable with the global model's
    arms.sort(key=lambda a: (a["personalized"], -sign * a["final"][0] if a["final"][0] is not None else math.inf))
    for group in (False, True):
        ranked = [a for a in arms if a["personalized"] is group]
        best = ranked[0] if ranked and ranked[0]["final"][0] is not None else None
        for a in ranked:
            a["overlaps_best"] = _overlap(a["final"], best["final"]) if best is not None and a is not best else None
            a["best"] = a is best
            # a seed is one partition, test split and init for every arm: the difference seed by seed removes what the
            # seeds share, so its interval is the sharper test of whether the arm differs from the best
            common = sorted(set(a["by_seed"]) & set(best["by_seed"])) if best is not None and a is not best else []
            a["paired_vs_best"] = interval([a["by_seed"][k] - best["by_seed"][k] for k in common])
    return {"sweep": spec.name, "metric": spec.metric, "higher_is_better": spec.better_high, "target": spec.target,
            "seeds": spec.seeds, "arms": arms}


def grid_edges(arm: Arm, setting: Optional[dict[str, Any]]) -> list[str]:
    """The tuned keys whose chosen value is the smallest or largest of 2 or more numeric values tried along that key
    through the chosen setting (the grids that hold its other keys' values): the best may lie beyond what was tried,
    so widen that grid."""
    if not setting:
        return []
    out = []
    for key in arm.tuned_keys:
        line: set = set()
        for grid in arm.grids:
            holds = all(isinstance(v, Range) or setting.get(k) in v for k, v in grid.items() if k != key)
            if holds and isinstance(grid.get(key), list):
                line.update(grid[key])
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in line)
        if len(line) > 1 and numeric and setting.get(key) in (min(line), max(line)):
            out.append(key)
    return out


def _overlap(a: tuple, b: tuple) -> Optional[bool]:
    if a[0] is None or b[0] is None or a[1] is None or b[1] is None:
        return None
    return a[0] - a[1] <= b[0] + b[1] and b[0] - b[1] <= a[0] + a[1]


def resolved(diff: tuple) -> bool:
    """Whether a difference (mean, 95% half-width) is resolved: its interval excludes 0."""
    mean, half = diff
    return mean is not None and half is not None and abs(mean) > half


def _paired(v: tuple) -> str:
    """The mean difference from the best over the seeds both ran, ± its 95% half-width, "resolved" as above."""
    mean, half = v
    if mean is None:
        return "—"
    return f"{mean:+.3f}" + (f" ± {half:.3f}" if half is not None else "") + (" (resolved)" if resolved(v) else "")


def _pm(v: tuple, scale: float = 1.0, digits: int = 3) -> str:
    mean, half = v
    if mean is None:
        return "—"
    return f"{mean * scale:.{digits}f}" + (f" ± {half * scale:.{digits}f}" if half is not None else "")


def render(summary: dict, spec: SweepSpec) -> str:
    """The summary as markdown: the ranked table, then each arm's tuning runs."""
    m = spec.metric
    cols = [f"final {m}", f"last-3 mean {m}"] + [f"final {n}" for n in spec.report]
    if spec.target is not None:
        cols.append(f"rounds to {spec.target:g}")
    cols += ["rounds", "MB (up + down)", "diverged", "inside the best's interval", "− the best, paired by seed"]
    lines = ["| rank | arm | setting | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    rank = {False: 0, True: 0}
    for a in summary["arms"]:
        rank[a["personalized"]] += 1
        i = rank[a["personalized"]]
        setting = ("not finished" if a["pending"] and a["setting"] is None else
                   "no setting: every tuning run diverged or failed" if a["setting"] is None else
                   ", ".join(f"{k}={_short(v)}" + (" (grid's edge)" if k in a.get("at_edge", ()) else "")
                             for k, v in a["setting"].items()) or "as given")
        cells = [_pm(a["final"]), _pm(a["last3"])] + [_pm(a[n]) for n in spec.report]
        if spec.target is not None:
            cells.append(f"{_pm(a['rounds_to_target'], digits=1)} ({a['reached']}/{a['seeds']})")
        cells += [_pm(a["rounds"], digits=0), _pm(a["bytes"], 1e-6, 1), f"{a['diverged']}/{a['seeds']}",
                  "best" if a["best"] else
                  {None: "—", True: "yes", False: "no"}[a["overlaps_best"]],
                  "best" if a["best"] else _paired(a["paired_vs_best"])]
        arm = a["arm"] + (f" ({a['seeds']} of {len(spec.seeds)} seeds so far)" if a["pending"] and a["seeds"] else "")
        lines.append(f"| {'P' if a['personalized'] else ''}{i} | {arm} | {setting} | " + " | ".join(cells) + " |")
    chosen = (f" Settings chosen by the mean validation {m} of the last {LAST} rounds (seed {spec.tune_seed})."
              if any(a.grids for a in spec.arms.values()) else "")
    lines += ["", f"Mean ± half-width of the 95% interval (Student's t) over seeds {spec.seeds}; "
              f"{'higher' if spec.better_high else 'lower'} is better; rounds: the rounds each run took (a byte "
              f"budget may stop it early).{chosen} The last column: the arm's final {m} minus the best's, seed by seed "
              f"(a seed draws the same partition, test split and init for every arm), mean ± 95% interval; "
              f"resolved: the interval excludes 0.", ""]
    if any(a.get("at_edge") for a in summary["arms"]):
        lines[-1:-1] = ["(grid's edge): the chosen value is the smallest or largest the grid tried; a better one may lie "
                        "beyond it."]
    if any(a["personalized"] for a in summary["arms"]):
        short = "acc" if m == "accuracy" else m
        lines[-1:-1] = [f"Ranks P1, P2, …: personalization methods, scored as what they deliver, each client's own "
                        f"model on its own test split (client_{short}_personal_mean, the mean over the clients; tuned "
                        f"on the clients' own validation splits under their own models). That is another test set "
                        f"and another model than the global model on the server's test split, so they are ranked "
                        f"apart and their intervals are compared with the best of their own group only."]
    tuned = [a for a in summary["arms"] if a["tuning"]]
    if tuned:
        lines += ["Tuning runs (validation score; diverged runs are never chosen):", ""]
        for a in tuned:
            runs = "; ".join(", ".join(f"{k}={_short(v)}" for k, v in t["params"].items()) + ": " +
                             (_fmt(t["score"]) if t["status"] == "ok" else f"{t['status']} ({t['reason']})")
                             for t in a["tuning"])
            lines.append(f"- {a['arm']}: {runs}")
    return "\n".join(lines) + "\n"


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def metric_bounds(metric: str) -> tuple[Optional[float], Optional[float]]:
    """The values a metric can take: a fraction (accuracy, ROUGE-L, exact match) lies in [0, 1], a loss or a
    perplexity is at least 0 (1) and unbounded above; an interval's band is drawn within them."""
    if metric.endswith("perplexity"):
        return 1.0, None
    if metric.endswith("loss"):
        return 0.0, None
    if metric.startswith(("acc", "rouge", "exact_match")):  # the fractions the tasks report
        return 0.0, 1.0
    return None, None


def _curve(a: dict) -> Optional[tuple[list[int], np.ndarray, np.ndarray]]:
    pts = sorted((int(k), v[0], v[1]) for k, v in a["curve"].items() if v[0] is not None)
    if not pts:
        return None
    return ([p[0] for p in pts], np.array([p[1] for p in pts]),
            np.array([p[2] if p[2] is not None else 0.0 for p in pts]))


def draw_curves(summary: dict, spec: SweepSpec, ax, arms: Optional[list[str]] = None,
                reference: Optional[str] = None, color: Optional[str] = None) -> bool:
    """Onto ``ax``: the mean eval_<metric> per round of every arm (or of ``arms``) with its 95% band, clipped to the
    values the metric can take (a personalized arm's client_<metric>_personal_mean, dashed); ``reference``: one
    more arm's mean, thin and grey, to read the others against. Whether anything was drawn."""
    lo, hi = metric_bounds(spec.metric)
    drawn = False
    for a in summary["arms"]:
        if a["arm"] == reference and (arms is None or reference not in arms):
            c = _curve(a)
            if c:
                ax.plot(c[0], c[1], color="grey", lw=0.9, ls=":", label=f"{reference} (mean)")
            continue
        if arms is not None and a["arm"] not in arms:
            continue
        c = _curve(a)
        if c is None:
            continue
        x, y, h = c
        personal = a.get("personalized")
        line, = ax.plot(x, y, label=a["arm"] + (" (personalized)" if personal else ""), lw=1.2,
                        ls="--" if personal else "-", color=color)
        band = (y - h, y + h) if lo is None and hi is None else (np.clip(y - h, lo, hi), np.clip(y + h, lo, hi))
        ax.fill_between(x, *band, alpha=0.12 if arms is None else 0.25, color=line.get_color())
        drawn = True
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {spec.metric}")
    ax.grid(alpha=0.3)
    return drawn


def plot(summary: dict, spec: SweepSpec, path: Path) -> Optional[Path]:
    """``curves.png``: the mean curves with their 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = draw_curves(summary, spec, ax)
    if drawn:
        ax.set_title(f"{spec.name}: mean over seeds {spec.seeds}, 95% bands")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drawn else None


def load_summary(spec: Union[str, Path], out: Union[str, Path]) -> tuple[SweepSpec, dict]:
    """(the spec, its summary) from the records in ``out`` so far, without running anything."""
    parsed, base = load_spec(spec)
    sweep = Sweep(parsed, base, Path(out)).load_records()
    return parsed, summarize(parsed, sweep.records, sweep.chosen(), frozenset(sweep.pending()))


# ---------------------------------------------------------------------- the entry point
def load_spec(spec: Union[str, Path, dict]) -> tuple[SweepSpec, str]:
    """(the spec, its base config as load_config takes it); a YAML base path is resolved against the spec's
    directory."""
    root = Path.cwd()
    if not isinstance(spec, dict):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"sweep spec {path}: no such file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"sweep spec {path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"sweep spec {path}: expected a mapping of name, base, overrides, arms, …")
        root = path.parent
    else:
        data = spec
    try:
        parsed = SweepSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"sweep spec: {where}: {err['msg']}") from None
    base = parsed.base
    if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute():
        base = str(root / base)
    return parsed, base


@dataclass
class SweepResult:
    out: Path
    records: list[dict]
    summary: dict
    chosen: dict[str, dict]


def run_sweep(spec: Union[str, Path, dict], out: Optional[Union[str, Path]] = None, parallel: int = 1,
              threads: Optional[int] = None, check_only: bool = False, log=print) -> Optional[SweepResult]:
    """Check the spec, tune every arm, run the chosen settings on every seed, write the summary."""
    parsed, base = load_spec(spec)
    sweep = Sweep(parsed, base, Path(out) if out is not None else Path("runs") / "sweeps" / parsed.name)
    sweep.check()
    if check_only:
        return None
    sweep.out.mkdir(parents=True, exist_ok=True)
    (sweep.out / "spec.yaml").write_text(yaml.safe_dump(parsed.model_dump(mode="json"), sort_keys=False))
    sweep.load_records()
    sweep.run_all(parallel, threads, log)
    return write_summary(sweep, sweep.chosen())


def write_summary(sweep: Sweep, chosen: dict[str, dict]) -> SweepResult:
    summary = summarize(sweep.spec, sweep.records, chosen, frozenset(sweep.pending()))
    (sweep.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (sweep.out / "summary.md").write_text(render(summary, sweep.spec))
    plot(summary, sweep.spec, sweep.out / "curves.png")
    return SweepResult(out=sweep.out, records=sweep.records, summary=summary, chosen=chosen)
