"""Per adaptation method: exactly the trainable parameters travel, and nothing frozen is ever sent or changed."""
import pytest
import torch

from fedfm.client import ClientTask, make_client
from fedfm.simulation import Simulation, prepare

METHODS = ["lora", "prompt", "prefix", "ia3", "bitfit", "head", "full"]


@pytest.mark.parametrize("method", METHODS)
def test_only_trainable_parameters_travel(tiny_config, method):
    cfg = tiny_config(**{"adapter.method": method, "federation.rounds": 1})
    server = Simulation(prepare(cfg))
    model, spec = server.model, server.spec
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert set(spec.names) == trainable and trainable
    if method != "full":
        assert frozen, "a parameter-efficient method must leave the base frozen"
        assert spec.numel < sum(p.numel() for p in model.parameters()) / 2

    # what travels down: the encoded global state holds exactly the trainable names
    payload = server.codec.encode(spec.unflatten(server.global_flat))
    assert set(server.codec.decode(payload)) == trainable

    # what travels up after real local training: the delta, again exactly the trainable names, and non-zero
    result = make_client(server.ctx)(ClientTask(client_id=0, round=1, payload=payload, seed=1))
    assert result.error is None
    delta = server.codec.decode(result.update, spec)
    assert set(delta) == trainable
    assert sum(float(t.abs().sum()) for t in delta.values()) > 0
    # frozen weights were not touched by training
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_head_method_trains_only_the_classifier(tiny_config):
    server = Simulation(prepare(tiny_config(**{"adapter.method": "head"})))
    assert all(n.startswith("classifier.") for n in server.spec.names)


def test_bitfit_trains_biases_and_head(tiny_config):
    server = Simulation(prepare(tiny_config(**{"adapter.method": "bitfit"})))
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in server.spec.names)
    assert any("encoder" in n for n in server.spec.names)


def test_lora_targets_and_rank(tiny_config):
    server = Simulation(prepare(tiny_config(**{"adapter.r": 4, "adapter.target_modules": ["query"]})))
    a = [n for n in server.spec.names if "lora_A" in n]
    assert a and all(".query." in n for n in a)
    assert all(server.spec.shapes[n][0] == 4 for n in a)


def test_prefix_on_a_model_without_past_key_values_is_refused_at_config_time(tiny_config, monkeypatch):
    """peft passes a classifier's prefixes as past_key_values, which BERT stopped taking in transformers 5: the
    config is refused, naming the field and the model, instead of peft failing once the model is loaded."""
    from fedfm.errors import ConfigError
    from fedfm.models import adapters

    monkeypatch.setattr(adapters, "takes_past_key_values", lambda model_type: False)
    with pytest.raises(ConfigError, match=r"adapter.method 'prefix': model 'model.from_config' \(model_type 'bert'\)"):
        tiny_config(**{"adapter.method": "prefix"})
    tiny_config(**{"adapter.method": "prompt"})
    tiny_config(**{"adapter.method": "prefix", "task.name": "lm", "partition.method": "iid"})  # a causal LM


def test_past_key_values_are_read_from_the_installed_model_class():
    import transformers

    from fedfm.models.adapters import takes_past_key_values

    assert takes_past_key_values("bert") is (int(transformers.__version__.split(".")[0]) < 5)
    assert takes_past_key_values("no-such-model") is None
