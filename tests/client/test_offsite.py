"""Offsite tuning (Xiao et al. 2023): the plan of blocks as the paper's uniform layer drop; the emulator is the full
model's blocks renumbered (without drops it computes what the full model computes); no tensor of a dropped block
ever leaves the owner (names and bytes of every message); the plugged-in adapter is the trained one and the run's
exported adapter is the full model's; the owner's distillation lowers its loss; what cannot work is refused at config
time, naming the key, before any model loads."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from fedfm.client import ClientTask
from fedfm.compression import make_codec
from fedfm.errors import ConfigError
from fedfm.ownership.offsite import block_index, build_emulator, plan, renumber
from fedfm.simulation import Simulation, prepare

from tests.conftest import tiny_overrides

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 64}
OFFSITE = {"client.algorithm": "offsite", "model.from_config": TINY_LLAMA, "task.name": "lm",
           "partition.method": "iid", "adapter.target_modules": ["q_proj", "v_proj"], "offsite.adapter_layers": 1,
           "offsite.drop_ratio": 0.5, "eval.initial": True, "eval.every": 1, "eval.per_client": False}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))  # the owner's emulators


def _cfg(tiny_config, **over):
    return tiny_config(**{**OFFSITE, **over})


def test_plan_keeps_the_adapter_blocks_and_spaces_the_kept_middle_uniformly():
    p = plan(30, 2, 0.5)  # SmolLM2: 26 middle blocks, 13 kept, stride 25/12 from block 2 to block 27
    assert p.kept == (2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27)
    assert p.order == (0, 1, *p.kept, 28, 29) and len(p.dropped) == 13
    assert p.adapter(emulator=True) == [0, 1, 15, 16] and p.adapter(emulator=False) == [0, 1, 28, 29]
    assert plan(6, 1, 0.5).order == (0, 1, 4, 5)
    assert plan(6, 1, 0.0).order == tuple(range(6)) and plan(6, 1, 0.0).dropped == []
    assert plan(7, 1, 0.8).kept == (3,)  # one middle block kept: the middle one
    with pytest.raises(ConfigError, match=r"offsite\.adapter_layers"):
        plan(6, 3, 0.5)
    with pytest.raises(ConfigError, match=r"offsite\.drop_ratio"):
        plan(6, 1, 0.9)


def test_names_are_renumbered_inside_the_block_list_only():
    name = "base_model.model.model.layers.4.self_attn.q_proj.lora_A.default.weight"
    assert block_index(name, "model.layers") == 4
    assert renumber(name, "model.layers", {4: 29}) == name.replace("layers.4.", "layers.29.")
    assert block_index("base_model.model.model.norm.weight", "model.layers") is None
    assert block_index("bert.encoder.layer.1.output.dense.weight", "bert.encoder.layer") == 1


def _tiny_llama(layers: int = 6):
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = dict(TINY_LLAMA, num_hidden_layers=layers)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf)).eval()


def test_the_emulator_is_the_full_models_blocks_and_without_drops_computes_the_same():
    base = _tiny_llama()
    ids = torch.randint(0, 30522, (2, 10), generator=torch.Generator().manual_seed(1))
    same = build_emulator(base, plan(6, 1, 0.0))
    with torch.no_grad():
        assert torch.allclose(same(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)
    p = plan(6, 1, 0.5)
    emu = build_emulator(base, p)
    assert emu.config.num_hidden_layers == len(emu.model.layers) == 4
    for j, i in enumerate(p.order):
        for (n, a), (_, b) in zip(emu.model.layers[j].state_dict().items(), base.model.layers[i].state_dict().items()):
            assert torch.equal(a, b), (j, i, n)
    with torch.no_grad():  # with blocks dropped it is another function
        assert not torch.allclose(emu(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


def _capture(sim) -> list[ClientTask]:
    """Every task the runtime carries to a client, as sent."""
    sent: list[ClientTask] = []
    inner = sim.runtime.client_fn

    def client(task):
        sent.append(task)
        return inner(task)

    sim.runtime.client_fn = client
    return sent


def _unique_bytes(tensors: dict[str, torch.Tensor], others: list[bytes]) -> dict[str, bytes]:
    """Each tensor's raw bytes, leaving out a constant initialisation also found among what is sent (a norm's ones)."""
    out = {}
    for n, t in tensors.items():
        raw = t.detach().contiguous().numpy().tobytes()
        if not any(raw in o for o in others):
            out[n] = raw
    return out


@pytest.mark.parametrize("method", ["lora", "full"])
def test_no_tensor_of_the_dropped_blocks_ever_leaves_the_owner(tiny_config, method):
    sim = Simulation(prepare(_cfg(tiny_config, **{"adapter.method": method})))
    sent = _capture(sim)
    rows = sim.run()
    owner = sim.server.algo_server
    emulator, p = owner.emulator, owner.emulator.plan
    assert p.dropped == [2, 3]
    files = {f.name: f.read_bytes() for f in emulator.files()}
    assert "model.safetensors" in files and "config.json" in files
    messages = [*files.values(), *(t.payload for t in sent), *(b for t in sent for b in t.extras.values())]

    # names: the emulator holds blocks 0..E−1 only, and the payloads name the emulator's adapter only
    assert json.loads(files["config.json"])["num_hidden_layers"] == len(p.order) == 4
    with safe_open(str(emulator.path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        stored = {n: f.get_tensor(n) for n in names}
    assert {block_index(n, "model.layers") for n in names} - {None} == {0, 1, 2, 3}
    codec = make_codec(sim.cfg.codec)
    for t in sent:
        assert list(codec.decode(t.payload, sim.spec)) == sim.spec.names
    assert {block_index(n, "model.layers") for n in sim.spec.names} == set(p.adapter(emulator=True))

    # bytes: no dropped tensor (whole, nor 64 bytes of its middle) is in any message
    full = owner.full.model.state_dict()
    dropped = {n: t for n, t in full.items() if block_index(n, "model.layers") in p.dropped}
    kept = [t.contiguous().numpy().tobytes() for t in stored.values()]
    checked = _unique_bytes(dropped, kept)
    linear = [n for n in dropped if n.endswith("proj.weight") or n.endswith("proj.base_layer.weight")]
    assert len(linear) == 2 * 7 and set(linear) <= set(checked)  # q k v o gate up down of both dropped blocks
    for n, raw in checked.items():
        probe = raw[len(raw) // 2: len(raw) // 2 + 64]
        for m in messages:
            assert raw not in m and probe not in m, n
    # the search finds what is sent: a kept middle block's tensor is in the emulator's file
    kept_q = next(t for n, t in full.items() if block_index(n, "model.layers") == p.kept[0] and "q_proj" in n
                  and n.endswith("weight") and "lora" not in n)
    assert kept_q.contiguous().numpy().tobytes() in files["model.safetensors"]

    # the bytes sent are what the emulator and the adapter account for
    raw = files["model.safetensors"]
    header = int.from_bytes(raw[:8], "little")
    assert len(raw) - 8 - header == sum(t.numel() * t.element_size() for t in stored.values())
    emu_params = sum(t.numel() for n, t in full.items() if block_index(n, "model.layers") not in p.dropped
                     and "lora_" not in n)
    assert sum(t.numel() for t in stored.values()) == emu_params
    assert emulator.nbytes == sum(len(b) for b in files.values())
    for t in sent:
        assert 4 * sim.spec.numel <= len(t.payload) < 4 * sim.spec.numel + 4096
    trained = [r for r in rows if r["round"] > 0]
    assert [r["bytes_down"] for r in trained] == [sum(len(t.payload) for t in sent if t.round == r["round"])
                                                  for r in trained]
    first = [len({t.client_id for t in sent if t.round == 1})]
    later = [len({t.client_id for t in sent if t.round == 2} - {t.client_id for t in sent if t.round == 1})]
    assert [r["emulator_bytes_down"] for r in trained] == [c * emulator.nbytes for c in first + later]


def test_round_zero_scores_the_full_model_and_the_plug_in_is_the_trained_adapter(tiny_config):
    from fedfm.models import build_base

    sim = Simulation(prepare(_cfg(tiny_config, **{"adapter.method": "full"})))
    rows = sim.run()
    owner = sim.server.algo_server
    held = sim.server.model
    # the full model, built again from the config and never touched, scores what round 0 reports as plugged_loss
    _, fresh = build_base(sim.cfg, sim.bundle.tokenizer, sim.data.examples)
    fresh_loss = sim.task.evaluate(fresh, held.held_out, held.eval_indices, 64)["loss"]
    assert rows[0]["plugged_loss"] == pytest.approx(fresh_loss, rel=1e-6)
    assert rows[0]["eval_loss"] != pytest.approx(fresh_loss, rel=1e-4)  # the emulator is another model
    # after training: the full model's adapter blocks hold the global state; its other blocks are the fresh ones
    state = sim.spec.unflatten(sim.server.global_flat)
    full = dict(owner.full.model.named_parameters())
    fresh_params = dict(fresh.named_parameters())
    for n, t in state.items():
        assert torch.equal(full[owner.names[n]].detach(), t), n
    moved = [n for n in state if not torch.equal(t := state[n], fresh_params[owner.names[n]].detach())]
    assert moved  # the adapter did train
    for n, t in full.items():
        if block_index(n, "model.layers") not in (0, 5):
            assert torch.equal(t.detach(), fresh_params[n].detach()), n
    assert rows[-1]["plugged_loss"] < rows[0]["plugged_loss"]


def test_the_runs_adapter_is_the_full_models(tiny_config, tmp_path):
    """Through the CLI: the adapter the run writes loads onto the full model (``export.load_trained``) and scores
    the last round's plugged_loss."""
    from typer.testing import CliRunner

    from fedfm.cli import app
    from fedfm.trained import load_trained

    cfg = _cfg(tiny_config)
    overrides = [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in OFFSITE.items()]
    res = CliRunner().invoke(app, ["run", "bbc-lora", *tiny_overrides(cfg.data.source, tmp_path), *overrides])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [0, 5]  # the full model's numbering, not the emulator's [0, 3]
    _, model, _ = load_trained(run_dir)
    assert len(model.base_model.model.model.layers) == 6
    sim = Simulation(prepare(cfg))  # the same held-out rows (seeded)
    held = sim.server.model
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    loss = sim.task.evaluate(model, held.held_out, held.eval_indices, 64)["loss"]
    assert loss == pytest.approx(last["plugged_loss"], rel=1e-5)


