"""CLIP prompt learning (CoOp trained as in PromptFL): the CoOp text path against CLIP's own, a federated run in which
only the context travels and the encoders stay as they were, the class names in the prompts, and bad input refused
before any weights load. A tiny CLIP built from a config; the MiniLM WordPiece tokenizer stands in for CLIP's BPE."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedfm.compression import make_codec
from fedfm.config import apply_overrides, validate_config
from fedfm.data.sources import Examples
from fedfm.errors import ConfigError, DataError
from fedfm.models import build_model
from fedfm.simulation import Simulation, prepare
from tests.conftest import needs_fashion

# MiniLM's WordPiece: [CLS] = 101 starts a prompt, [SEP] = 102 ends it (CLIP pools there), [PAD] = 0
TINY_CLIP = {"model_type": "clip", "projection_dim": 16,
             "text_config": {"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 101,
                             "eos_token_id": 102, "pad_token_id": 0},
             "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}}
PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
             "crop_size": {"height": 32, "width": 32}}
COLOURS = ["red", "green", "blue"]
M, WIDTH = 4, 32


def colour_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 32 x 32 images whose class is the colour channel that is bright: learnable from the pixels alone."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(COLOURS)
    images = rng.integers(0, 80, (n, 32, 32, 3)).astype(np.uint8)
    images[np.arange(n), :, :, labels] += 160
    return images, labels


def write_npz(path, n: int = 96, names=COLOURS):
    images, labels = colour_images(n)
    arrays = {"images": images, "labels": labels}
    if names is not None:
        arrays["label_names"] = np.array(names)
    np.savez(path, **arrays)
    return path


def clip_config(tmp_path, source, **overrides):
    data = {"name": "clip", "model": {"name_or_path": None, "from_config": TINY_CLIP, "tokenizer": "minilm",
                                      "image_processor": PROCESSOR},
            "adapter": {"method": "coop", "num_virtual_tokens": M, "context_init": "a photo of a"},
            "task": {"name": "clip_prompt"},
            "data": {"source": str(source), "test_fraction": 0.25},
            "partition": {"method": "iid", "num_clients": 3},
            "federation": {"rounds": 3, "clients_per_round": 3, "min_clients": 1},
            "client": {"lr": 0.05, "epochs": 2, "batch_size": 16},
            "eval": {"initial": True, "per_client": False, "batch_size": 64},
            "runtime": {"threads": 1}, "output": {"dir": str(tmp_path / "run")}}
    ov = [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) or v is None else v}" for k, v in overrides.items()]
    return validate_config(apply_overrides(data, ov))


def in_memory(names=COLOURS, n: int = 12) -> Examples:
    images, labels = colour_images(n)
    return Examples(texts=None, images=list(images), labels=labels, label_names=list(names), source="memory")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg = clip_config(tmp_path_factory.mktemp("clip"), "memory")
    return build_model(cfg, in_memory())


def test_coop_text_features_are_clips_own_for_the_zero_shot_prompt(bundle):
    """With the context set to the embeddings of "a photo of a", CoOp's forward from embeddings gives exactly what
    CLIPModel.get_text_features gives for the text "a photo of a <class>." (its own token ids)."""
    model, tok = bundle.model, bundle.tokenizer.tokenizer
    assert torch.equal(model.context, model.token_embeddings(torch.tensor(tok("a photo of a", add_special_tokens=False)
                                                                          ["input_ids"])))
    enc = tok([f"a photo of a {c}." for c in COLOURS], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.text_features()
        clips = model.clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert ours.shape == (3, 16)
    torch.testing.assert_close(ours, clips, atol=1e-5, rtol=0)
    # the context matters: another context gives other features
    with torch.no_grad():
        saved = model.context.clone()
        model.context.add_(torch.randn(model.context.shape, generator=torch.Generator().manual_seed(0)))
        moved = model.text_features()
        model.context.copy_(saved)
    assert (moved - ours).abs().max() > 1e-3


def test_zero_shot_logits_are_clips_and_the_class_names_are_read(bundle):
    model, task = bundle.model, bundle.task
    ex = in_memory()
    enc = task.encode(ex)
    batch = task.collate(enc, torch.arange(len(ex)))
    with torch.no_grad():
        logits = task.logits(model, batch)
        # CLIP itself: its processor's pixels, its own forward on the zero-shot texts
        tok, proc = bundle.tokenizer.tokenizer, bundle.tokenizer.image_processor
        text = tok([f"a photo of a {c}." for c in COLOURS], padding=True, return_tensors="pt")
        out = model.clip(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                         pixel_values=proc(images=list(ex.images), return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-4, rtol=1e-5)
    # another name for class 0 changes that class's logits and no other
    other = build_model(bundle.task.cfg, in_memory(names=["crimson", "green", "blue"]))
    with torch.no_grad():
        renamed = other.task.logits(other.model, batch)
    assert (renamed[:, 0] - logits[:, 0]).abs().max() > 1e-4
    torch.testing.assert_close(renamed[:, 1:], logits[:, 1:])


def test_image_features_are_computed_once_per_image(bundle, monkeypatch):
    model, task = bundle.model, bundle.task
    task._features.clear()
    enc = task.encode(in_memory(n=12))
    seen = []
    real = model.image_features
    monkeypatch.setattr(model, "image_features", lambda pixels: seen.append(len(pixels)) or real(pixels))
    first = task.loss(model, task.collate(enc, torch.arange(12)))
    second = task.loss(model, task.collate(enc, torch.arange(12)))
    assert seen == [12]  # the second pass reads every feature from the cache
    task.cache_image_features = False
    try:
        third = task.loss(model, task.collate(enc, torch.arange(12)))
    finally:
        task.cache_image_features = True
    assert seen == [12, 12]
    assert float(first.detach()) == float(second.detach()) == pytest.approx(float(third.detach()), abs=1e-6)


def test_federated_prompt_learning_moves_only_the_context(tmp_path):
    """Three rounds of PromptFL through the normal path (an .npz source, partitioned, simulated): the only shared
    parameter is the context, the bytes a client sends are its M x width fp32 values, CLIP is untouched, round 0 is
    zero-shot CLIP, and the held-out loss falls."""
    cfg = clip_config(tmp_path, write_npz(tmp_path / "colours.npz"))
    sim = Simulation(prepare(cfg))
    assert sim.spec.names == ["context_vectors.weight"] and sim.spec.shapes["context_vectors.weight"] == (M, WIDTH)
    base = {n: p.detach().clone() for n, p in sim.model.clip.named_parameters()}
    assert not any(p.requires_grad for p in sim.model.clip.parameters())
    start = sim.global_flat.clone()
    payload = make_codec("fp32").encode(sim.spec.unflatten(start))
    assert list(make_codec("fp32").decode(payload)) == ["context_vectors.weight"]
    rows = sim.run()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    one = len(payload)
    assert M * WIDTH * 4 <= one < M * WIDTH * 4 + 128  # the values and a safetensors header, nothing else
    assert all(r["bytes_up"] == 3 * one and r["bytes_down"] == 3 * one for r in rows[1:])
    losses = [r["eval_loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, base[n]) for n, p in sim.model.clip.named_parameters())
    assert (sim.global_flat - start).abs().max() > 1e-3  # the averaged context moved


def test_bare_integer_labels_are_refused_naming_label_names(tmp_path):
    cfg = clip_config(tmp_path, write_npz(tmp_path / "ints.npz", names=None))
    with pytest.raises(DataError, match=r"data\.label_names.*bare numbers"):
        Simulation(prepare(cfg))
    with pytest.raises(ConfigError, match=r"data\.label_names.*bare numbers"):
        clip_config(tmp_path, "x.npz", **{"data.label_names": ["0", "1", "2"]})


def test_fewer_names_than_classes_are_refused_naming_label_names(tmp_path):
    cfg = clip_config(tmp_path, "memory")
    ex = in_memory()
    ex.label_names = ["red", "green"]
    with pytest.raises(DataError, match=r"data\.label_names: 2 class name\(s\) for labels up to 2"):
        build_model(cfg, ex)


def test_a_model_without_a_text_tower_is_refused_before_weights_load(tmp_path):
    vit = tmp_path / "vit"
    vit.mkdir()  # a config and no weights: refused from the config alone
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32,
                                                 "patch_size": 8}))
    with pytest.raises(ConfigError, match=r"task\.name 'clip_prompt'.*model\.name_or_path .*vit.*no text tower"):
        clip_config(tmp_path, "x.npz", **{"model.from_config": None, "model.name_or_path": str(vit)})


def test_other_methods_and_tasks_are_refused_at_config_time(tmp_path):
    with pytest.raises(ConfigError, match=r"adapter\.method 'lora' is not supported with it.*adapter\.method: coop"):
        clip_config(tmp_path, "x.npz", **{"adapter.method": "lora"})
    with pytest.raises(ConfigError, match=r"adapter\.method 'coop'.*task\.name 'classification'.*clip_prompt"):
        clip_config(tmp_path, "x.npz", **{"task.name": "classification"})


def test_prompts_longer_than_the_text_model_reads_are_refused_before_the_base_loads(tmp_path):
    cfg = clip_config(tmp_path, "memory", **{"adapter.num_virtual_tokens": 30, "adapter.context_init": None})
    with pytest.raises(ConfigError, match=r"adapter\.num_virtual_tokens: the prompts are up to 34 tokens.*at most 32"):
        build_model(cfg, in_memory())


def test_context_init_must_fill_the_context(tmp_path):
    cfg = clip_config(tmp_path, "memory", **{"adapter.num_virtual_tokens": 6})
    with pytest.raises(ConfigError, match=r"adapter\.context_init: 'a photo of a' is 4 tokens.*num_virtual_tokens"):
        build_model(cfg, in_memory())
    cfg = clip_config(tmp_path, "memory", **{"adapter.num_virtual_tokens": 6, "adapter.context_init": None})
    b = build_model(cfg, in_memory())
    assert b.model.context.shape == (6, WIDTH) and 0.01 < float(b.model.context.std().detach()) < 0.03  # N(0, 0.02)
    again = build_model(cfg, in_memory())
    assert torch.equal(b.model.context, again.model.context)  # drawn by purpose coop_context from the run's seed


@needs_fashion
def test_the_built_in_clip_fashion_config_on_fashion_mnist(tmp_path):
    """The shipped config with the tiny CLIP in place of ViT-B/32: the ten Fashion-MNIST class names are the prompts,
    one round runs from zero-shot (round 0)."""
    from fedfm.config import load_config

    over = {"model.name_or_path": None, "model.from_config": TINY_CLIP, "model.tokenizer": "minilm",
            "model.image_processor": PROCESSOR, "data.max_examples": 400, "partition.num_clients": 3,
            "federation.clients_per_round": 3, "federation.min_clients": 1, "federation.rounds": 1,
            "client.steps": 2, "client.epochs": None, "eval.max_examples": 64, "runtime.threads": 1,
            "output.dir": str(tmp_path / "run")}
    cfg = load_config("clip-fashion", [f"{k}={json.dumps(v) if isinstance(v, dict) or v is None else v}"
                                       for k, v in over.items()])
    assert cfg.adapter.method == "coop" and cfg.adapter.context_init == "a photo of a"
    sim = Simulation(prepare(cfg))
    from fedfm.data.images import FASHION_MNIST_CLASSES

    assert sorted(sim.task.class_names) == sorted(FASHION_MNIST_CLASSES)
    assert sim.model.class_names == sim.task.class_names
    rows = sim.run()
    assert [r["round"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["eval_loss"]) and 0 <= r["eval_accuracy"] <= 1 for r in rows)


def test_the_batched_runtime_runs_clip_clients_one_after_another(tmp_path):
    cfg = clip_config(tmp_path, write_npz(tmp_path / "colours.npz", n=48), **{"runtime.name": "batched",
                                                                               "federation.rounds": 1})
    sim = Simulation(prepare(cfg))
    assert any("adapter.method 'coop'" in n and "one after another" in n for n in sim.runtime.notes), sim.runtime.notes
    rows = sim.run()
    assert rows[-1]["aggregated"] and np.isfinite(rows[-1]["eval_loss"])


def test_the_saved_context_loads_back_onto_a_fresh_clip(bundle, tmp_path):
    model, task = bundle.model, bundle.task
    enc = task.encode(in_memory())
    batch = task.collate(enc, torch.arange(12))
    start = model.context.detach().clone()
    with torch.no_grad():
        model.context.add_(torch.randn(model.context.shape, generator=torch.Generator().manual_seed(1)))
        want = task.logits(model, batch)
    model.save_pretrained(str(tmp_path / "model"))
    with torch.no_grad():
        model.context.copy_(start)  # the module's bundle as the other tests found it
    assert json.loads((tmp_path / "model" / "coop_config.json").read_text())["class_names"] == COLOURS
    fresh = build_model(task.cfg, in_memory())
    fresh.model.load_context(str(tmp_path / "model"))
    with torch.no_grad():
        torch.testing.assert_close(fresh.task.logits(fresh.model, batch), want)
    other = build_model(task.cfg, in_memory(names=["crimson", "green", "blue"]))
    with pytest.raises(ValueError, match="learned for the classes"):
        other.model.load_context(str(tmp_path / "model"))


def test_the_tokenized_cache_tells_images_and_image_processors_apart(bundle, tmp_path):
    """Two image sources with the same labels are two cache entries (the key hashes the images), and so are two image
    processors; the same images and settings are read back from the cache."""
    from fedfm.tasks.cache import cache_key, encode_cached

    task = bundle.task
    a, b = in_memory(), in_memory()
    b.images = [np.ascontiguousarray(im[::-1]) for im in b.images]  # the same labels, other pixels
    assert cache_key(task, a) != cache_key(task, b)
    assert cache_key(task, a) == cache_key(task, in_memory())
    other = type(task)(task.cfg, type(task.tokenizer)(task.tokenizer.tokenizer, type(task.tokenizer.image_processor)(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})))
    assert cache_key(other, a) != cache_key(task, a)
    first, hit = encode_cached(task, a, tmp_path)
    again, hit_again = encode_cached(task, a, tmp_path)
    assert not hit and hit_again and torch.equal(first["images"], again["images"])
