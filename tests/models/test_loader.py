import pytest

from fedfm.errors import ConfigError, ModelError
from fedfm.models.loader import load_base, resolve_name_or_path


def test_alias_resolves_to_the_shipped_package():
    path = resolve_name_or_path("minilm")
    assert path.endswith("model") and resolve_name_or_path(path) == path


def test_local_path_that_does_not_exist_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        resolve_name_or_path("/no/such/model")
    with pytest.raises(ConfigError, match="model.name_or_path"):
        resolve_name_or_path("./relative/missing")


def test_hub_id_offline_gives_a_clear_error(tiny_config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_config(**{"model.from_config": None, "model.name_or_path": "nobody-org/no-such-model-xyz"})
    assert resolve_name_or_path("nobody-org/no-such-model-xyz") == "nobody-org/no-such-model-xyz"
    with pytest.raises(ModelError) as e:
        load_base(cfg.model, "AutoModelForSequenceClassification", num_labels=2)
    msg = str(e.value)
    assert "model.name_or_path" in msg and "Hugging Face Hub" in msg and "local directory" in msg
