"""data.synthetic: the generated pool (a tiny causal LM built from a config writes gibberish, which is enough for the
mechanics), which rows each client gets, the cache, the run directory, and the refusals at config time."""
import json

import numpy as np
import pytest

from fedfm.config import load_config
from fedfm.data import synthetic
from fedfm.errors import ConfigError
from fedfm.models import loader
from tests.conftest import make_rows, write_csv

TINY_LLAMA = {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 32, "max_position_embeddings": 128,
              "vocab_size": 30522}
GENERATOR = {"name_or_path": None, "from_config": TINY_LLAMA, "tokenizer": "minilm"}
SYN = {"generator": GENERATOR, "per_class": 6, "ratio": 0.5, "threshold": 0.2, "max_new_tokens": 6,
       "temperature": 1.0, "batch_size": 8}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def config(tiny_config, **syn):
    # shards of 1 class-sorted shard per client: each client lacks all but one or two of the 4 classes
    return tiny_config(**{"data.synthetic": {**SYN, **syn}, "partition.method": "shards",
                          "partition.shards_per_client": 1, "data.tokenized_cache": False})


def test_pool_has_per_class_rows_with_their_labels_and_is_seeded(cache):
    cfg = load_config("bbc-lora", [f"data.synthetic={json.dumps(SYN)}"])
    labels = ["money", "music", "sport", "tech"]
    pool = synthetic.generate_pool(cfg.data.synthetic, labels, seed=3, cache_dir=cache)
    assert not pool.from_cache and pool.seconds > 0
    assert {name: len(ix) for name, ix in pool.by_class.items()} == {name: 6 for name in labels}
    for name, ix in pool.by_class.items():
        rows = [pool.rows[k] for k in ix]
        assert all(r["label"] == name and r["prompt"] == cfg.data.synthetic.prompt.replace("{label}", name)
                   and r["text"].strip() for r in rows)
        assert len({r["text"].casefold() for r in rows}) == len(rows)  # no duplicate within a class
    again = synthetic.generate_pool(cfg.data.synthetic, labels, seed=3, cache_dir=cache / "elsewhere")
    assert [r["text"] for r in again.rows] == [r["text"] for r in pool.rows]  # same seed, same rows
    other = synthetic.generate_pool(cfg.data.synthetic, labels, seed=4, cache_dir=cache)
    assert [r["text"] for r in other.rows] != [r["text"] for r in pool.rows]


def test_only_lacking_classes_are_added_at_the_ratio_and_never_to_test_rows(tiny_config, cache):
    from fedfm.simulation import prepare

    cfg = config(tiny_config)
    prepared = prepare(cfg)
    data, syn = prepared.data, prepared.synthetic
    ex = data.examples
    n_real = len(ex.texts) - sum(map(len, syn.assigned.values()))
    assert len(ex.texts) == len(ex.labels) and n_real == 240
    synthetic_rows = np.arange(n_real, len(ex.texts))
    assert not np.isin(synthetic_rows, data.test).any()  # never the server's held-out set
    assigned = 0
    for c in data.clients:
        assert not np.isin(synthetic_rows, c.test).any()  # nor a client's local test split
        real = c.train[c.train < n_real]
        added = c.train[c.train >= n_real]
        share = np.bincount(ex.labels[real], minlength=4) / len(real)
        lacking = [k for k in range(4) if share[k] < 0.2]
        want = min(6, int(round(0.5 * len(real) / len(lacking)))) if lacking else 0
        got = np.bincount(ex.labels[added], minlength=4)
        assert {k for k in range(4) if got[k]} == ({k for k in lacking} if want else set())
        assert all(got[k] == want for k in lacking)
        assert syn.per_client.get(c.id, {}) == {ex.label_names[k]: int(got[k]) for k in range(4) if got[k]}
        for k in added:  # the row is the pool's text under the pool's label
            assert any(r["text"] == ex.texts[k] and r["label"] == ex.label_names[ex.labels[k]] for r in syn.pool.rows)
        assigned += len(added)
    assert assigned > 0 and any("synthetic data (fill-missing" in note for note in data.notes)


def test_a_second_run_reads_the_pool_from_the_cache(tiny_config, cache, monkeypatch):
    from fedfm.simulation import prepare

    first = prepare(config(tiny_config)).synthetic
    assert not first.pool.from_cache and first.pool.path.is_file() and cache in first.pool.path.parents

    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(synthetic, "load_generator", no_generation)
    second = prepare(config(tiny_config)).synthetic
    assert second.pool.from_cache and second.pool.rows == first.pool.rows
    assert second.per_client == first.per_client
    with pytest.raises(AssertionError, match="generated again"):  # another prompt is another pool
        prepare(config(tiny_config, prompt="A short story about {label}."))


