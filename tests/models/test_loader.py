import pytest

from fedfm.errors import ConfigError
from fedfm.models.loader import resolve_name_or_path


def test_alias_resolves_to_the_shipped_package():
    path = resolve_name_or_path("minilm")
    assert path.endswith("model") and resolve_name_or_path(path) == path


def test_local_path_that_does_not_exist_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        resolve_name_or_path("/no/such/model")
    with pytest.raises(ConfigError, match="model.name_or_path"):
        resolve_name_or_path("./relative/missing")


def test_hub_id_offline_gives_a_clear_error(tiny_csv, tmp_path):
    """Offline, a hub id fails with one clear line and exit status 2, and leaves no half-made run directory."""
    import os
    import subprocess
    import sys

    from tests.conftest import tiny_overrides

    assert resolve_name_or_path("nobody-org/no-such-model-xyz") == "nobody-org/no-such-model-xyz"
    over = tiny_overrides(tiny_csv, tmp_path) + ["model.from_config=null", "model.tokenizer=null",
                                                 "model.name_or_path=nobody-org/no-such-model-xyz"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "fedfm", "run", "bbc-lora", *over], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "model.name_or_path" in out and "Hugging Face Hub" in out and "local directory" in out
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


def test_quantization_on_cpu_is_a_clear_error_before_anything_loads(tiny_csv, tmp_path, monkeypatch):
    import torch
    from typer.testing import CliRunner

    import fedfm.models.loader
    from fedfm.cli import app
    from tests.conftest import tiny_overrides

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fedfm.models.loader, "load_base", lambda *a, **k: pytest.fail("the base must not load"))
    res = CliRunner().invoke(app, ["run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path, **{
        "model.quantization": "4bit", "model.name_or_path": "minilm", "model.from_config": None})])
    assert res.exit_code == 2
    assert "model.quantization: '4bit'" in res.output and "CUDA" in res.output
    assert not (tmp_path / "run").exists()


def test_gguf_file_missing_from_a_local_directory_is_named(tmp_path):
    from fedfm.config import RunConfig
    from fedfm.models.loader import check_model_config

    (tmp_path / "m").mkdir()
    cfg = RunConfig(model={"name_or_path": str(tmp_path / "m"), "gguf_file": "x.Q4.gguf"})
    with pytest.raises(ConfigError, match=r"model.gguf_file: 'x.Q4.gguf' is not in"):
        check_model_config(cfg.model)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    from fedfm.models.loader import cache_root

    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"


def test_a_gguf_copy_is_reused_only_by_the_transformers_major_that_wrote_it(tmp_path, monkeypatch):
    import importlib.metadata

    from fedfm.models.loader import convert_gguf

    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "c"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.gguf").write_bytes(b"1234")
    for major in ("4", "5"):
        (tmp_path / "c" / "models" / f"m--x-4-transformers{major}").mkdir(parents=True)
        (tmp_path / "c" / "models" / f"m--x-4-transformers{major}" / "config.json").write_text("{}")
    for major in ("4", "5"):
        monkeypatch.setattr(importlib.metadata, "version", lambda name: f"{major}.1.0")
        assert convert_gguf(str(tmp_path / "m"), "x.gguf", "m").endswith(f"m--x-4-transformers{major}")


@pytest.mark.parametrize("device, needle", [("tpu", "not a device torch knows"), ("", "not a device torch knows"),
                                            ("cuda:99", "cuda"), ("mps:3", "mps")])
def test_a_device_this_machine_lacks_is_a_config_error(device, needle):
    from types import SimpleNamespace

    from fedfm.models.loader import check_device

    with pytest.raises(ConfigError, match=f"model.device: {device!r}.*{needle}"):
        check_device(SimpleNamespace(device=device))
    check_device(SimpleNamespace(device="cpu"))
    check_device(SimpleNamespace(device=None))


def test_target_modules_are_checked_on_a_model_that_holds_no_weights(tmp_path):
    """from_config, and a model directory (its config.json only: no weights file is there to read)."""
    import json

    import torch

    from fedfm.config import RunConfig
    from fedfm.models.adapters import check_target_modules
    from fedfm.models.loader import empty_base
    from tests.conftest import TINY_BERT

    cfg = RunConfig(model={"name_or_path": None, "from_config": TINY_BERT}, adapter={"target_modules": ["query"]})
    model = empty_base(cfg.model, "AutoModelForSequenceClassification")
    assert {p.device for p in model.parameters()} == {torch.device("meta")}
    check_target_modules(cfg)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY_BERT))  # no weights at all
    for model_cfg in ({"name_or_path": None, "from_config": TINY_BERT}, {"name_or_path": str(tmp_path / "m")}):
        bad = RunConfig(model=model_cfg, adapter={"target_modules": ["query", "q_proj"]})
        with pytest.raises(ConfigError, match=r"adapter.target_modules: 'q_proj' matches no module .*query"):
            check_target_modules(bad)
    bad = RunConfig(model={"name_or_path": str(tmp_path / "m")}, adapter={"target_modules": ["encoder"]})
    with pytest.raises(ConfigError, match=r"'encoder' matches bert.encoder \(BertEncoder\), not a linear"):
        check_target_modules(bad)


def test_target_modules_of_a_model_not_at_hand_are_left_to_the_load(monkeypatch):
    from fedfm.config import RunConfig
    from fedfm.models.adapters import check_target_modules

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = RunConfig(model={"name_or_path": "nobody-org/no-such-model-xyz"}, adapter={"target_modules": ["x"]})
    check_target_modules(cfg)  # no config in the cache: loading reports the missing model
