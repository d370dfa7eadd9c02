"""Instruction tuning: response-only loss masks, the three data layouts, packing, generation scoring, end to end."""
import json

import numpy as np
import pytest
import torch

from fedfm.config import RunConfig, load_config
from fedfm.data.sources import load_examples
from fedfm.errors import DataError
from fedfm.models.loader import load_tokenizer
from fedfm.tasks import make_task
from fedfm.tasks.instruction import normalize_answer

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 256}
QA = [("what is the capital of france", "paris is the capital"), ("what colour is the sky", "the sky is blue"),
      ("how many legs has a cat", "a cat has four legs"), ("what do bees make", "bees make honey")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(RunConfig().model)  # the MiniLM WordPiece tokenizer: no chat template of its own


def _task(tokenizer, template=None, **task):
    tokenizer.chat_template = template
    cfg = RunConfig(task={"name": "instruction", "max_length": 64, **task})
    return make_task(cfg, tokenizer)


def _masked_text(task, enc, i):
    n = int(enc["lengths"][i])
    ids, labels = enc["input_ids"][i, :n], enc["labels"][i, :n]
    return task.tokenizer.decode(ids[labels != -100])


def _examples(convs):
    from fedfm.data.sources import Examples

    return Examples(texts=None, messages=convs)


def test_loss_mask_covers_only_the_response_with_a_chat_template(tokenizer):
    task = _task(tokenizer, CHATML)
    conv = [{"role": "user", "content": "what is the capital of france"},
            {"role": "assistant", "content": "paris is the capital"}]
    enc = task.encode(_examples([conv]))
    # the answer and its end-of-turn marker are targets; the question and the template are not
    assert _masked_text(task, enc, 0) == "paris is the capital < | im _ end | >"
    n = int(enc["lengths"][0])
    assert int((enc["labels"][0, :n] != -100).sum()) == len(tokenizer("paris is the capital<|im_end|>\n",
                                                                      add_special_tokens=False)["input_ids"])
    assert task.prompts[0].endswith("<|im_start|>assistant\n") and "france" in task.prompts[0]


def test_every_assistant_turn_of_a_multi_turn_chat_is_a_target(tokenizer):
    task = _task(tokenizer, CHATML, system_prompt="be brief", max_length=128)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine thanks"}]
    enc = task.encode(_examples([conv]))
    text = _masked_text(task, enc, 0)
    assert "hello there" in text and "fine thanks" in text
    assert "how are you" not in text and "brief" not in text and "hi" not in text.split()
    assert task.prompts[0].startswith("<|im_start|>system\nbe brief")
    assert task.answers[0] == "fine thanks"


def test_without_a_chat_template_the_alpaca_layout_is_used(tokenizer):
    task = _task(tokenizer, None)
    conv = [{"role": "user", "content": "what do bees make"}, {"role": "assistant", "content": "bees make honey"}]
    enc = task.encode(_examples([conv]))
    assert _masked_text(task, enc, 0) == "bees make honey"
    assert task.prompts[0] == "### Instruction:\nwhat do bees make\n\n### Response:\n"


def test_truncation_is_reported_and_never_yields_nan(tokenizer):
    task = _task(tokenizer, CHATML, max_length=8)
    conv = [{"role": "user", "content": "a very long question " * 5}, {"role": "assistant", "content": "answer"}]
    enc = task.encode(_examples([conv]))
    assert (enc["labels"] == -100).all() and "cut at task.max_length=8" in task.notes[0]
    model = _model()
    loss = task.loss(model, next(task.batches(enc, np.array([0]), 1)))
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0


def _model():
    import transformers

    torch.manual_seed(0)
    conf = dict(TINY_LLAMA)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(conf.pop("model_type"), **conf))


def test_loss_equals_transformers_loss_on_the_same_labels(tokenizer):
    task = _task(tokenizer, CHATML)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    enc = task.encode(_examples(convs))
    batch = next(task.batches(enc, np.arange(4), 4))
    model = _model()
    ours = task.loss(model, batch)  # logits only where a target follows
    ref = model(**batch).loss  # transformers: all logits, mean over the same targets
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)


