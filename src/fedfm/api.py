"""fedfm from Python: what the ``fedfm`` command does, for a script or a notebook (the CLI goes through here).

    import fedfm
    cfg = fedfm.load_config("bbc-lora", {"federation.rounds": 3})
    result = fedfm.run(cfg, on_round=lambda row: print(row["round"], row.get("eval_accuracy")))
    result.rows, result.run_dir

Every function raises ``fedfm.FedfmError`` (a ``ConfigError``, ``DataError``, …) with the message the CLI prints; the
CLI turns it into a non-zero exit. Nothing here prints: a run reports through its ``display`` (a
``fedfm.display.Display``: the CLI's progress bars, a tracker, the ``on_round`` callback).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .config import (RunConfig, apply_overrides, follow_optimizer, load_config as _load_file, optimizer_of, set_key,
                     validate_config)
from .display import Display, Displays
from .errors import ConfigError, FedfmError

Overrides = Union[Sequence[str], Mapping[str, Any], None]
ConfigLike = Union[str, Path, Mapping[str, Any], RunConfig]


@dataclass
class RunResult:
    """A finished run: its resolved config, its rows (``metrics.jsonl``, round 0 first when evaluated) and its run
    directory (``adapter/``, ``report/``, ``checkpoints/``)."""

    config: RunConfig
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        """The last round's row."""
        return self.rows[-1] if self.rows else {}

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(round, value)`` for every row that has ``key`` (e.g. ``eval_accuracy``)."""
        return [(r["round"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]


class OnRound(Display):
    """A Python callback per finished round: ``on_round(row)``, the row ``metrics.jsonl`` just received."""

    def __init__(self, on_round: Callable[[dict[str, Any]], Any]):
        self.on_round = on_round

    def round_end(self, row: dict) -> None:
        self.on_round(dict(row))


def _override_items(overrides: Overrides) -> list[str] | list[tuple[list[str], Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ConfigError(f"overrides: expected a list of 'key.sub=value' strings or a dict, got the string "
                          f"{overrides!r}")
    return list(overrides)


def _apply(data: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    """``key.sub=value`` strings (values read as YAML, as on the command line) or ``{"key.sub": value}`` (values
    taken as given)."""
    if isinstance(overrides, Mapping):
        before = optimizer_of(data)
        for key, value in overrides.items():
            parts = str(key).split(".")
            if not all(parts):
                raise ConfigError(f"override {key!r}: empty key part")
            set_key(data, parts, copy.deepcopy(value))
        return follow_optimizer(data, before, {str(k) for k in overrides})
    return apply_overrides(data, [str(o) for o in _override_items(overrides)])


def load_config(config: ConfigLike = "bbc-lora", overrides: Overrides = None) -> RunConfig:
    """A validated run config from a built-in name (``fedfm configs``), a YAML file, a dict of sections or a
    ``RunConfig``, with overrides (``["client.lr=0.01"]`` or ``{"client.lr": 0.01}``) applied."""
    if isinstance(config, RunConfig):
        data = config.model_dump(mode="json")
    elif isinstance(config, Mapping):
        data = copy.deepcopy(dict(config))
    elif isinstance(config, (str, Path)):
        if not isinstance(overrides, Mapping):
            return _load_file(str(config), [str(o) for o in _override_items(overrides)])
        data = _load_file(str(config)).model_dump(mode="json")
    else:
        raise ConfigError(f"config: expected a built-in config name, a YAML file, a dict or a RunConfig, got "
                          f"{type(config).__name__}")
    return validate_config(_apply(data, overrides))


# What a run's trained parameters are made from: resuming with any of these changed is refused, naming the key. Only
# where and how they are computed may change.
_RESUME_SAME = ("model", "adapter", "task.name")
_RESUME_MAY_CHANGE = ("model.device", "model.autocast", "model.gradient_checkpointing")


def _flat(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, sub in obj.items() for k, v in _flat(sub, f"{prefix}.{key}").items()} or {prefix: {}}
    return {prefix: obj}


def _check_unchanged(saved: RunConfig, cfg: RunConfig, run: Path) -> None:
    """Resuming with a key of ``_RESUME_SAME`` changed from the run's own config.yaml: refused before anything
    loads, naming the key (the checkpoint's parameters would not fit the model the config builds)."""
    old, new = saved.model_dump(mode="json"), cfg.model_dump(mode="json")
    for section in _RESUME_SAME:
        first = section.partition(".")[0]
        was, now = _flat(old[first], first), _flat(new[first], first)
        for key in dict.fromkeys([*was, *now]):
            if key.startswith(section) and not key.startswith(_RESUME_MAY_CHANGE) and was.get(key) != now.get(key):
                raise FedfmError(f"--resume: {key} is {now.get(key)!r} here but {was.get(key)!r} in {run}/config.yaml, "
                                 f"which the run's checkpoints were trained with; resume without changing {key}, or "
                                 f"start a new run (another output.dir)")


def resume_config(run_dir: str | Path, overrides: Overrides = None) -> RunConfig:
    """The config a resumed run continues with: the run's own ``config.yaml`` and ``output.dir`` with overrides that
    may change only how the run is computed (not its model, adapter or task: refused, naming the key)."""
    from .tracking import RunDir

    run_dir = Path(run_dir)
    RunDir(run_dir).check_resumable()
    cfg_path = str(run_dir / "config.yaml")
    saved = load_config(cfg_path, [f"output.dir={run_dir}"])
    data = _apply(saved.model_dump(mode="json"), overrides)
    data["output"]["dir"] = str(run_dir)
    cfg = validate_config(data)
    _check_unchanged(saved, cfg, run_dir)
    return cfg


def run(config: ConfigLike = "bbc-lora", overrides: Overrides = None, *,
        on_round: Optional[Callable[[dict[str, Any]], Any]] = None, display: Optional[Display] = None,
        overwrite: bool = False, report: bool = True) -> RunResult:
    """Run a federation (a simulation on this machine, or the driver its algorithm names) into ``output.dir``.

    ``on_round(row)`` is called after every round with the row just logged. ``overwrite`` replaces an earlier
    fedfm run in ``output.dir`` (only once the new run has loaded; otherwise an existing run is refused). ``report``
    draws ``report/`` at the end (a plot that fails to draw is said through ``display.message``)."""
    cfg = load_config(config, overrides)
    return _execute(cfg, resume=False, overwrite=overwrite, on_round=on_round, display=display, report=report)


def resume(run_dir: str | Path, overrides: Overrides = None, *,
           on_round: Optional[Callable[[dict[str, Any]], Any]] = None, display: Optional[Display] = None,
           report: bool = True) -> RunResult:
    """Continue the run in ``run_dir`` after its last good checkpoint, bit for bit as if it had not stopped."""
    cfg = resume_config(run_dir, overrides)
    return _execute(cfg, resume=True, overwrite=False, on_round=on_round, display=display, report=report)


def _execute(cfg: RunConfig, *, resume: bool, overwrite: bool, on_round, display: Optional[Display],
             report: bool) -> RunResult:
    from .federation import begin, open_run_dir
    from .simulation import Simulation, driver_of, prepare
    from .tracking import RunDir
    from .tracking.sinks import open_sinks

    run_dir = RunDir(cfg.output_dir())
    callback = OnRound(on_round) if on_round is not None else None

    def warn(text: str) -> None:
        Displays(display, callback).message(f"warning: {text}")

    driver = driver_of(cfg)
    if driver is not None:  # clients that run different models (fedmd, continual stages): the algorithm's driver
        if resume:
            chosen_by = "continual.stages" if cfg.continual.stages else f"client.algorithm {cfg.client.algorithm!r}"
            raise FedfmError(f"--resume: {chosen_by} runs in {driver.__module__}.{driver.__name__}, which does not "
                             f"resume from checkpoints; start a new run (another output.dir or --overwrite)")
        open_run_dir(run_dir, False, overwrite, warn)  # touches nothing
        prepared = driver.prepare(cfg)  # data + config checks, before any model loads
        desc = prepared.data.describe()
        # tracking.sinks: a store that cannot be used is refused here; the MLflow run ends FINISHED, FAILED or KILLED
        with open_sinks(cfg, run_dir, False) as sinks:
            shown = Displays(display, sinks, callback)
            shown.partition(desc)
            fed = driver(prepared, display=shown, run_dir=run_dir)  # builds the models; writes nothing yet
            run_dir.create(overwrite=overwrite)
            run_dir.write_config(cfg.to_yaml())
            run_dir.write_json("partition.json", desc)
            with run_dir.writing():
                fed.run(initial=cfg.eval.initial)
            sinks.finish(run_dir)  # the rows this driver logs (metrics.jsonl), the config, as the trackers' artifacts
        return RunResult(cfg, run_dir.path, run_dir.read_metrics())

    ck = open_run_dir(run_dir, resume, overwrite, warn)  # touches nothing; a checkpoint read before the model
    prepared = prepare(cfg)  # data + config checks, before any model loads
    desc = prepared.data.describe()
    with open_sinks(cfg, run_dir, resume) as sinks:  # as above
        shown = Displays(display, sinks, callback)
        shown.partition(desc)
        server = Simulation(prepared, run_dir, shown)  # builds the model; writes nothing into the run directory
        begin(server, run_dir, ck, resume, overwrite, warn, say=shown.message)
        run_dir.write_json("partition.json", desc)
        if prepared.synthetic is not None:  # data.synthetic: the generated rows, and which clients got each
            run_dir.write_text("synthetic.jsonl", prepared.synthetic.jsonl())
        with run_dir.writing():  # a full disk anywhere in the run: one line, too
            server.run()
        if report:
            _draw_report(run_dir.path, shown)
        sinks.finish(run_dir)  # the adapter, the report, the config as the trackers' artifacts
    return RunResult(cfg, run_dir.path, run_dir.read_metrics())


def _draw_report(path: Path, display: Display) -> None:
    from .errors import DiskFull
    from .tracking.report import make_report

    try:
        make_report(path)
    except DiskFull:
        raise
    except Exception as e:  # a plot failing must not hide a finished run
        display.message(f"report not drawn: {e}")


def builtin_configs() -> dict[str, str]:
    """The built-in configs (``fedfm.load_config(name)``), each with the first line of its description."""
    from .config import builtin_configs as files

    out = {}
    for name, path in sorted(files().items()):
        lines = path.read_text().splitlines()
        out[name] = lines[0].lstrip("# ").strip() if lines else ""
    return out


def privacy_guarantee(config: ConfigLike = "bbc-lora", overrides: Overrides = None) -> list[tuple[str, str]]:
    """The privacy a config would give, without training: (quantity, value) pairs — what it protects, ε at δ, the
    sampling, the noise multiplier z, the clip and the accountant. Reads and partitions the data (the accountant
    needs N and n_k); loads no model."""
    from .simulation import prepare

    cfg = load_config(config, overrides)
    if cfg.privacy.mode == "none":
        raise FedfmError("privacy.mode is 'none': this config gives no differential-privacy guarantee (set "
                         "privacy.mode=client or sample, with privacy.noise_multiplier or privacy.target_epsilon)")
    prepared = prepare(cfg)  # reads and partitions the data (the accountant needs N and n_k); loads no model
    p, R = cfg.privacy, cfg.federation.rounds
    derived = "" if p.noise_multiplier is not None else " (derived from privacy.target_epsilon)"
    if cfg.privacy.mode == "client":
        m = prepared.mechanism
        rows = [("protects", "one client's whole data"), ("epsilon", f"{m.epsilon(R, p.delta):.4g}"),
                ("delta", f"{p.delta:g}"), ("rounds", str(R)),
                ("client sampling", f"{m.sampling}: q = {m.q:.4g} ({m.per_round} of {m.num_clients})"),
                ("noise multiplier z", f"{m.noise_multiplier:.4g}{derived}"),
                ("clip C", f"{p.clip:g}" + (" (adaptive)" if p.target_quantile is not None else "")),
                ("accountant", f"dp-accounting {m.accountant.upper()}")]
    else:
        sd = prepared.sample_dp
        qs = [sd.rate(k) for k in range(len(sd.sizes))]
        rows = [("protects", "one training example of a client"),
                ("epsilon (worst client)", f"{sd.worst_epsilon(R, p.delta):.4g} if sampled in every round"),
                ("delta", f"{p.delta:g}"), ("rounds", str(R)),
                ("example sampling", f"poisson per step: q_k = {min(qs):.4g} … {max(qs):.4g} "
                                     f"(B = {cfg.client.batch_size}, n_k = {int(sd.sizes.min())} … {int(sd.sizes.max())})"),
                ("steps per round", f"{int(sd.steps.min())} … {int(sd.steps.max())}"),
                ("noise multiplier z", f"{sd.noise_multiplier:.4g}{derived}"),
                ("per-example clip C", f"{p.clip:g}"), ("accountant", f"dp-accounting {p.accountant.upper()}")]
    return rows


def sweep(spec: str | Path | Mapping[str, Any], out: str | Path | None = None, *, parallel: int = 1,
          threads: Optional[int] = None, check_only: bool = False, log: Callable[[str], Any] = lambda _m: None):
    """A fair comparison (docs/sweeps.md): every arm of ``spec`` (a YAML file or a dict) tuned on the clients'
    validation splits, its best setting run on every seed, the summary (mean and 95% interval) written to ``out``
    (default ``runs/sweeps/<name>``). Runs already recorded there are not run again. Everything is checked before
    anything trains (``ConfigError`` naming the key); ``check_only`` stops there and returns None. ``parallel`` runs
    at once, each with ``threads`` torch threads; ``log`` is told each run as it ends."""
    from .tuning import run_sweep

    return run_sweep(dict(spec) if isinstance(spec, Mapping) else spec, out, parallel=parallel, threads=threads,
                     check_only=check_only, log=log)


def report(run_dir: str | Path) -> list[Path]:
    """Draw the run's plots and ``summary.md`` into ``run_dir/report/``; the PNGs' paths."""
    from .tracking.report import make_report

    return make_report(run_dir)


def export(run_dir: str | Path, out: str | Path, merge: bool = False) -> Path:
    """Write the run's adapter to ``out``, or (``merge``) a model merged with it that plain transformers loads."""
    from .trained import export_run

    return export_run(run_dir, out, merge=merge)


def generate(run_dir: str | Path, question: str, max_new_tokens: int = 64) -> str:
    """The run's federated model answering ``question`` (instruction runs; lm runs continue the text), greedy."""
    from .trained import answer

    return answer(run_dir, question, max_new_tokens)
