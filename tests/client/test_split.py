"""Split learning (SplitFed, Thapa et al. 2022): the split model's gradients equal the unsplit model's; the bytes
counted are the encoded messages; the noise has the stated scale; a tiny federation trains and logs the split bytes;
what cannot work is refused at config time."""
from __future__ import annotations

import json

import pytest
import torch

from fedfm.client import ClientTask, batch_stream
from fedfm.client.split import Split, pack_targets
from fedfm.config import load_config
from fedfm.errors import ConfigError
from fedfm.simulation import Simulation, prepare

from tests.conftest import tiny_overrides

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 64}
SPLIT = {"client.algorithm": "split", "privacy.randomness": "seeded"}


def _sim(tiny_config, **over) -> Simulation:
    return Simulation(prepare(tiny_config(**{**SPLIT, **over})))


def _batch(sim, cid: int = 0, size: int = 8, padded: int = 0):
    """A batch of client ``cid``'s; with ``padded``, every other row cut ``padded`` tokens short (pad, masked)."""
    own = sim.local[cid]
    batch = next(sim.task.batches(own.encoded, own.train, size, torch.Generator().manual_seed(1)))
    if padded:
        batch["input_ids"][::2, -padded:] = sim.bundle.tokenizer.pad_token_id
        batch["attention_mask"][::2, -padded:] = 0
        if batch["labels"].ndim == 2:
            batch["labels"][::2, -padded:] = -100
    return batch


def _grads(sim) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in sim.spec.params.items()}
    sim.model.zero_grad(set_to_none=True)
    return out


