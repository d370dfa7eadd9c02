"""tracking.sinks: every round of a tiny run read back from TensorBoard's event files and from the MLflow run, and
compared with metrics.jsonl; resume continues the same MLflow run; bad names and stores are refused up front."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import fedfm.cli as cli
from fedfm.cli import app
from fedfm.errors import ConfigError

from tests.conftest import tiny_overrides

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from fedfm.tracking.sinks import scalars  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow database for the module (creating its tables takes seconds); each test its own experiment."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def in_store(store, monkeypatch):
    """The working directory is the store's: the default tracking URI (sqlite:///<cwd>/mlflow.db) and MLflow's
    default artifact root (./mlruns) land there."""
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(cli.console, "_width", 1000)
    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def run(tiny_csv, tmp_path, **overrides):
    """``fedfm run`` of the tiny config with both sinks."""
    ov = tiny_overrides(tiny_csv, tmp_path, **{"tracking.sinks": ["tensorboard", "mlflow"], **overrides})
    return CliRunner().invoke(app, ["run", "bbc-lora", *ov])


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_history(client, run_id, keys) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def expected(rows) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for k, v in scalars(row).items():
            out.setdefault(k, []).append((row["round"], v))
    return out


def test_scalars_of_a_row():
    row = {"round": 3, "clients": [0, 2, 5], "dropped": [{"id": 5, "error": "boom"}], "bytes_up": 120,
           "eval_accuracy": 0.5, "client_acc": {"0": 0.25, "2": 1.0}, "note": "text", "epsilon": None,
           "client_stats": [{"id": 0, "examples": 9}, {"id": 2, "examples": 4}]}
    assert scalars(row) == {"clients": 3.0, "dropped": 1.0, "bytes_up": 120.0, "eval_accuracy": 0.5,
                            "client_acc/0": 0.25, "client_acc/2": 1.0, "client_stats": 2.0}


def test_the_sinks_files_in_a_run_directory_are_fedfms():
    from fedfm.tracking import owned

    assert owned("tracking.json") and owned("tensorboard/events.out.tfevents.1764500000.host-1.4242.0")
    assert not owned("tensorboard/notes.txt") and not owned("tensorboard/sub/events.out.tfevents.1.h.2.0")


def test_mlflow_metric_names_keep_what_mlflow_allows():
    from fedfm.tracking.sinks import MlflowSink

    assert MlflowSink.metric_name("client_acc/site 1:a.b-c") == "client_acc/site 1:a.b-c"
    assert MlflowSink.metric_name("client_acc/x(y)") == "client_acc/x_y_"


def test_a_run_logs_every_round_to_tensorboard_and_mlflow(tiny_csv, tmp_path, in_store, store):
    res = run(tiny_csv, tmp_path, **{"eval.initial": True, "tracking.mlflow_experiment": "every-round"})
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    want = expected(rows)
    assert {"eval_accuracy", "train_loss", "clients", "bytes_up", "client_stats"} <= set(want)
    assert any(k.startswith("client_acc/") for k in want)

    tb = tensorboard_scalars(run_dir / "tensorboard")
    assert set(tb) == set(want)
    for k, points in want.items():  # TensorBoard keeps float32
        assert tb[k] == [(s, float(np.float32(v))) for s, v in points], k

    record = json.loads((run_dir / "tracking.json").read_text())
    run_id = record["mlflow"]["run_id"]
    assert record["mlflow"]["uri"] == f"sqlite:///{store / 'mlflow.db'}"  # the default: the working directory's
    mr = in_store.get_run(run_id)
    assert mr.info.status == "FINISHED"
    assert in_store.get_experiment(mr.info.experiment_id).name == "every-round"
    assert mr.data.params["client.lr"] == "0.01" and mr.data.params["federation.rounds"] == "2"
    assert mr.data.params["tracking.sinks"] == '["tensorboard", "mlflow"]'
    assert mr.data.tags["fedfm.run_dir"] == str(run_dir.absolute())
    assert set(mr.data.metrics) == set(want)
    assert mlflow_history(in_store, run_id, want) == want  # exact: MLflow keeps doubles
    top = {a.path for a in in_store.list_artifacts(run_id)}
    assert {"adapter", "report", "config.yaml", "metrics.jsonl"} <= top
    assert "report/summary.md" in {a.path for a in in_store.list_artifacts(run_id, "report")}
    assert "adapter/adapter_model.safetensors" in {a.path for a in in_store.list_artifacts(run_id, "adapter")}

    from fedfm.tracking import owned  # the sinks' files in the run directory are fedfm's (--overwrite removes them)
    files = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()]
    assert "tracking.json" in files and any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
    assert [f for f in files if not owned(f)] == []


def test_resume_continues_the_same_mlflow_run_without_a_step_twice(tiny_csv, tmp_path, in_store, monkeypatch):
    from fedfm.errors import DiskFull
    from fedfm.tracking import RunDir

    save = RunDir.save_checkpoint

    def full_at_round_2(self, rnd, state, keep):  # round 2's row is logged, its checkpoint cannot be written
        if rnd == 2:
            raise DiskFull("disk full: could not write round_0002.pt")
        return save(self, rnd, state, keep)

    monkeypatch.setattr(RunDir, "save_checkpoint", full_at_round_2)
    first = run(tiny_csv, tmp_path, **{"tracking.mlflow_experiment": "resumed"})
    assert first.exit_code != 0 and "disk full" in first.output, first.output
    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    run_dir = tmp_path / "run"
    assert [r["round"] for r in metrics(run_dir)] == [1, 2]
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    assert in_store.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in in_store.get_metric_history(run_id, "eval_accuracy")] == [1]  # round 2: not checkpointed

    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "federation.rounds=3"])
    assert res.exit_code == 0, res.output
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    want = expected(rows)

    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    mr = in_store.get_run(run_id)
    assert mr.info.status == "FINISHED"
    assert mr.data.params["federation.rounds"] == "2" and mr.data.tags["fedfm.resumed.federation.rounds"] == "3"
    got = mlflow_history(in_store, run_id, want)
    assert {k: [s for s, _ in v] for k, v in got.items()} == {k: [1, 2, 3] for k in want}  # each step once
    assert got == want
    assert len(in_store.search_runs([mr.info.experiment_id])) == 1

    tb = tensorboard_scalars(run_dir / "tensorboard")  # the interrupted round 2 purged, logged again
    for k, points in want.items():
        assert tb[k] == [(s, float(np.float32(v))) for s, v in points], k


@pytest.mark.parametrize("where", ["under a file", "a server that is not there"])
def test_an_unusable_mlflow_store_stops_the_run_before_it_starts(tiny_csv, tmp_path, in_store, where):
    (tmp_path / "afile").write_text("not a directory")
    uri = f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}" if where == "under a file" else "http://127.0.0.1:9"
    res = run(tiny_csv, tmp_path, **{"tracking.mlflow_uri": uri})
    assert res.exit_code != 0
    text = " ".join(res.output.split())
    assert "tracking.mlflow_uri" in text and uri in text, text
    assert not (tmp_path / "run").exists()  # the run directory was not begun


def test_sink_names_are_checked_with_the_config(tiny_csv, tmp_path, monkeypatch):
    from fedfm.config import load_config

    with pytest.raises(ConfigError, match=r"tracking\.sinks\[1\]: unknown tracking sink 'tensorbored'; expected one "
                                          r"of: mlflow, tensorboard \(did you mean 'tensorboard'\?\)"):
        load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path, **{"tracking.sinks": ["mlflow", "tensorbored"]}))
    with pytest.raises(ConfigError, match=r"tracking\.sinks: 'mlflow' given more than once"):
        load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path, **{"tracking.sinks": ["mlflow", "mlflow"]}))
    assert load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path)).tracking.sinks == []

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'mlflow' needs the mlflow package.*pip install \"fedfm\[tracking\]\""):
        load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path, **{"tracking.sinks": ["mlflow"]}))


def test_no_sinks_is_a_display_that_does_nothing(tiny_config, tmp_path):
    from fedfm.tracking.sinks import Sinks, open_sinks

    sinks = open_sinks(tiny_config(), tmp_path / "run", resume=False)
    assert isinstance(sinks, Sinks) and sinks.displays == []
    sinks.round_end({"round": 1, "eval_accuracy": 0.5})
    sinks.finish(tmp_path / "run")
    sinks.close()
    assert not (tmp_path / "run").exists()


def test_a_deployments_server_side_logs_the_same(tmp_path, in_store, monkeypatch):
    """deploy.flower.serve with the sinks: its rounds (clients answered by fedfm's ClientApp, in process) reach MLflow
    and TensorBoard as metrics.jsonl has them."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from fedfm.config import load_config
    from fedfm.deploy.flower import serve
    from tests.conftest import make_rows
    from tests.deploy.test_secagg import InProcessGrid, site_nodes

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as Flower sets in a ServerApp
        monkeypatch.setattr(TaskIdentity, name, value)
    nodes = site_nodes(tmp_path, make_rows(n=120, seed=3, sites=2), 2, first_node=10)
    cfg = load_config("bbc-lora", tiny_overrides(tmp_path / "no-data.csv", tmp_path, **{
        "partition.num_clients": 2, "federation.clients_per_round": 2, "federation.rounds": 2,
        "tracking.sinks": ["mlflow", "tensorboard"], "tracking.mlflow_experiment": "deployed"}))
    serve(InProcessGrid(nodes), {"fedfm-config": cfg.to_yaml()})

    run_dir = tmp_path / "run"
    want = expected(metrics(run_dir))
    assert "train_loss" in want and [s for s, _ in want["train_loss"]] == [1, 2]
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    assert in_store.get_run(run_id).info.status == "FINISHED"
    assert mlflow_history(in_store, run_id, want) == want
    assert "adapter" in {a.path for a in in_store.list_artifacts(run_id)}
    tb = tensorboard_scalars(run_dir / "tensorboard")
    assert {k: [s for s, _ in v] for k, v in tb.items()} == {k: [s for s, _ in v] for k, v in want.items()}
    # the dashboard reads a deployment's server-side run directory as it reads a simulation's
    from fedfm.dashboard.state import RunState

    page = RunState(run_dir).read()
    assert page["status"] == "finished" and (page["round"], page["rounds"]) == (2, 2)
    assert [c["id"] for c in page["clients"]] == ["0", "1"]
    assert all(c["bytes_up"] > 0 and c["bytes_down"] > 0 and c["examples"] > 0 for c in page["clients"])
    assert [x for x in page["series"]["train_loss"] if x is not None] == [v for _, v in want["train_loss"]]