def test_packing_fills_rows_and_keeps_every_target(tokenizer):
    task = _task(tokenizer, CHATML, packing=True, max_length=48)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA * 3]
    enc = task.encode(_examples(convs))
    batches = list(task.batches(enc, np.arange(len(convs)), 4, torch.Generator().manual_seed(0)))
    total = int(enc["lengths"].sum())
    rows = torch.cat([b["input_ids"] for b in batches])
    assert rows.shape[1] == 48 and rows.shape[0] == -(-total // 48)
    assert int(torch.cat([b["attention_mask"] for b in batches]).sum()) == total
    assert int(sum((b["labels"] != -100).sum() for b in batches)) == int((enc["labels"] != -100).sum())
    plain = list(task.batches(enc, np.arange(len(convs)), 4))  # evaluation is never packed
    assert len(plain) == 3


def test_three_data_layouts_give_the_same_conversation(tmp_path):
    rows = {
        "alpaca": [{"instruction": "add the numbers", "input": "2 and 3", "output": "5"}],
        "chat": [{"messages": [{"role": "user", "content": "add the numbers\n\n2 and 3"},
                               {"role": "assistant", "content": "5"}]}],
        "prompt_completion": [{"prompt": "add the numbers\n\n2 and 3", "completion": "5"}],
    }
    got = {}
    for fmt, rs in rows.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rs))
        cfg = RunConfig(data={"source": str(path), "label_column": None})
        got[fmt] = load_examples(cfg.data, needs_labels=False, chat=True).messages
    assert got["alpaca"] == got["chat"] == got["prompt_completion"]


def test_bad_instruction_data_names_what_is_expected(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    cfg = RunConfig(data={"source": str(path), "label_column": None})
    with pytest.raises(DataError, match="'messages'.*'instruction'.*'prompt'/'completion'"):
        load_examples(cfg.data, needs_labels=False, chat=True)
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="row 0: each message needs a role"):
        load_examples(cfg.data, needs_labels=False, chat=True)


def test_chatterbot_qa_has_one_client_per_category():
    cfg = load_config("smollm2-chat")
    ex = load_examples(cfg.data, needs_labels=False, chat=True)
    cats = set(ex.groups.tolist())
    assert len(cats) == 21 and {"ai", "trivia", "tech_support"} <= cats
    assert 800 < len(ex) < 1000  # 2,026 listed conversations, 899 distinct
    assert len({json.dumps(m) + g for m, g in zip(ex.messages, ex.groups)}) == len(ex)  # no duplicates
    assert all(c[-1]["role"] == "assistant" for c in ex.messages)


def test_held_out_prompts_are_scored_only_against_held_out_answers(tokenizer, tmp_path):
    from fedfm.data import build_federated_data

    # Alpaca rows: 30 instructions (some with an input) answered 1 to 3 times, every answer different
    rows = [{"instruction": f"Name a colour, number {q}", "input": "in one word" if q % 2 else "",
             "output": f"colour {q}-{a}"} for q in range(30) for a in range(1 + q % 3)]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(task={"name": "instruction"}, data={"source": str(path), "label_column": None, "test_fraction": 0.3},
                    partition={"method": "iid", "num_clients": 2, "local_test_fraction": 0.0},
                    federation={"clients_per_round": 2})
    ex = load_examples(cfg.data, needs_labels=False, chat=True)
    fed = build_federated_data(cfg, ex)
    task = _task(tokenizer, CHATML)
    task.encode(ex)
    train = np.concatenate([c.train for c in fed.clients])
    held_answers = {task.answers[i] for i in fed.test}
    assert len(fed.test) == 18  # round(0.3 * 60), reached by whole prompts
    assert not {task.prompts[i] for i in fed.test} & {task.prompts[i] for i in train}
    for j in fed.test:  # no held-out prompt has an answer in training
        assert not {task.answers[i] for i in train if task.prompts[i] == task.prompts[j]}
    assert held_answers


def test_references_come_from_the_held_out_set_only_whatever_split_the_data_came_with(tokenizer, monkeypatch):
    """A source with its own split can put one prompt on both sides: the training answer is then never a
    reference for the held-out one."""
    from fedfm.tasks import instruction

    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}] for a in ("hello", "hey", "yo")]
    task = _task(tokenizer, CHATML)
    task.encode(_examples(convs))
    monkeypatch.setattr(instruction, "generate_text", lambda model, tok, prompts, *a, **k: ["hello"] * len(prompts))
    held_out = np.array([1, 2])  # example 0 ("hello") is a training example
    _, records = task.generate(None, held_out, pool=held_out)
    assert [r["num_references"] for r in records] == [2, 2] and all(r["rougeL"] == 0 for r in records)
    _, pooled = task.generate(None, held_out, pool=np.array([0, 1, 2]))  # what pooling over all examples did
    assert all(r["rougeL"] == 1 for r in pooled)


