"""Gradient checkpointing gives the same gradients; bf16 autocast trains with fp32 adapter weights."""
import numpy as np
import pytest
import torch

from fedfm.config import validate_config
from fedfm.data.sources import Examples
from fedfm.models import build_model

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 128}
CONVS = [[{"role": "user", "content": f"question number {i}"}, {"role": "assistant", "content": f"answer {i}"}]
         for i in range(8)]


def _grads(**model_opts):
    cfg = validate_config({"model": {"name_or_path": None, "from_config": TINY_LLAMA, "tokenizer": "minilm",
                                     **model_opts},
                           "adapter": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                           "task": {"name": "instruction", "max_length": 48}, "data": {"label_column": None}})
    bundle = build_model(cfg, None)
    ex = Examples(texts=None, messages=CONVS)
    enc = bundle.task.encode(ex)
    batch = next(bundle.task.batches(enc, np.arange(8), 8))
    loss = bundle.task.loss(bundle.model, batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in bundle.spec.params.items()}, bundle


def test_gradient_checkpointing_gives_the_same_gradients():
    l0, g0, _ = _grads()
    l1, g1, bundle = _grads(gradient_checkpointing=True)
    assert bundle.model.get_base_model().is_gradient_checkpointing
    assert l0 == pytest.approx(l1, rel=1e-6)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4), n


def test_bf16_autocast_trains_fp32_adapters():
    l0, g0, _ = _grads()
    l1, g1, bundle = _grads(autocast="bf16")
    assert all(p.dtype == torch.float32 for p in bundle.spec.params.values())
    assert l1 == pytest.approx(l0, rel=0.05)  # bf16 matmuls: close, not equal
    assert all(torch.isfinite(g).all() for g in g1.values())