MODELS = {
    "bert": {},
    "llama": {"model.from_config": TINY_LLAMA, "split.layer": 2, "adapter.target_modules": ["q_proj", "v_proj"]},
    "bert-full": {"adapter.method": "full"},
    "llama-lm": {"model.from_config": TINY_LLAMA, "task.name": "lm", "partition.method": "iid",
                 "adapter.target_modules": ["q_proj", "v_proj"]},
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_split_gradients_equal_the_unsplit_models(tiny_config, model):
    sim = _sim(tiny_config, **MODELS[model])
    client = sim.client_algo
    assert isinstance(client, Split)
    assert client.cut.client_names and client.cut.server_names
    batch = _batch(sim, padded=3)
    sim.model.train()
    sim.model.zero_grad(set_to_none=True)
    sim.task.loss(sim.model, batch).backward()
    whole = _grads(sim)
    # the split: A through the codec as bytes, the server half's backward, ∇_A back as bytes, the client's backward
    A = client.cut.client_forward(sim.task, batch)
    grad, _ = sim.server.algo_server.backward(sim.codec.encode({"activations": A.detach()}), pack_targets(batch))
    A.backward(sim.codec.decode(sim.codec.encode({"gradients": grad}))["gradients"])
    split = _grads(sim)
    assert set(whole) == set(split) == set(client.cut.client_names) | set(client.cut.server_names)
    for n in whole:
        assert torch.allclose(whole[n], split[n], atol=1e-6, rtol=0), (n, float((whole[n] - split[n]).abs().max()))
    assert any(float(whole[n].abs().max()) > 0 for n in client.cut.client_names)  # the client side does learn


def test_bytes_counted_are_the_encoded_messages(tiny_config):
    sim = _sim(tiny_config, **{"client.steps": 1, "client.epochs": None, "client.batch_size": 4})
    res = sim.client_algo(ClientTask(client_id=0, round=1, payload=sim.server.broadcast(1, 0)[0], seed=5))
    own = sim.local[0]  # the one batch it trained on: the client's stream from its task seed
    batch = next(batch_stream(sim.task, own.encoded, own.train, 4, torch.Generator().manual_seed(5), 1, None))
    B, T = batch["input_ids"].shape
    H = sim.model.config.hidden_size
    A = torch.zeros(B, T, H)
    up = len(sim.codec.encode({"activations": A})) + len(pack_targets(batch))
    down = len(sim.codec.encode({"gradients": A, "loss": torch.zeros(1)}))
    assert up > 4 * B * T * H and down > 4 * B * T * H  # fp32 activations and gradients, and a header
    assert res.metrics["split_bytes_up"] == up and res.metrics["split_bytes_down"] == down
    # the round's row: the server half's own count, the same, and the activations in bytes_up
    row = sim.server.aggregate_results(1, [res])
    assert row["aggregated"] and row["split_bytes_up"] == up and row["split_bytes_down"] == down
    assert row["bytes_up"] == len(res.update) + up
    assert row["split_noise_std"] == 0.0


def test_noise_on_the_activations_has_the_stated_scale(tiny_config):
    sigma = 0.5
    sim = _sim(tiny_config, **{"split.noise_std": sigma, "client.steps": 3, "client.epochs": None})
    client, server = sim.client_algo, sim.server.algo_server
    clean, received = [], []
    forward, exchange = client.cut.client_forward, server.exchange

    def record_forward(task, batch):
        A = forward(task, batch)
        clean.append(A.detach().clone())
        return A

    def record_exchange(cid, activations, targets):
        received.append(sim.codec.decode(activations)["activations"])
        return exchange(cid, activations, targets)

    client.cut.client_forward, server.exchange = record_forward, record_exchange
    res = client(ClientTask(client_id=0, round=1, payload=sim.server.broadcast(1, 0)[0], seed=11))
    assert res.error is None and res.metrics["split_noise_std"] == sigma and len(received) == 3
    noise = torch.cat([(r - c).flatten() for r, c in zip(received, clean)])
    n = len(noise)  # a few thousand draws: mean within 4 standard errors of 0, the std within 5%
    assert abs(float(noise.mean())) < 4 * sigma / n ** 0.5
    assert abs(float(noise.std()) / sigma - 1) < 0.05
    row = sim.server.aggregate_results(1, [res])
    assert row["split_noise_std"] == sigma


def test_two_rounds_of_a_tiny_federation_train_as_the_unsplit_model_and_log_the_split_bytes(tiny_config):
    """Without clipping (which each side does for its own parameters) the split federation is the unsplit one:
    AdamW is per parameter, so two optimizers on the two halves step as one on the whole, and FedAvg of the joined
    deltas is FedAvg of the whole."""
    over = {"eval.initial": True, "client.grad_clip": None, "privacy.randomness": "seeded"}
    local = Simulation(prepare(tiny_config(**over)))
    expected = local.run()
    sim = _sim(tiny_config, **over)
    cut = sim.server.algo_server.cut
    x0 = {n: t.clone() for n, t in sim.spec.unflatten(sim.global_flat).items()}
    rows = sim.run()
    assert [r["round"] for r in rows] == [0, 1, 2]
    x2 = sim.spec.unflatten(sim.global_flat)
    assert all(not torch.equal(x0[n], x2[n]) for n in cut.client_names + cut.server_names)  # both halves stepped
    assert torch.allclose(sim.global_flat, local.global_flat, atol=1e-6)
    losses = [r["eval_loss"] for r in rows]
    assert losses == pytest.approx([r["eval_loss"] for r in expected], abs=1e-5) and len(set(losses)) == 3
    for r, e in zip(rows[1:], expected[1:]):
        assert r["aggregated"] and not r["dropped"]
        assert r["split_bytes_up"] > 0 and r["split_bytes_down"] > 0 and r["split_noise_std"] == 0.0
        assert r["bytes_up"] > r["split_bytes_up"]  # the activations and the client-side updates
        assert r["bytes_down"] > r["split_bytes_down"]  # the gradients and the client-side broadcasts
        assert r["train_loss"] == pytest.approx(e["train_loss"], abs=1e-5)  # the loss the server half sent back


def test_the_client_receives_and_sends_only_its_part(tiny_config):
    sim = _sim(tiny_config)
    view = sim.server.view(0)
    assert view.names == sim.client_algo.part.names == sim.server.algo_server.cut.client_names
    payload = sim.server.broadcast(1, 0)[0]
    assert set(sim.codec.decode(payload)) == set(view.names)
    res = sim.client_algo(ClientTask(client_id=0, round=1, payload=payload, seed=2))
    assert set(sim.codec.decode(res.update)) == set(view.names)


REFUSED = [
    ({"split.layer": 2}, "split.layer: 2 is not below the model's depth (2 blocks"),
    ({"split.layer": 0}, "split.layer"),
    ({"split.noise_std": -1}, "split.noise_std"),
    ({"adapter.method": "prompt"}, "adapter.method 'prompt'"),
    ({"adapter.method": "prefix"}, "adapter.method 'prefix'"),
    ({"adapter.method": "fedsa-lora"}, "adapter.personal"),
    ({"secagg.enabled": True}, "secagg.enabled"),
    ({"privacy.mode": "sample", "privacy.noise_multiplier": 1.0}, "privacy.mode 'sample'"),
    ({"runtime.name": "batched"}, "runtime.name 'batched'"),
    ({"runtime.name": "ray"}, "runtime.name 'ray'"),
    ({"eval.federated": True}, "eval.federated"),
    ({"client.grad_accum": 2}, "client.grad_accum"),
]


@pytest.mark.parametrize("over,message", REFUSED, ids=[m for _, m in REFUSED])
def test_what_cannot_work_is_refused_at_config_time(tiny_csv, tmp_path, over, message):
    with pytest.raises(ConfigError) as e:
        load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path, **{**SPLIT, **over}))
    assert message in str(e.value)


