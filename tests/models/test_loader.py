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
