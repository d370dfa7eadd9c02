"""The server's held-out set: conversations are held out a whole prompt at a time; labelled rows stay stratified."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fedfm.config import RunConfig
from fedfm.data import build_federated_data, grouped_split, prompt_groups, stratified_split
from fedfm.data.sources import load_examples


def _chat(*turns: str, system: str | None = None) -> list[dict]:
    conv = [{"role": "system", "content": system}] if system else []
    return conv + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def test_prompt_groups_join_conversations_that_answer_the_same_prompt():
    convs = [
        _chat("What is AI?", "A field of study"),
        _chat("what  is AI?", "Machine smarts"),                 # the same prompt, normalised
        _chat("Hi", "Hello", "How are you?", "Fine"),
        _chat("hi", "Hey"),                                      # answers the first prompt of the one before
        _chat("How are you?", "Good"),                           # not a prompt of the above: that one follows "Hi"
        _chat("What is AI?", "Smart machines", system="be brief"),  # system turns are not part of the prompt
    ]
    assert prompt_groups(convs).tolist() == [0, 0, 1, 1, 2, 0]


@pytest.mark.parametrize("sizes, fraction, held", [
    ([8, 2], 0.2, [2]),          # target 2: the group of 8 would overshoot by 6, so only the 2 joins
    ([3, 3, 3, 3], 0.25, [3]),   # target 3: one group exactly
    ([5, 5], 0.3, [5]),          # target 3: 5 is nearer to 3 than 0 is
    ([5, 5], 0.2, []),           # target 2: a group would land 3 away, farther than none at all
    ([4, 4], 0.0, []),
])
def test_grouped_split_holds_out_whole_groups_near_the_target(sizes, fraction, held):
    groups = np.repeat(np.arange(len(sizes)), sizes)
    for seed in range(5):
        rest, test = grouped_split(groups, fraction, np.random.default_rng(seed))
        assert not set(groups[rest]) & set(groups[test])  # whole groups
        assert sorted(sizes[g] for g in np.unique(groups[test])) == held
        assert sorted(rest.tolist() + test.tolist()) == list(range(len(groups)))


def test_grouped_split_is_seeded_and_close_to_the_fraction():
    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(300), rng.integers(1, 5, size=300))  # 300 prompts with 1-4 answers each
    a = grouped_split(groups, 0.1, np.random.default_rng([0, 1]))
    b = grouped_split(groups, 0.1, np.random.default_rng([0, 1]))
    c = grouped_split(groups, 0.1, np.random.default_rng([1, 1]))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert abs(len(a[1]) - round(0.1 * len(groups))) <= 1


def _prompts(conv: list[dict]) -> set[tuple[str, ...]]:
    """Every prompt a conversation answers (the user turns before each assistant turn), normalised."""
    out, users = set(), []
    for m in conv:
        if m["role"] == "user":
            users.append(" ".join(m["content"].lower().split()))
        elif m["role"] == "assistant":
            out.add(tuple(users))
    return out


def qa_with_repeated_prompts(path) -> list[dict]:
    """40 questions answered 1 to 4 times (in turn), plus multi-turn chats opening with some of the same questions."""
    rows = []
    for q in range(40):
        for a in range(1 + q % 4):
            rows.append({"messages": _chat(f"Question {q}?", f"answer {a} to {q}")})
    for q in range(0, 40, 5):
        rows.append({"messages": _chat(f"question {q}?", "yes", "and then?", f"then {q}")})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _chat_config(path, **data) -> RunConfig:
    return RunConfig(task={"name": "instruction"}, data={"source": str(path), "label_column": None, **data},
                     partition={"method": "iid", "num_clients": 2, "local_test_fraction": 0.0},
                     federation={"clients_per_round": 2})


def test_instruction_data_never_has_a_prompt_on_both_sides(tmp_path):
    rows = qa_with_repeated_prompts(tmp_path / "qa.jsonl")
    cfg = _chat_config(tmp_path / "qa.jsonl")
    ex = load_examples(cfg.data, needs_labels=False, chat=True)
    fed = build_federated_data(cfg, ex)
    train = np.concatenate([c.train for c in fed.clients])
    assert sorted(train.tolist() + fed.test.tolist()) == list(range(len(rows)))
    held_prompts = set().union(*(_prompts(ex.messages[i]) for i in fed.test))
    train_prompts = set().union(*(_prompts(ex.messages[i]) for i in train))
    assert held_prompts and not held_prompts & train_prompts
    assert abs(len(fed.test) - round(0.2 * len(rows))) <= 2  # whole prompts, as near to data.test_fraction as they go
    assert fed.notes == [f"held-out set: {len(fed.test)} of {len(rows)} conversations (data.test_fraction=0.2), drawn "
                         f"by prompt ({len({prompt_groups(ex.messages)[i] for i in fed.test})} of 40 prompt groups): "
                         "no prompt is answered in both training and the held-out set"]
    again = build_federated_data(cfg, load_examples(cfg.data, needs_labels=False, chat=True))
    assert np.array_equal(again.test, fed.test)  # seeded by federation.seed


def test_labelled_data_keeps_its_stratified_held_out_set(tiny_config):
    cfg = tiny_config()
    ex = load_examples(cfg.data, needs_labels=True)
    fed = build_federated_data(cfg, ex)
    _, expected = stratified_split(len(ex), ex.labels, cfg.data.test_fraction,
                                   np.random.default_rng([cfg.federation.seed, 1]))
    assert np.array_equal(fed.test, expected)
    assert np.bincount(ex.labels[fed.test]).tolist() == [12, 12, 12, 12]  # 20% of each class of 60


def test_the_run_says_how_the_held_out_set_was_chosen(tiny_config):
    from fedfm.display import Display
    from fedfm.simulation import Simulation, prepare

    said = []

    class Listen(Display):
        def message(self, text):
            said.append(text)

    Simulation(prepare(tiny_config(**{"federation.rounds": 1})), display=Listen())
    assert any(s.startswith("held-out set:") for s in said), said
