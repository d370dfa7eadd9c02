"""The Python API (``import fedfm``): configs from names, files, dicts and RunConfigs with overrides; a run with a
callback per round; resume; the CLI going through it; and docs/python-api.md's example, run as written."""
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import fedfm
from fedfm import api
from fedfm.cli import app
from tests.conftest import tiny_overrides

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_import_fedfm_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, fedfm; print(fedfm.run.__module__, 'torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["fedfm.api", "False", "False"]


def test_the_api_names_stay_functions_after_every_module_is_imported():
    """Importing a submodule binds its name on the package: no API name may be a module's (``fedfm.export`` was the
    module ``fedfm/export.py`` once the CLI had exported a run)."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(fedfm.__path__, "fedfm."):
        if not info.name.startswith(("fedfm.__main__", "fedfm.deploy.flower", "fedfm.dashboard.app")):  # a script; extras
            importlib.import_module(info.name)
    for name in fedfm.__all__:
        if name != "__version__":
            assert callable(getattr(fedfm, name)) and getattr(fedfm, name).__module__ in ("fedfm.api", "fedfm.errors"), name


def test_load_config_from_name_file_dict_and_runconfig(tmp_path):
    by_name = fedfm.load_config("bbc-lora", ["client.lr=0.01", "federation.rounds=3"])
    assert by_name.client.lr == 0.01 and by_name.federation.rounds == 3
    # a dict of overrides takes values as given (no YAML reading: the string "3" stays a string and is refused)
    by_dict_overrides = fedfm.load_config("bbc-lora", {"client.lr": 0.01, "federation.rounds": 3})
    assert by_dict_overrides == by_name
    path = tmp_path / "mine.yaml"
    path.write_text(by_name.to_yaml())
    assert fedfm.load_config(path) == by_name
    assert fedfm.load_config(str(path), {"federation.rounds": 4}).federation.rounds == 4
    data = yaml.safe_load(by_name.to_yaml())
    assert fedfm.load_config(data) == by_name
    assert data["federation"]["rounds"] == 3  # the caller's dict is not changed by overrides
    fedfm.load_config(data, {"federation.rounds": 5})
    assert data["federation"]["rounds"] == 3
    assert fedfm.load_config(by_name, {"partition.num_clients": 12}).partition.num_clients == 12
    assert by_name.partition.num_clients == 10


@pytest.mark.parametrize("config, overrides, message", [
    ("bbc-lora", {"federation.rounds": 0}, r"federation\.rounds"),
    ("bbc-lora", {"client.no_such_key": 1}, r"client\.no_such_key"),
    ("bbc-lora", {"federation..rounds": 1}, r"empty key part"),
    ("bbc-lora", "federation.rounds=2", r"expected a list of 'key\.sub=value' strings or a dict"),
    ("no-such-config", None, r"no built-in config or file named 'no-such-config'"),
    (42, None, r"config: expected a built-in config name, a YAML file, a dict or a RunConfig, got int"),
    ({"federation": {"rounds": "many"}}, None, r"federation\.rounds"),
])
def test_bad_configs_are_refused_naming_the_key(config, overrides, message):
    with pytest.raises(fedfm.ConfigError, match=message):
        fedfm.load_config(config, overrides)


def test_run_calls_back_each_round_and_resumes(tiny_csv, tmp_path):
    cfg = fedfm.load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path, **{"federation.rounds": 2,
                                                                              "eval.initial": True}))
    seen = []
    result = fedfm.run(cfg, on_round=seen.append)
    written = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in seen] == [0, 1, 2] == [r["round"] for r in result.rows]
    assert seen == written == result.rows
    assert result.final["round"] == 2 and result.series("eval_accuracy")[0][0] == 0
    assert (result.run_dir / "adapter" / "adapter_config.json").exists()
    assert (result.run_dir / "report" / "summary.md").exists()

    with pytest.raises(fedfm.FedfmError, match="already"):  # an existing run is never replaced unasked
        fedfm.run(cfg)
    with pytest.raises(fedfm.FedfmError, match=r"adapter\.r"):  # resuming may not change what was trained
        fedfm.resume(result.run_dir, {"adapter.r": 2})

    more = []
    resumed = fedfm.resume(result.run_dir, {"federation.rounds": 3}, on_round=more.append)
    assert [r["round"] for r in more] == [3]
    assert [r["round"] for r in resumed.rows] == [0, 1, 2, 3]
    assert resumed.rows[:3] == written  # the rows before the checkpoint are kept as they were

    out = fedfm.export(result.run_dir, tmp_path / "exported")
    assert (out / "adapter_model.safetensors").exists()


def test_a_callback_that_raises_stops_the_run_and_it_resumes(tiny_csv, tmp_path):
    cfg = fedfm.load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path, **{"federation.rounds": 3}))

    def stop_after_two(row):
        if row["round"] == 2:
            raise KeyboardInterrupt("enough")

    with pytest.raises(KeyboardInterrupt):
        fedfm.run(cfg, on_round=stop_after_two)
    resumed = fedfm.resume(cfg.output_dir())
    assert [r["round"] for r in resumed.rows] == [1, 2, 3]


def test_the_cli_goes_through_the_api(tiny_csv, tmp_path, monkeypatch):
    calls = []
    real_run, real_resume = api.run, api.resume

    def run(*a, **k):
        calls.append("run")
        return real_run(*a, **k)

    def resume(*a, **k):
        calls.append("resume")
        return real_resume(*a, **k)

    monkeypatch.setattr(api, "run", run)
    monkeypatch.setattr(api, "resume", resume)
    overrides = tiny_overrides(tiny_csv, tmp_path, **{"federation.rounds": 1})
    res = CliRunner().invoke(app, ["run", "bbc-lora", *overrides])
    assert res.exit_code == 0, res.output
    run_dir = fedfm.load_config("bbc-lora", overrides).output_dir()
    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "federation.rounds=2"])
    assert res.exit_code == 0, res.output
    assert calls == ["run", "resume"]
    assert [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.e2e
def test_the_documented_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks(DOC.read_text())
    assert len(blocks) == 2 and "fedfm.run(" in blocks[0] and "fedfm.generate(" in blocks[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), scope)
    out = capsys.readouterr().out
    assert "lora 2" in out and "adapter_model.safetensors" in out
    assert "federation.rounds" in out  # the second block printed the refusal
    assert (tmp_path / "runs" / "api-demo" / "checkpoints").is_dir()
    assert (tmp_path / "exports" / "api-demo" / "adapter_config.json").exists()
    assert isinstance(scope["chat"], fedfm.RunResult) and scope["more"].final["round"] == 3