def test_exact_match_is_also_scored_on_short_answers_alone(tokenizer, monkeypatch):
    from fedfm.tasks import instruction

    qa = [("capital of france?", "Paris."), ("say hi", "hello there"), ("tell a story", "once upon a time there was")]
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in qa]
    task = _task(tokenizer, CHATML)
    task.encode(_examples(convs))
    monkeypatch.setattr(instruction, "generate_text", lambda model, tok, prompts, *a, **k: [
        {"capital of france?": "paris", "say hi": "hi", "tell a story": "once upon a time there was"}[
            next(q for q, _ in qa if q in p)] for p in prompts])
    metrics, records = task.generate(None, np.arange(3))
    assert [r["short_answer"] for r in records] == [True, True, False]  # 1 and 2 words; 6 words
    assert metrics["exact_match"] == pytest.approx(2 / 3)  # "paris" and the story
    assert metrics["exact_match_short"] == pytest.approx(1 / 2) and metrics["short_answers"] == 2


def test_exact_match_normalisation():
    assert normalize_answer("The Sky is  blue!") == normalize_answer("sky is blue")
    assert normalize_answer("Paris") != normalize_answer("Lyon")


def test_tiny_instruction_run_learns_and_writes_generations(tmp_path):
    from fedfm.simulation import Simulation, prepare
    from fedfm.tracking import RunDir

    # 48 distinct prompts: each question under 12 lead-ins. The held-out set is drawn by prompt, so the model is
    # scored on lead-ins it never saw, with answers it learnt under the other lead-ins.
    asked = [(f"question {k}: {q}", a) for k in range(12) for q, a in QA]
    rows = [{"prompt": q, "completion": a, "site": f"s{i % 2}"} for i, (q, a) in enumerate(asked)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ov = {"name": "tiny-chat", "model": {"name_or_path": None, "from_config": TINY_LLAMA, "tokenizer": "minilm"},
          "adapter": {"method": "full"},
          "task": {"name": "instruction", "max_length": 32},
          "data": {"source": str(path), "label_column": None, "client_column": "site"},
          "partition": {"method": "by_column", "local_test_fraction": 0.0},
          "federation": {"rounds": 3, "clients_per_round": 2, "min_clients": 1},
          "client": {"lr": 0.01, "epochs": 3, "batch_size": 8},
          "eval": {"initial": True, "per_client": False, "generation": {"num_prompts": 4, "max_new_tokens": 6}},
          "runtime": {"threads": 1}, "output": {"dir": str(tmp_path / "run")}}
    from fedfm.config import validate_config

    cfg = validate_config(ov)
    rd = RunDir(cfg.output_dir())
    rd.create(overwrite=False)
    rd.write_config(cfg.to_yaml())
    server = Simulation(prepare(cfg), rd)
    out = server.run()
    assert out[-1]["eval_loss"] < 0.75 * out[0]["eval_loss"]
    gens = rd.read_generations()
    assert sorted(gens) == [0, 1, 2, 3]
    first = gens[0]
    assert len(first) == 4 and {"prompt", "reference", "generation", "exact_match", "rougeL"} <= set(first[0])
    assert [g["prompt"] for g in gens[3]] == [g["prompt"] for g in first]  # the same fixed held-out prompts
    assert 0.0 <= out[-1]["eval_rougeL"] <= 1.0
    from typer.testing import CliRunner

    from fedfm.cli import app

    res = CliRunner().invoke(app, ["generate", str(rd.path), QA[3][0], "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert res.output.strip()  # whatever the tiny model says, through the same chat template


def test_generate_refuses_a_classification_run(tiny_csv, tmp_path):
    from typer.testing import CliRunner

    from fedfm.cli import app
    from tests.conftest import tiny_overrides

    runner = CliRunner()
    res = runner.invoke(app, ["run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path, **{"federation.rounds": 1})])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", str(tmp_path / "run"), "hello"])
    assert res.exit_code == 2 and "does not generate text" in res.output
