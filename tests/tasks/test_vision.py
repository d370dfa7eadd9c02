"""Image classification: a tiny ViT and a tiny DINOv2 built from a config with an image processor built in code, on
a small learnable set of images (.npz); LoRA, IA3, BitFit and the head; the batched runtime gives the local runtime's
updates; uint8 encodings normalised per batch as the processor would; the tokenized cache keyed by the pixels;
config-time refusals (text model for images, image model for text, prompt/prefix tuning, an image size a model
cannot take)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedfm.config import load_config
from fedfm.data.sources import Examples
from fedfm.errors import ConfigError
from fedfm.simulation import Simulation, prepare

from ..conftest import TINY_BERT  # noqa: TID252
from ..runtime.test_batched import _both, _compare, _tasks  # noqa: TID252

TINY_DINOV2 = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "mlp_ratio": 2, "patch_size": 4, "image_size": 16, "hidden_dropout_prob": 0.0,
               "attention_probs_dropout_prob": 0.0}
TINY_VIT = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "patch_size": 4, "image_size": 16, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}
TINY_CLIP = {"model_type": "clip", "vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                                     "intermediate_size": 64, "patch_size": 4, "image_size": 16},
             "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "intermediate_size": 64}}
# DINOv2's processor recipe (resize the short side, crop) at 16 px
PROCESSOR = {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 18},
             "crop_size": {"height": 16, "width": 16}, "image_mean": [0.485, 0.456, 0.406],
             "image_std": [0.229, 0.224, 0.225]}


def make_images(n: int = 160, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 20 x 20 RGB images whose class is the tint of a bright square (red, green, blue, white) at a random
    place: learnable in a few steps by a tiny model."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 80, size=(n, 20, 20, 3)).astype(np.uint8)
    for i, label in enumerate(labels):
        r, c = rng.integers(0, 10, size=2)
        channels = [int(label)] if label < 3 else [0, 1, 2]
        images[i, r:r + 10, c:c + 10, channels] += 150
    return images, labels


@pytest.fixture
def tiny_npz(tmp_path):
    images, labels = make_images()
    path = tmp_path / "images.npz"
    np.savez(path, images=images, labels=labels, label_names=np.array(["nw", "ne", "sw", "se"]))
    return path


def vision_overrides(source, tmp_path, **extra) -> list[str]:
    ov = {
        "name": "tiny-vision", "model.name_or_path": None, "model.from_config": TINY_DINOV2,
        "model.image_processor": PROCESSOR, "task.name": "image_classification", "adapter.target_modules": None,
        "data.source": str(source), "partition.num_clients": 4, "partition.alpha": 1.0, "federation.rounds": 2,
        "federation.clients_per_round": 2, "federation.min_clients": 1, "client.batch_size": 8, "client.lr": 0.01,
        "eval.batch_size": 32, "output.dir": str(tmp_path / "run"), "runtime.threads": 1, "model.dropout": 0.0,
        "data.tokenized_cache": False,
    }
    ov.update(extra)
    return [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) or v is None else v}" for k, v in ov.items()]


@pytest.fixture
def vision_config(tiny_npz, tmp_path):
    def make(**extra):
        return load_config("bbc-lora", vision_overrides(tiny_npz, tmp_path, **extra))

    return make


def test_two_rounds_of_lora_on_a_tiny_dinov2_learn_the_images(vision_config):
    cfg = vision_config(**{"federation.rounds": 3, "client.epochs": 2, "eval.initial": True})
    sim = Simulation(prepare(cfg))
    names = sim.spec.names
    assert any(".attention.attention.query.lora_A." in n for n in names)
    assert any(".attention.attention.value.lora_B." in n for n in names)
    assert not any(".key." in n or "fc1" in n for n in names)
    assert any("classifier.modules_to_save" in n for n in names)  # the fresh head is trained and shared
    rows = sim.run()
    acc = [r["eval_accuracy"] for r in rows]
    assert acc[0] < 0.5 and acc[-1] > 0.8, acc  # 4 classes: from chance to nearly right


@pytest.mark.parametrize("method, trained, frozen", [
    ("ia3", ["attention.attention.key.ia3_l", "attention.attention.value.ia3_l", "mlp.fc2.ia3_l"], ["query"]),
    ("bitfit", ["attention.attention.query.bias", "mlp.fc1.bias", "classifier.weight"], ["query.weight"]),
    ("head", ["classifier.weight", "classifier.bias"], ["encoder"]),
])
def test_ia3_bitfit_and_the_head_train_what_they_name(vision_config, method, trained, frozen):
    sim = Simulation(prepare(vision_config(**{"adapter.method": method, "federation.rounds": 1})))
    names = sim.spec.names
    for part in trained:
        assert any(part in n for n in names), (part, names[:6])
    for part in frozen:
        assert not any(part in n for n in names), part
    before = sim.global_flat.clone()
    rows = sim.run()
    assert rows[-1]["aggregated"] and not torch.equal(before, sim.global_flat)


@pytest.mark.parametrize("method", ["lora", "ia3", "head"])
def test_batched_clients_get_the_local_runtimes_update(vision_config, method):
    cfg = vision_config(**{"partition.alpha": 0.3, "client.epochs": 1, "client.batch_size": 8, "adapter.method": method})
    sim = Simulation(prepare(cfg))
    seq, bat = _both(sim, _tasks(sim))
    _compare(sim, seq, bat)


def test_a_vit_at_another_image_size_interpolates_its_position_embeddings(vision_config):
    cfg = vision_config(**{"model.from_config": TINY_VIT, "task.image_size": 24, "federation.rounds": 1})
    sim = Simulation(prepare(cfg))
    enc = sim.local[0].encoded
    assert enc["pixels"].shape[1:] == (3, 24, 24) and enc["pixels"].dtype == torch.uint8
    assert any("attention.attention.query.lora_A" in n for n in sim.spec.names)
    assert sim.run()[-1]["aggregated"]


def test_batches_are_normalised_as_the_processor_normalises(vision_config):
    from fedfm.models import build_model

    cfg = vision_config(**{"task.image_size": 12})
    images, labels = make_images(10)
    images = list(images)
    images[3] = images[3][:, :14]  # another shape: the processor resizes and crops every image alike
    ex = Examples(texts=None, images=images, labels=labels, label_names=["nw", "ne", "sw", "se"])
    bundle = build_model(cfg, ex)
    enc = bundle.task.encode(ex)
    assert enc["pixels"].dtype == torch.uint8 and enc["pixels"].shape == (10, 3, 12, 12)
    batch = bundle.task.collate(enc, torch.arange(10))
    # the processor's own float pipeline at the same size: resize the short side to 12·18/16, crop 12, normalise
    processor = bundle.tokenizer  # set to task.image_size for the run (and saved so beside the adapter)
    assert processor.size == {"shortest_edge": 14} and processor.crop_size == {"height": 12, "width": 12}
    ref = processor(list(ex.images), input_data_format="channels_last", return_tensors="pt")["pixel_values"]
    assert batch["pixel_values"].dtype == torch.float32
    assert torch.allclose(batch["pixel_values"], ref, atol=1e-5)
    assert batch["labels"].tolist() == labels.tolist()


def test_the_tokenized_cache_keeps_images_keyed_by_their_pixels(vision_config, tmp_path, monkeypatch):
    from fedfm.models import build_model
    from fedfm.tasks.cache import cache_key, encode_cached

    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    cfg = vision_config(**{"data.tokenized_cache": True})
    images, labels = make_images(8)
    ex = Examples(texts=None, images=list(images), labels=labels, label_names=["nw", "ne", "sw", "se"])
    task = build_model(cfg, ex).task
    first, cached = encode_cached(task, ex, tmp_path / "cache")
    again, cached_again = encode_cached(task, ex, tmp_path / "cache")
    assert not cached and cached_again and torch.equal(first["pixels"], again["pixels"])
    other = list(images)
    other[5] = other[5].copy()
    other[5][0, 0, 0] ^= 1  # one pixel differs: another entry
    assert cache_key(task, ex) != cache_key(task, Examples(texts=None, images=other, labels=labels,
                                                           label_names=ex.label_names))


def test_a_text_model_given_images_is_refused_at_config_time_naming_both_keys(vision_config):
    with pytest.raises(ConfigError, match=r"task.name 'image_classification' reads images, but model.name_or_path "
                                          r"'model.from_config \(bert\)'.* is a text model"):
        vision_config(**{"model.from_config": TINY_BERT})
    with pytest.raises(ConfigError, match=r"task.name 'image_classification' reads images, but model.name_or_path "
                                          r"'minilm'"):
        vision_config(**{"model.from_config": None, "model.name_or_path": "minilm"})


def test_an_image_model_given_a_text_task_is_refused_at_config_time(vision_config):
    with pytest.raises(ConfigError, match=r"task.name 'classification' reads text, but model.name_or_path "
                                          r"'model.from_config \(dinov2\)'.* is an image model"):
        vision_config(**{"task.name": "classification"})
    with pytest.raises(ConfigError, match=r"task.name 'lm' reads text, but model.name_or_path 'dinov2-small'"):
        vision_config(**{"task.name": "lm", "model.from_config": None, "model.name_or_path": "dinov2-small"})


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_are_refused_for_images(vision_config, method):
    with pytest.raises(ConfigError, match=rf"adapter.method '{method}' adds virtual text tokens.*task.name "
                                          r"'image_classification' needs lora, ia3, bitfit, head or full"):
        vision_config(**{"adapter.method": method})


def test_an_image_size_the_model_cannot_take_is_refused(vision_config):
    with pytest.raises(ConfigError, match=r"task.image_size 2 is smaller than one 4 x 4 patch"):
        vision_config(**{"task.image_size": 2})
    with pytest.raises(ConfigError, match=r"task.image_size 24: CLIPForImageClassification has position embeddings "
                                          r"for 16 px and cannot interpolate them"):
        vision_config(**{"model.from_config": TINY_CLIP, "task.image_size": 24})
    vision_config(**{"model.from_config": TINY_CLIP, "task.image_size": 16})  # its own size is fine


def test_label_flipping_attackers_flip_image_labels_and_a_text_backdoor_is_refused(vision_config):
    cfg = vision_config(**{"attack.kind": "label-flip", "attack.fraction": 0.5, "federation.rounds": 1})
    prepared = prepare(cfg)
    clean = prepare(vision_config(**{"federation.rounds": 1})).data.examples.labels
    bad = sorted(prepared.attack.malicious)
    assert bad
    for c in bad:
        idx = prepared.data.clients[c].train
        assert (prepared.data.examples.labels[idx] == (clean[idx] + 1) % 4).all()
    with pytest.raises(ConfigError, match=r"attack.kind 'backdoor' changes labels of text examples: it needs a text "
                                          r"classification task"):
        prepare(vision_config(**{"attack.kind": "backdoor", "attack.fraction": 0.5}))


def test_a_run_saves_its_processor_at_the_image_size_and_export_merge_keeps_it(tiny_npz, tmp_path):
    import transformers
    from typer.testing import CliRunner

    from fedfm.cli import app

    overrides = vision_overrides(tiny_npz, tmp_path, **{"task.image_size": 12, "federation.rounds": 1})
    res = CliRunner().invoke(app, ["run", "bbc-lora", *overrides])
    assert res.exit_code == 0, res.output
    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(out), "--merge"])
    assert res.exit_code == 0, res.output
    model = transformers.AutoModelForImageClassification.from_pretrained(str(out))
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    assert type(model).__name__ == "Dinov2ForImageClassification" and model.config.num_labels == 4
    assert processor.crop_size == {"height": 12, "width": 12}  # what the run trained on, not the 16 it was given
    pixels = processor(list(make_images(3)[0]), input_data_format="channels_last", return_tensors="pt")["pixel_values"]
    assert model(pixel_values=pixels).logits.shape == (3, 4)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_a_model_directory_as_the_hub_gives_it_with_its_own_processor(vision_config, tmp_path, kind):
    """What a hub id resolves to: a directory with config.json, weights and preprocessor_config.json (a full CLIP
    model's directory gives its vision tower and a fresh head)."""
    import transformers

    folder = tmp_path / kind
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**{k: v for k, v in TINY_VIT.items() if k != "model_type"}))
        processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16})
    else:
        model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=TINY_CLIP["vision_config"],
                                                               text_config=TINY_CLIP["text_config"]))
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    cfg = vision_config(**{"model.from_config": None, "model.image_processor": None, "model.name_or_path": str(folder),
                           "federation.rounds": 1})
    sim = Simulation(prepare(cfg))
    base = sim.model.get_base_model()
    assert type(base).__name__ == {"vit": "ViTForImageClassification", "clip": "CLIPForImageClassification"}[kind]
    own = model.vision_model if kind == "clip" else model
    emb = "embeddings.patch_embedding.weight" if kind == "clip" else "embeddings.patch_embeddings.projection.weight"
    got = base.vision_model if kind == "clip" else base.vit
    assert torch.equal(got.get_parameter(emb), own.get_parameter(emb))  # the directory's weights, not fresh ones
    target = "q_proj.lora_A" if kind == "clip" else "query.lora_A"
    assert any(target in n for n in sim.spec.names)
    assert sim.run()[-1]["aggregated"]