def test_the_depth_of_a_shipped_model_is_read_without_loading_it():
    """MiniLM has 6 blocks: split.layer 6 is refused from its config.json alone."""
    with pytest.raises(ConfigError, match=r"split.layer: 6 is not below the model's depth \(6 blocks"):
        load_config("bbc-lora", ["client.algorithm=split", "split.layer=6"])
    assert load_config("bbc-lora", ["client.algorithm=split", "split.layer=5"]).split.layer == 5


def test_a_parameter_on_both_sides_is_refused_when_the_model_is_built(tiny_config):
    tied = {**TINY_LLAMA, "tie_word_embeddings": True}
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        _sim(tiny_config, **{"model.from_config": tied, "task.name": "lm", "partition.method": "iid",
                             "adapter.method": "full", "adapter.target_modules": None})


def test_a_deployment_refuses_split_learning(tiny_config):
    from fedfm.deploy import check_config

    with pytest.raises(ConfigError, match="client.algorithm 'split'"):
        check_config(tiny_config(**SPLIT))


def test_fedfm_run_refuses_a_split_beyond_the_depth_before_anything_loads(tiny_csv, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import fedfm.models
    from fedfm.cli import app

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(fedfm.models, "build_model", no_model)
    over = {**SPLIT, "model.name_or_path": "minilm", "model.from_config": None, "split.layer": 7}
    result = CliRunner().invoke(app, ["run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path, **over)])
    assert result.exit_code == 2, result.output
    assert "split.layer: 7 is not below the model's depth (6 blocks" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_a_server_side_delta_in_flight_survives_a_checkpoint(tiny_config):
    """fedbuff aggregates a result server steps after its session: the pending ΔW^S is in the server's checkpoint."""
    over = {"client.steps": 2, "client.epochs": None}
    a, b = _sim(tiny_config, **over), _sim(tiny_config, **over)
    res = a.client_algo(ClientTask(client_id=1, round=1, payload=a.server.broadcast(1, 1)[0], seed=4))
    x0 = a.global_flat.clone()
    b.load_checkpoint_state(a.checkpoint_state(0))
    a.aggregate_results(1, [res])
    b.aggregate_results(1, [res])
    assert not torch.equal(a.global_flat, x0) and torch.equal(a.global_flat, b.global_flat)
    assert not b.server.algo_server.pending
    row = b.aggregate_results(2, [res])  # its session was joined once: the same update again is refused
    assert not row["aggregated"] and "no server-side session" in row["dropped"][0]["error"]