def test_distillation_brings_the_emulator_closer_to_the_full_middle(tiny_config):
    from fedfm.models.loader import cache_root

    cfg = _cfg(tiny_config, **{"offsite.distill_steps": 8, "offsite.distill_lr": 0.001, "federation.rounds": 1})
    sim = Simulation(prepare(cfg))
    owner = sim.server.algo_server
    losses = owner.emulator.distill_losses
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    # the adapter blocks are the full model's as they were; the kept middle blocks changed
    emu, full = sim.model.base_model.model.model.layers, owner.full.model.base_model.model.model.layers

    def first(block):
        return next(q for n, q in block.named_parameters() if "q_proj" in n and "lora" not in n)

    assert torch.equal(first(emu[0]), first(full[0])) and torch.equal(first(emu[3]), first(full[5]))
    assert not torch.equal(first(emu[1]), first(full[owner.emulator.plan.kept[0]]))
    assert any("distilled 8 steps" in note for note in owner.notes)
    assert len(list((cache_root() / "emulators").iterdir())) == 1  # one emulator, written once


BAD = {
    "adapter_layers": ({"offsite.adapter_layers": 3}, r"offsite\.adapter_layers"),
    "drop_ratio": ({"offsite.drop_ratio": 0.9}, r"offsite\.drop_ratio"),
    "drop_ratio range": ({"offsite.drop_ratio": 1.0}, r"offsite\.drop_ratio"),
    "method": ({"adapter.method": "ia3"}, r"adapter\.method 'ia3'"),
    "personal": ({"adapter.personal": ["lora_B"]}, r"adapter\.personal"),
    "runtime": ({"runtime.name": "batched"}, r"runtime\.name 'batched'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_what_offsite_cannot_do_is_refused_at_config_time_naming_the_key(tiny_config, monkeypatch, case):
    import fedfm.models.loader as loader

    monkeypatch.setattr(loader, "load_base", lambda *a, **k: pytest.fail("a model loaded"))
    over, key = BAD[case]
    with pytest.raises(ConfigError, match=key):
        _cfg(tiny_config, **over)


def test_a_deployment_refuses_offsite(tiny_config):
    from fedfm.deploy import check_config

    with pytest.raises(ConfigError, match=r"client\.algorithm 'offsite'"):
        check_config(_cfg(tiny_config))