def test_the_run_directory_holds_the_rows_and_partition_says_who_got_what(tiny_config, cache, tmp_path):
    from typer.testing import CliRunner

    from fedfm.cli import app

    path = tmp_path / "run.yaml"
    cfg = config(tiny_config, **{"ratio": 1.0})
    cfg.federation.rounds = 1
    path.write_text(cfg.to_yaml())
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 6 and {r["label"] for r in rows} == {"money", "music", "sport", "tech"}
    part = json.loads((run / "partition.json").read_text())
    got = {c["id"]: c.get("synthetic", {}) for c in part["clients"]}
    for r in rows:  # every client a row names got a row of that label
        assert all(got[cid].get(r["label"], 0) > 0 for cid in r["clients"])
    assert sum(len(r["clients"]) for r in rows) == sum(sum(v.values()) for v in got.values()) > 0
    assert "synthetic data" in res.output


@pytest.mark.parametrize("syn, key", [
    ({"generator": "minilm"}, "data.synthetic.generator: 'minilm' is not a generative model"),
    ({"generator": None}, "data.synthetic.generator: none given"),
    ({"generator": {"name_or_path": None, "from_config": {**TINY_LLAMA, "model_type": "bert"}, "tokenizer": "minilm"}},
     "data.synthetic.generator: \"from_config 'bert'\" is not a generative model"),
    ({"generator": {"name_or_path": None, "from_config": TINY_LLAMA}}, "data.synthetic.generator.tokenizer"),
    ({"prompt": "Write a news article."}, "data.synthetic.prompt: expected a template with {label}"),
    ({"strategy": "fill-everything"}, "data.synthetic.strategy: unknown synthetic data strategy"),
])
def test_refused_at_config_time_naming_the_key(syn, key, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loader, "load_base", no_load)
    with pytest.raises(ConfigError) as err:
        load_config("bbc-lora", [f"data.synthetic={json.dumps({**SYN, **syn})}"])
    assert key in str(err.value)


def test_refused_on_a_task_without_labels():
    with pytest.raises(ConfigError, match="data.synthetic: writes labelled rows .* task.name 'instruction' has no "
                                          "labels"):
        load_config("smollm2-chat", [f"data.synthetic={json.dumps(SYN)}"])
    with pytest.raises(ConfigError, match="data.synthetic: needs data.label_column"):
        load_config("bbc-lora", [f"data.synthetic={json.dumps(SYN)}", "data.label_column=null",
                                 "partition.method=iid"])


def test_the_default_generator_is_smollm2_and_a_string_names_it():
    cfg = load_config("bbc-lora", ["data.synthetic={}"])
    assert cfg.data.synthetic.generator.name_or_path == "smollm2-135m-instruct"
    assert "{label}" in cfg.data.synthetic.prompt and cfg.data.synthetic.strategy == "fill-missing"
    cfg = load_config("bbc-lora", ["data.synthetic.generator=smollm2"])
    assert cfg.data.synthetic.generator.name_or_path == "smollm2"


@pytest.mark.e2e
def test_smollm2_writes_a_handful_of_rows(tmp_path):
    """The real generator: SmolLM2-135M-Instruct (the shipped GGUF, converted once), one short row per class."""
    cfg = load_config("bbc-lora", ['data.synthetic={"per_class": 1, "max_new_tokens": 16}'])
    labels = ["business", "sport"]
    pool = synthetic.generate_pool(cfg.data.synthetic, labels, seed=0, cache_dir=tmp_path)
    assert [r["label"] for r in pool.rows] == labels
    assert all(len(r["text"].split()) >= 2 for r in pool.rows), pool.rows


def test_a_client_in_its_own_process_adds_what_its_own_file_lacks(tiny_config, cache, tmp_path):
    """A deployment's client (client.party.Client): it reads its own file, picks its lacking classes from its own
    labels and adds the pool's rows to its training rows only."""
    from fedfm.client.party import Client

    rows = [r for r in make_rows(80) if r["label"] in ("sport", "music")]  # this site has no money or tech rows
    path = write_csv(tmp_path / "site.csv", rows)
    cfg = config(tiny_config, **{"ratio": 0.25})
    cfg.data.label_names = ["money", "music", "sport", "tech"]
    client = Client.from_config(cfg, path, client_id=3)
    own = client.ctx.local[3]
    labels = own.encoded["labels"].numpy()
    assert len(labels) == len(rows) + 2 * 4  # 4 of each of its two lacking classes: round(0.25 x 32 / 2)
    assert (own.test < len(rows)).all() and len(own.train) == round(0.8 * len(rows)) + 8
    added = own.train[own.train >= len(rows)]
    assert sorted(labels[added].tolist()) == [0] * 4 + [3] * 4  # money and tech, nothing else
