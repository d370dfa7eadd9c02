"""``fedfm dashboard RUN_DIR``, ``fedfm run --dashboard`` and ``Dashboard`` as a context manager: a real server in a
thread, stopped cleanly; clear errors for a path that is not a run, a port in use, a missing extra."""
from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

import fedfm.cli as cli
import fedfm.dashboard as dashboard
from fedfm.cli import app
from fedfm.dashboard import Dashboard
from fedfm.errors import FedfmError

from tests.conftest import tiny_overrides
from tests.dashboard.test_state import write_run


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli.console, "_width", 1000)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


def serving_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fedfm-dashboard"]


def test_dashboard_serves_while_its_block_runs_and_then_stops(tmp_path):
    run = write_run(tmp_path / "run")
    with Dashboard(run, port=0) as d:
        assert d.url == f"http://127.0.0.1:{d.port}/" and d.port > 0
        status, body = get(d.url + "api/state")
        assert status == 200 and json.loads(body)["round"] == 2
        req = urllib.request.Request(d.url + "api/state", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 405
    assert serving_threads() == []
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", d.port), timeout=2).close()


def test_a_port_in_use_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(FedfmError, match=f"cannot listen on 127.0.0.1:{port}"):
            Dashboard(tmp_path, port=port).start()
        res = invoke("dashboard", write_run(tmp_path / "run"), "--port", port)
    assert res.exit_code == 2 and f"127.0.0.1:{port}" in res.output, res.output
    assert serving_threads() == []


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file, not a run directory"),
    (lambda p: (p / "notes.txt").write_text("x") and p, "is not a run directory"),
])
def test_a_path_that_is_not_a_run_is_refused(tmp_path, make, needle):
    path = make(tmp_path)
    res = invoke("dashboard", path, "--port", 0)
    assert res.exit_code == 2, res.output
    assert needle in res.output and str(path) in " ".join(res.output.split())


def test_a_missing_extra_names_it(tmp_path, monkeypatch):
    real = dashboard.importlib.util.find_spec
    monkeypatch.setattr(dashboard.importlib.util, "find_spec", lambda name: None if name == "uvicorn" else real(name))
    res = invoke("dashboard", write_run(tmp_path / "run"), "--port", 0)
    assert res.exit_code == 2 and 'pip install "fedfm[dashboard]"' in res.output and "uvicorn" in res.output


@pytest.mark.parametrize("written", [True, False], ids=["a-run", "wait-for-one"])
def test_fedfm_dashboard_serves_until_interrupted(tmp_path, monkeypatch, written):
    seen = {}

    def wait(self):  # in place of waiting for Ctrl-C: read the page once, then return as Ctrl-C makes it
        seen["state"] = json.loads(get(self.url + "api/state")[1])

    monkeypatch.setattr(Dashboard, "wait", wait)
    path = write_run(tmp_path / "run") if written else tmp_path / "later"
    res = invoke("dashboard", path, "--port", 0, *([] if written else ["--wait"]))
    assert res.exit_code == 0, res.output
    assert "http://127.0.0.1:" in res.output
    assert seen["state"]["status"] == ("running" if written else "waiting")
    assert serving_threads() == []


def test_fedfm_run_dashboard_serves_during_the_run_then_stops(tiny_csv, tmp_path, monkeypatch):
    """The page is up before the run writes anything (waiting), and gone when the run ends, failed or not."""
    seen, boards, start = [], [], Dashboard.start

    def started(self):
        boards.append(self)
        return start(self)

    def fake_run(cfg, resume, overrides, overwrite):
        seen.append(json.loads(get(boards[0].url + "api/state")[1]))
        raise cli.typer.Exit(code=3)  # a run that fails: the page stops all the same

    monkeypatch.setattr(Dashboard, "start", started)
    monkeypatch.setattr(cli, "_run", fake_run)
    res = invoke("run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path), "--dashboard", "--dashboard-port", 0)
    assert res.exit_code == 3, res.output
    assert f"{tmp_path / 'run'}: {boards[0].url}" in res.output
    assert seen and seen[0]["status"] == "waiting" and seen[0]["run_dir"] == str((tmp_path / "run").resolve())
    assert "dashboard stopped" in res.output and serving_threads() == []
