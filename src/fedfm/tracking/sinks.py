"""Tracker sinks (``tracking.sinks``): a run's rounds also go where people already look, TensorBoard and MLflow.

A sink is a ``Display``: ``round_end(row)`` logs the row's numbers at step = ``row["round"]`` (``scalars``),
``finish(run_dir)`` adds what the run left (the adapter, the report, the config, metrics.jsonl) once the report is
drawn, and ``close`` ends it. Each sink keeps, in the run directory's ``tracking.json``, where it writes and the last
round it logged, so ``fedfm run --resume`` continues the same TensorBoard log and the same MLflow run: a round is
never logged twice, and one the interrupted run never logged (a row of metrics.jsonl) is logged when the sink starts.
Their packages (``pip install "fedfm[tracking]"``) are imported only when a sink is chosen.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from ..display import Display, Displays
from ..errors import ConfigError, FedfmError
from ..registry import Registry
from . import RunDir

RECORD = "tracking.json"
INSTALL = 'pip install "fedfm[tracking]"'


def scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A metrics row as named numbers: numbers as they are, a mapping's entries as ``key/sub`` (``client_acc/3``),
    a list as its length (``clients``: how many were sampled; ``dropped``: how many dropped); strings and nulls are
    left out, and so is ``round`` (the step)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if not prefix and key == "round":
            continue
        if isinstance(value, (bool, int, float)):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            out[name] = float(len(value))
    return out


def flat_config(cfg) -> dict[str, str]:
    """The resolved config as ``section.key`` -> text (a string as it is, anything else as JSON): MLflow's params."""
    def walk(obj: Any, prefix: str) -> dict[str, Any]:
        if isinstance(obj, dict) and obj:
            return {k: v for key, sub in obj.items() for k, v in walk(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: obj}

    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in walk(cfg.model_dump(mode="json"), "").items()}


class Record:
    """``tracking.json`` in the run directory: one entry per sink (where it writes, its last logged round). Read
    when resuming; written once the run directory exists (after ``begin``), never before."""

    def __init__(self, run_dir: RunDir, resume: bool):
        self.run_dir = run_dir
        path = run_dir.path / RECORD
        self.data: dict[str, dict[str, Any]] = {}
        if resume and path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except ValueError:
                raise FedfmError(f"{path} is not JSON; fedfm wrote it to continue the run's trackers: restore it, or "
                                 f"remove it to start new ones") from None

    def get(self, sink: str) -> dict[str, Any]:
        return self.data.setdefault(sink, {})

    def save(self) -> None:
        self.run_dir.write_json(RECORD, self.data)


class Sink(Display):
    """One tracker. Subclasses write with ``_start`` (once the run directory exists), ``_log(step, scalars)``,
    ``_artifacts(run_dir)`` and ``_close(status)``."""

    name = ""
    package = ""  # the import it needs

    def __init__(self, cfg, run_dir: RunDir, resume: bool, record: Record):
        self.cfg, self.run_dir, self.resume, self.record = cfg, run_dir, resume, record
        self.entry = record.get(self.name)
        self.logged_through = int(self.entry.get("logged_through", -1)) if resume else -1
        self.started = False

    @classmethod
    def check_config(cls, cfg) -> None:
        """Called when a config naming this sink is validated: its package must be there."""
        if importlib.util.find_spec(cls.package) is None:
            raise ValueError(f"tracking.sinks: {cls.name!r} needs the {cls.package} package, which is not "
                             f"installed: {INSTALL}")

    def start(self) -> None:
        """Once the run directory is there (the first round's callback): open the writer, then log the rows of
        metrics.jsonl this sink has not logged yet (a resumed run's, or a driver's that logs no rounds live)."""
        if self.started:
            return
        self.started = True
        rows = self.run_dir.read_metrics()
        self._start(rows)
        for row in rows:
            self._take(row)
        self.record.save()

    def round_start(self, rnd: int, total: int, n_clients: int) -> None:
        self.start()

    def round_end(self, row: dict) -> None:
        self.start()
        if self._take(row):
            self.record.save()

    def _take(self, row: dict) -> bool:
        step = int(row.get("round", self.logged_through + 1))
        if step <= self.logged_through:  # logged before this run was interrupted and resumed
            return False
        self._log(step, scalars(row))
        self.logged_through = self.entry["logged_through"] = step
        return True

    def finish(self, run_dir) -> None:
        self.start()
        self._artifacts(RunDir(getattr(run_dir, "path", run_dir)))

    def close(self, error: Optional[BaseException] = None) -> None:
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self._close(status)

    def _start(self, rows: list[dict[str, Any]]) -> None: ...
    def _log(self, step: int, values: dict[str, float]) -> None: ...
    def _artifacts(self, run_dir: RunDir) -> None: ...
    def _close(self, status: str) -> None: ...


SINKS: Registry[type[Sink]] = Registry("tracking sink")


@SINKS.register("tensorboard")
class TensorBoardSink(Sink):
    """TensorBoard event files in ``tracking.tensorboard_dir`` (default ``<run dir>/tensorboard``), through
    ``torch.utils.tensorboard.SummaryWriter``: each number of a round's row as a scalar at step = round, the config
    and, at the end, the report's summary as text. Resumed, the steps after the last row kept in metrics.jsonl are
    purged (TensorBoard hides what an interrupted run wrote after its last checkpoint)."""

    name, package = "tensorboard", "tensorboard"

    def __init__(self, cfg, run_dir: RunDir, resume: bool, record: Record):
        super().__init__(cfg, run_dir, resume, record)
        t = cfg.tracking
        self.dir = Path(t.tensorboard_dir).absolute() if t.tensorboard_dir else run_dir.path.absolute() / "tensorboard"
        existing = next(p for p in (self.dir, *self.dir.parents) if p.exists())  # checked, nothing made yet
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"tracking.tensorboard_dir: {self.dir} cannot be written ({existing} is not a writable "
                              f"directory)")
        self.writer = None

    def _start(self, rows: list[dict[str, Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        kept = max((int(r.get("round", 0)) for r in rows), default=-1)
        purge = None
        if self.resume and self.logged_through > kept:  # steps past the checkpoint: hidden, and logged again
            purge, self.logged_through = kept + 1, kept
        self.writer = SummaryWriter(str(self.dir), purge_step=purge)
        first = "dir" not in self.entry  # this run's first events here (a resumed run may add the sink)
        self.entry["dir"] = str(self.dir)
        if first:
            text = "\n".join("    " + line for line in self.cfg.to_yaml().splitlines())  # markdown: a code block
            self.writer.add_text("config", text, global_step=0)

    def _log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # seen while the run goes on

    def _artifacts(self, run_dir: RunDir) -> None:
        summary = run_dir.report / "summary.md"
        if summary.is_file():
            self.writer.add_text("summary", summary.read_text(), global_step=self.logged_through)
        self.writer.flush()

    def _close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


def default_mlflow_uri() -> str:
    """MLflow's own default store, made absolute: ``mlflow.db`` in the working directory (beside ``runs/``), where
    ``mlflow ui`` started there looks."""
    return f"sqlite:///{Path.cwd().absolute() / 'mlflow.db'}"


@SINKS.register("mlflow")
class MlflowSink(Sink):
    """An MLflow run (``MlflowClient``; mlflow-skinny suffices) in experiment ``tracking.mlflow_experiment`` at
    ``tracking.mlflow_uri``: the resolved config as its parameters, each number of a round's row as a metric at
    step = round, and at the end the adapter (or model), the report, config.yaml and metrics.jsonl as artifacts.
    Resumed, it continues the run recorded in tracking.json: a round is logged once it is checkpointed, so one that
    an interrupted run does again is logged once, with the values metrics.jsonl keeps."""

    name, package = "mlflow", "mlflow"
    FINISHED = "FINISHED"
    MAX_PARAM = 6000  # MLflow's limit on a parameter's value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
    MAX_BATCH = 1000  # metrics per log_batch (MAX_METRICS_PER_BATCH)

    def __init__(self, cfg, run_dir: RunDir, resume: bool, record: Record):
        super().__init__(cfg, run_dir, resume, record)
        from mlflow.tracking import MlflowClient

        t, was = cfg.tracking, self.entry if resume else {}
        self.uri = t.mlflow_uri or was.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri()
        self._answers()
        self.client = self._call("cannot be opened", MlflowClient, tracking_uri=self.uri)
        if was.get("run_id"):
            self.run_id = was["run_id"]
            self._continue(self._call(f"has no run {self.run_id} (recorded in {run_dir.path / RECORD})",
                                      self.client.get_run, self.run_id))
        else:
            self.run_id = self._new_run(t.mlflow_experiment or cfg.name)
            self.logged_through = -1
        self.entry.update(uri=self.uri, run_id=self.run_id)
        self.pending: list[dict[str, Any]] = []

    # MLflow cannot take a metric's value back, so a round is logged once it is checkpointed (a moment after its
    # row, before the next round starts): a round an interrupted run must do again was never logged.
    def _take(self, row: dict) -> bool:
        last = int(self.pending[-1]["round"]) if self.pending else self.logged_through
        if int(row.get("round", last + 1)) > last:
            self.pending.append(row)
        return self._flush(self._checkpointed())

    def _checkpointed(self) -> int:
        """The last round a resumed run would not do again (round 0 is never checkpointed: safe once round 1 is)."""
        cks = self.run_dir.list_checkpoints()
        last = int(cks[-1].stem.split("_")[1]) if cks else -1
        return last if last >= 1 else -1

    def _flush(self, through: Optional[int]) -> bool:
        """Log the held rows up to round ``through`` (None: all, the run being over)."""
        logged = False
        while self.pending and (through is None or int(self.pending[0].get("round", 0)) <= through):
            logged = super()._take(self.pending.pop(0)) or logged
        return logged

    def round_start(self, rnd: int, total: int, n_clients: int) -> None:
        self.start()
        if self._flush(self._checkpointed()):
            self.record.save()

    def finish(self, run_dir) -> None:
        self.start()
        if self._flush(None):
            self.record.save()
        super().finish(run_dir)

    def _answers(self, timeout_s: float = 10.0) -> None:
        """A tracking server that does not answer is refused at once (MLflow's own client retries for minutes)."""
        from urllib.error import HTTPError, URLError
        from urllib.parse import urlparse
        from urllib.request import urlopen

        if urlparse(self.uri).scheme not in ("http", "https"):
            return
        try:
            urlopen(f"{self.uri.rstrip('/')}/health", timeout=timeout_s).close()
        except HTTPError:  # it answered (a proxy's 401 or 404 too): MLflow's calls say the rest
            pass
        except (URLError, OSError) as e:
            raise FedfmError(f"tracking.mlflow_uri: the MLflow tracking server {self.uri} does not answer within "
                             f"{timeout_s:g} s ({getattr(e, 'reason', e)})") from None

    def _call(self, what: str, fn, *args, **kwargs):
        """A call to the tracking store; its failure is one line naming ``tracking.mlflow_uri`` and the store."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # the store's own errors: MlflowException, requests', sqlalchemy's, OSError
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            if isinstance(e, ImportError):  # a database store without sqlalchemy or alembic
                reason += f" ({INSTALL})"
            raise FedfmError(f"tracking.mlflow_uri: the MLflow tracking store {self.uri} {what}: {reason}") from None

    def _new_run(self, experiment: str) -> str:
        from mlflow.entities import Param

        from . import _fedfm_version

        exp = self._call("cannot be read", self.client.get_experiment_by_name, experiment)
        if exp is not None and exp.lifecycle_stage == "deleted":
            raise FedfmError(f"tracking.mlflow_experiment: experiment {experiment!r} at {self.uri} is deleted; "
                             f"restore it or name another")
        exp_id = exp.experiment_id if exp is not None else \
            self._call("cannot be written", self.client.create_experiment, experiment)
        run = self._call("cannot be written", self.client.create_run, exp_id, run_name=self.run_dir.path.name,
                         tags={"fedfm.version": _fedfm_version(), "fedfm.run_dir": str(self.run_dir.path.absolute()),
                               "fedfm.config": self.cfg.name})
        params = [Param(k, self._param(v)) for k, v in flat_config(self.cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self._call("cannot be written", self.client.log_batch, run.info.run_id, params=params[i:i + 100])
        return run.info.run_id

    def _param(self, value: str) -> str:
        marker = "…[truncated]"
        return value if len(value) <= self.MAX_PARAM else value[:self.MAX_PARAM - len(marker)] + marker

    def _continue(self, run) -> None:
        """The same run, running again; a key whose value changed on resume (MLflow keeps a param's first value)
        becomes a tag ``fedfm.resumed.<key>``."""
        from mlflow.entities import Param, RunTag

        now = {k: self._param(v) for k, v in flat_config(self.cfg).items()}
        new = [Param(k, v) for k, v in now.items() if k not in run.data.params]
        changed = [RunTag(f"fedfm.resumed.{k}", v) for k, v in now.items()
                   if k in run.data.params and run.data.params[k] != v]
        self._call("cannot be written", self.client.update_run, self.run_id, status="RUNNING")
        for i in range(0, max(len(new), len(changed)), 100):
            self._call("cannot be written", self.client.log_batch, self.run_id, params=new[i:i + 100],
                       tags=changed[i:i + 100])

    def _log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        metrics = [Metric(self.metric_name(k), v, ms, step) for k, v in values.items()]
        for i in range(0, len(metrics), self.MAX_BATCH):
            self._call("cannot be written", self.client.log_batch, self.run_id, metrics=metrics[i:i + self.MAX_BATCH])

    @staticmethod
    def metric_name(key: str) -> str:
        """``key`` with each character MLflow refuses in a metric's name (e.g. from a client's name) as ``_``."""
        return re.sub(r"[^\w\-. :/]", "_", key)

    def _artifacts(self, run_dir: RunDir) -> None:
        for sub in ("adapter", "model", "report"):
            if (run_dir.path / sub).is_dir():
                self._call("cannot take artifacts", self.client.log_artifacts, self.run_id, str(run_dir.path / sub),
                           artifact_path=sub)
        for name in ("config.yaml", "metrics.jsonl", "partition.json"):
            if (run_dir.path / name).is_file():
                self._call("cannot take artifacts", self.client.log_artifact, self.run_id, str(run_dir.path / name))

    def _close(self, status: str) -> None:
        if self.started and self._flush(None if status == self.FINISHED else self._checkpointed()):
            self.record.save()
        self._call("cannot be written", self.client.set_terminated, self.run_id, status=status)


class Sinks(Displays):
    """The chosen sinks as one display, with ``finish`` and ``close``; none chosen: it does nothing."""

    def finish(self, run_dir) -> None:
        for sink in self.displays:
            sink.finish(run_dir)

    closed = False

    def __enter__(self) -> "Sinks":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Ended with the block: FINISHED, or FAILED/KILLED with the error that left it."""
        self.close(error)

    def close(self, error: Optional[BaseException] = None) -> None:
        """End every sink once (an MLflow run as FINISHED, or FAILED/KILLED with the run's ``error``). A sink that
        fails to close is raised after all were tried, unless the run already failed (its error is the one to see)."""
        if self.closed:
            return
        self.closed = True
        first = None
        for sink in self.displays:
            try:
                sink.close(error)
            except Exception as e:
                first = first or e
        if first is not None and error is None:
            raise first


def open_sinks(cfg, run_dir, resume: bool) -> Sinks:
    """The sinks ``tracking.sinks`` names, opened (a tracking store that cannot be reached or written is an error
    here, before any round): call it before the run's first round; nothing is written into the run directory until
    its first round. ``run_dir``: a ``RunDir`` or its path."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    record = Record(run_dir, resume) if cfg.tracking.sinks else None
    opened: list[Sink] = []
    try:
        for name in cfg.tracking.sinks:
            kind = SINKS.get(name)
            try:
                opened.append(kind(cfg, run_dir, resume, record))
            except ImportError as e:
                raise ConfigError(f"tracking.sinks: {name!r} needs the {kind.package} package ({e}): "
                                  f"{INSTALL}") from None
    except BaseException as e:
        Sinks(*opened).close(e)
        raise
    return Sinks(*opened)
