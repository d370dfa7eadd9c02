"""The ``fedfm`` command line: exit codes, one clear error before any model loads, a tiny run, report, export."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import fedfm.cli as cli
from fedfm.cli import app

from tests.conftest import make_rows, snapshot, tiny_overrides, write_csv


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich wraps at 80 columns when not on a terminal; keep paths and messages on one line."""
    monkeypatch.setattr(cli.console, "_width", 1000)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------ configs / --print-config

def test_configs_lists_bbc_lora():
    res = invoke("configs")
    assert res.exit_code == 0, res.output
    assert "bbc-lora" in res.output
    assert "MiniLM" in res.output  # the description from the YAML's first line


def test_print_config_with_override():
    res = invoke("run", "bbc-lora", "--print-config", "federation.rounds=3")
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(res.output)
    assert data["federation"]["rounds"] == 3
    assert "rounds: 3" in res.output
    assert data["name"] == "bbc-lora"
    assert data["adapter"]["method"] == "lora"


def test_print_config_default_config_when_first_arg_is_override():
    res = invoke("run", "federation.rounds=4", "adapter.r=2", "--print-config")
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(res.output)
    assert data["name"] == "bbc-lora"
    assert data["federation"]["rounds"] == 4
    assert data["adapter"]["r"] == 2


# ------------------------------------------------------------------ bad input: exit 2, before any model loads

def _model_loaded(*args, **kwargs):
    raise AssertionError("model loaded")


@pytest.fixture
def no_model(monkeypatch):
    import fedfm.models
    import fedfm.models.loader

    for mod, name in [(fedfm.models.loader, "load_base"), (fedfm.models.loader, "load_tokenizer"),
                      (fedfm.models, "build_model")]:  # fedfm.models reads the loader's names when it builds
        monkeypatch.setattr(mod, name, _model_loaded)


def _assert_clean_failure(res, *needles: str):
    assert not isinstance(res.exception, AssertionError), "a model was loaded before the input was checked"
    assert res.exit_code == 2, res.output
    out = one_line(res.output)
    assert out.count("error:") == 1, res.output
    for needle in needles:
        assert needle in out, res.output
    assert "Traceback" not in res.output


def test_model_guard_works(no_model, tiny_csv, tmp_path):
    """Sanity check of the guard: a valid tiny config does reach the (patched) model load."""
    res = invoke("run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path))
    assert isinstance(res.exception, AssertionError)
    assert "model loaded" in str(res.exception)


@pytest.fixture
def one_class_csv(tmp_path):
    return write_csv(tmp_path / "one_class.csv", [{**r, "label": "only"} for r in make_rows(40)])


BAD_INPUT = [
    # (id, extra overrides on the tiny run with its 4 clients, strings the message must contain)
    ("unknown-key", {"federation.roundz": 3}, ["federation.roundz", "did you mean 'federation.rounds'"]),
    ("wrong-type", {"federation.rounds": "abc"}, ["federation.rounds", "abc"]),
    ("alpha-zero", {"partition.alpha": 0}, ["partition.alpha", "> 0"]),
    ("alpha-negative", {"partition.alpha": -1}, ["partition.alpha", "> 0"]),
    ("too-many-per-round", {"federation.clients_per_round": 5}, ["federation.clients_per_round", "partition.num_clients"]),
    ("too-many-per-round-by-column",  # only known once the data is read: 4 distinct sites
     {"partition.method": "by_column", "data.client_column": "site", "federation.clients_per_round": 5},
     ["federation.clients_per_round", "4 clients in the data"]),
    ("fraction-zero", {"federation.fraction": 0}, ["federation.fraction", "(0, 1]"]),
    ("fraction-above-one", {"federation.fraction": 1.5}, ["federation.fraction", "(0, 1]"]),
    ("missing-file", {"data.source": "/nonexistent.csv"}, ["data.source", "/nonexistent.csv", "does not exist"]),
    ("missing-column", {"data.text_column": "nope"}, ["data.text_column", "'nope'", "text, label, site"]),
    ("one-class", "ONE_CLASS", ["data.label_column", "only one class"]),
    ("no-model", {"model.from_config": None, "model.name_or_path": "/no/such/model"},
     ["model.name_or_path", "/no/such/model", "does not exist"]),
    ("unknown-method", {"adapter.method": "lorra"}, ["adapter.method", "did you mean 'lora'"]),
    ("unknown-device", {"model.device": "tpu"}, ["model.device", "'tpu'", "not a device torch knows"]),
    ("absent-device", {"model.device": "cuda:7"}, ["model.device", "'cuda:7'"]),
    ("unknown-target-module", {"adapter.target_modules": ["query", "nope"]},
     ["adapter.target_modules", "'nope' matches no module", "query, token_type_embeddings, value"]),
    ("target-not-a-layer", {"adapter.target_modules": ["LayerNorm"]},
     ["adapter.target_modules", "'LayerNorm' matches", "not a linear"]),
    ("target-module-of-a-shipped-model", {"model.from_config": None, "model.name_or_path": "minilm",
                                          "adapter.target_modules": ["q_proj"]},
     ["adapter.target_modules", "'q_proj' matches no module"]),
    ("unknown-model-type", {"model.from_config": {"model_type": "bertt"}}, ["model.from_config", "'bertt'"]),
    ("infinite-lr", {"client.lr": "inf"}, ["client.lr", "finite"]),
    ("nan-alpha", {"partition.alpha": ".nan"}, ["partition.alpha", "finite"]),
    ("boolean-rank", {"adapter.r": "yes"}, ["adapter.r", "boolean"]),
]


@pytest.mark.parametrize("extra, needles", [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_input_exits_2_before_model_loads(no_model, tiny_csv, one_class_csv, tmp_path, extra, needles):
    if extra == "ONE_CLASS":
        extra = {"data.source": str(one_class_csv)}
    overrides = tiny_overrides(tiny_csv, tmp_path, **extra)
    res = invoke("run", "bbc-lora", *overrides)
    _assert_clean_failure(res, *needles)
    assert not (tmp_path / "run").exists(), "the run directory was created for an invalid run"


def test_output_dir_that_is_a_file_exits_2(no_model, tiny_csv, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for out in (taken, taken / "run"):
        res = invoke("run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path, **{"output.dir": str(out)}))
        _assert_clean_failure(res, "output.dir", f"{taken} is a file")
    assert taken.read_text() == "mine"


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A directory this process may not write into (tests may run as root, where a chmod is no obstacle: the check's
    os.access is told so, as a read-only filesystem tells it)."""
    import os

    import fedfm.config

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(fedfm.config.os, "access",
                        lambda path, mode: False if Path(path) == locked and mode & os.W_OK else real(path, mode))
    return locked


def test_output_dir_that_cannot_be_written_exits_2(no_model, tiny_csv, tmp_path, read_only):
    res = invoke("run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path, **{"output.dir": str(read_only / "a" / "run")}))
    _assert_clean_failure(res, "output.dir", f"{read_only} is not writable")
    assert list(read_only.iterdir()) == []


def test_output_dir_on_a_read_only_filesystem_exits_2(no_model, tiny_csv, tmp_path, monkeypatch):
    import os

    import fedfm.config

    real = os.statvfs
    ro = os.statvfs_result(tuple(real(tmp_path))[:8] + (os.ST_RDONLY,) + tuple(real(tmp_path))[9:])
    monkeypatch.setattr(fedfm.config.os, "statvfs", lambda path: ro if Path(path) == tmp_path else real(path))
    res = invoke("run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path))
    _assert_clean_failure(res, "output.dir", f"{tmp_path} is on a read-only filesystem")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["duplicate-key", "not-utf8", "directory"])
def test_unreadable_config_file_exits_2(no_model, tmp_path, kind):
    path = tmp_path / "mine.yaml"
    if kind == "duplicate-key":
        path.write_text("federation:\n  rounds: 3\n  rounds: 4\n")
        needles = ["duplicate key 'rounds' at line 3", "first at line 2"]
    elif kind == "not-utf8":
        path.write_bytes(b"name: \xff\xfe\n")
        needles = ["not UTF-8"]
    else:
        path.mkdir()
        needles = ["is a directory"]
    res = invoke("run", str(path))
    _assert_clean_failure(res, str(path), *needles)
    assert not (tmp_path / "runs").exists()


def test_unknown_config_name_exits_2(no_model):
    res = invoke("run", "bbc-lorra")
    _assert_clean_failure(res, "bbc-lorra", "did you mean 'bbc-lora'")


def test_missing_yaml_file_exits_2(no_model, tmp_path):
    res = invoke("run", str(tmp_path / "missing.yaml"))
    _assert_clean_failure(res, "missing.yaml", "does not exist")


def test_resume_of_non_run_dir_exits_2(no_model, tmp_path):
    res = invoke("run", "--resume", str(tmp_path))
    _assert_clean_failure(res, "--resume", "no config.yaml")


def test_report_of_missing_dir_exits_2(tmp_path):
    res = invoke("report", str(tmp_path / "nope"))
    _assert_clean_failure(res, "nope")


def test_export_of_non_run_dir_exits_2(tmp_path):
    res = invoke("export", str(tmp_path), "--out", str(tmp_path / "out"))
    _assert_clean_failure(res, "not a run directory")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ a full tiny run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny federated run through the CLI, shared by the tests below (they do not modify it)."""
    tmp = tmp_path_factory.mktemp("cli_run")
    data = write_csv(tmp / "tiny.csv", make_rows())
    overrides = tiny_overrides(data, tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.console, "_width", 1000)
        res = CliRunner().invoke(app, ["run", "bbc-lora", *overrides])
    return {"result": res, "overrides": overrides, "run_dir": tmp / "run", "tmp": tmp}


def test_tiny_run_writes_run_dir(tiny_run):
    res, run_dir = tiny_run["result"], tiny_run["run_dir"]
    assert res.exit_code == 0, res.output
    assert f"run directory: {run_dir}" in res.output

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["name"] == "tiny" and cfg["federation"]["rounds"] == 2
    assert cfg["output"]["dir"] == str(run_dir)

    part = json.loads((run_dir / "partition.json").read_text())
    assert part["num_clients"] == 4
    assert part["label_names"] == ["money", "music", "sport", "tech"]

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows)

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_0001.pt", "round_0002.pt"]
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    pngs = sorted(p.name for p in (run_dir / "report").glob("*.png"))
    assert {"accuracy.png", "loss.png", "partition.png"} <= set(pngs)
    for name in pngs:
        assert (run_dir / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_without_overwrite_exits_2_and_keeps_run(tiny_run, no_model):
    run_dir = tiny_run["run_dir"]
    before = (run_dir / "metrics.jsonl").read_bytes()
    res = invoke("run", "bbc-lora", *tiny_run["overrides"])
    _assert_clean_failure(res, "output.dir", str(run_dir), "--overwrite")
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert (run_dir / "adapter" / "adapter_config.json").exists()


def test_rerun_with_overwrite_succeeds(tiny_run, tmp_path):
    # work on a copy so the shared run stays as it was for the other tests
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run["run_dir"], copy)
    (copy / "stale.txt").write_text("from before")
    overrides = tiny_run["overrides"] + [f"output.dir={copy}", "federation.rounds=1"]
    res = invoke("run", "bbc-lora", *overrides)
    assert res.exit_code == 2, res.output
    assert (copy / "stale.txt").exists()

    res = invoke("run", "bbc-lora", *overrides, "--overwrite")
    assert res.exit_code == 0, res.output
    assert f"run directory: {copy}" in res.output
    assert (copy / "stale.txt").read_text() == "from before"  # not fedfm's: kept; the old run's files replaced
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["round_0001.pt"]
    assert (copy / "adapter" / "adapter_config.json").exists()


def test_overwrite_refuses_non_run_dir(tiny_run, tmp_path, no_model):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    res = invoke("run", "bbc-lora", *tiny_run["overrides"], f"output.dir={target}", "--overwrite")
    _assert_clean_failure(res, "output.dir", "not a fedfm run directory")
    assert (target / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------ report / export

def test_report_redraws_plots(tiny_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run["run_dir"], copy)
    shutil.rmtree(copy / "report")
    res = invoke("report", str(copy))
    assert res.exit_code == 0, res.output
    pngs = sorted((copy / "report").glob("*.png"))
    assert {"accuracy.png", "loss.png", "partition.png"} <= {p.name for p in pngs}
    for p in pngs:
        assert str(p) in res.output
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_adapter(tiny_run, tmp_path):
    out = tmp_path / "adapter_out"
    res = invoke("export", str(tiny_run["run_dir"]), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert f"exported to {out}" in one_line(res.output)
    src = tiny_run["run_dir"] / "adapter"
    assert (out / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()


def test_export_merge_matches_peft_model(tiny_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedfm.config import load_config
    from fedfm.models.loader import load_base, load_tokenizer
    from fedfm.simulation import prepare
    from fedfm.tasks import make_task

    run_dir = tiny_run["run_dir"]
    out = tmp_path / "merged"
    torch.manual_seed(12345)  # export must not depend on the global RNG state it finds
    res = invoke("export", str(run_dir), "--out", str(out), "--merge")
    assert res.exit_code == 0, res.output
    assert (out / "config.json").exists()
    assert not (out / "adapter_config.json").exists()  # a plain transformers model, not an adapter

    merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert merged.config.id2label == {0: "money", 1: "music", 2: "sport", 3: "tech"}

    cfg = load_config(str(run_dir / "config.yaml"))
    names = json.loads((run_dir / "partition.json").read_text())["label_names"]
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.federation.seed)  # as build_model does before building the base
    base = load_base(cfg.model, "AutoModelForSequenceClassification", num_labels=len(names),
                     id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                     pad_token_id=tok.pad_token_id)
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()

    batch = tok(["the team scored a late goal in the league match"], return_tensors="pt",
                truncation=True, max_length=cfg.task.max_length)
    with torch.no_grad():
        a = merged(**batch).logits
        b = peft_model(**batch).logits
    assert a.shape == (1, 4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    # the tokenizer travels with the merged model
    tok2 = AutoTokenizer.from_pretrained(str(out))
    assert tok2("hello world")["input_ids"] == tok("hello world")["input_ids"]

    # and the merged model is the trained one: its held-out loss is the last round's eval_loss
    prepared = prepare(cfg)
    task = make_task(cfg, tok)
    enc = task.encode(prepared.data.examples)
    got = task.evaluate(merged, enc, prepared.data.test, cfg.eval.batch_size)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert got["loss"] == pytest.approx(last["eval_loss"], abs=1e-4)
    assert got["accuracy"] == pytest.approx(last["eval_accuracy"], abs=1e-9)


def test_export_to_non_empty_dir_exits_2(tiny_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = invoke("export", str(tiny_run["run_dir"]), "--out", str(out), "--merge")
    _assert_clean_failure(res, "export --out", str(out), "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_export_to_a_file_exits_2(tiny_run, tmp_path, no_model):
    out = tmp_path / "taken"
    out.write_text("mine")
    for merge in ([], ["--merge"]):
        res = invoke("export", str(tiny_run["run_dir"]), "--out", str(out), *merge)
        _assert_clean_failure(res, "export --out", f"{out} is a file")
    assert out.read_text() == "mine"


def test_export_to_a_directory_that_cannot_be_written_exits_2(tiny_run, read_only, no_model):
    for out in (read_only / "out", read_only / "a" / "b"):
        res = invoke("export", str(tiny_run["run_dir"]), "--out", str(out), "--merge")
        _assert_clean_failure(res, "export --out", f"{read_only} is not writable")
    assert list(read_only.iterdir()) == []


def test_generate_on_a_classification_run_exits_2_before_the_model_loads(tiny_run, monkeypatch):
    import fedfm.trained

    monkeypatch.setattr(fedfm.trained, "load_trained", _model_loaded)
    res = invoke("generate", str(tiny_run["run_dir"]), "hello")
    _assert_clean_failure(res, "generate", "task.name 'classification'", "does not generate text")


def test_cli_resume_continues_bit_for_bit(tiny_csv, tmp_path):
    """`fedfm run --resume DIR` after round 2 ends with the same adapter bytes as an uninterrupted 3-round run."""
    from safetensors.torch import load_file

    full = tmp_path / "full"
    res = invoke("run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path, **{"federation.rounds": 3,
                                                                            "output.dir": str(full)}))
    assert res.exit_code == 0, res.output
    part = tmp_path / "part"
    res = invoke("run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path, **{"federation.rounds": 2,
                                                                            "output.dir": str(part)}))
    assert res.exit_code == 0, res.output
    res = invoke("run", "--resume", str(part), "federation.rounds=3")
    assert res.exit_code == 0, res.output
    assert "resuming after round 2" in res.output
    rounds = [json.loads(line)["round"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


class _RunsCode:
    """A pickled object that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_refuses_a_checkpoint_that_would_run_code_when_unpickled(tiny_csv, tmp_path):
    """Checkpoints are loaded with weights_only=True: a tampered one is refused with its path named, runs nothing,
    and is left as it was."""
    import torch

    part = tmp_path / "part"
    res = invoke("run", "bbc-lora", *tiny_overrides(tiny_csv, tmp_path, **{"federation.rounds": 1,
                                                                            "output.dir": str(part)}))
    assert res.exit_code == 0, res.output
    ck = sorted((part / "checkpoints").glob("round_*.pt"))[-1]
    state = torch.load(ck, weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**state, "schedule": {"sim_time": _RunsCode(marker)}}, ck)
    before = ck.read_bytes()
    res = invoke("run", "--resume", str(part), "federation.rounds=2")
    assert res.exit_code != 0
    assert ck.name in res.output and "not loaded" in res.output
    assert not marker.exists() and ck.read_bytes() == before


# ------------------------------------------------------------------ nothing lost (issue 15): --overwrite, --resume


def _copy_run(tiny_run, tmp_path, name="copy"):
    copy = tmp_path / name
    shutil.copytree(tiny_run["run_dir"], copy)
    return copy


def _adapter_bytes(run_dir: Path) -> bytes:
    return (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_run_writes_only_files_fedfm_owns(tiny_run):
    """--overwrite removes only what `owned` names: every file a run writes must be named there."""
    from fedfm.tracking import MARKER, owned

    files = [p.relative_to(tiny_run["run_dir"]).as_posix() for p in tiny_run["run_dir"].rglob("*") if p.is_file()]
    assert MARKER in files and "config.yaml" in files
    assert [f for f in files if not owned(f)] == []


def test_overwrite_of_a_directory_holding_only_a_config_yaml_touches_nothing(tiny_run, tmp_path, no_model):
    project = tmp_path / "projdir"
    project.mkdir()
    (project / "config.yaml").write_text((tiny_run["run_dir"] / "config.yaml").read_text())
    before = snapshot(project)
    res = invoke("run", "bbc-lora", *tiny_run["overrides"], f"output.dir={project}", "--overwrite")
    _assert_clean_failure(res, "output.dir", str(project), "not a fedfm run directory", ".fedfm-run")
    assert snapshot(project) == before


def test_overwrite_that_fails_to_build_leaves_the_old_run_as_it_was(tiny_run, tmp_path):
    copy = _copy_run(tiny_run, tmp_path)
    before = snapshot(copy)
    res = invoke("run", "bbc-lora", *tiny_run["overrides"], f"output.dir={copy}",
                 'adapter.target_modules=["no_such_module"]', "--overwrite")
    assert res.exit_code != 0
    assert snapshot(copy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # and nothing beside it


def test_resume_of_a_directory_fedfm_did_not_make_touches_nothing(tiny_run, tmp_path, no_model):
    project = tmp_path / "projdir"
    project.mkdir()
    (project / "config.yaml").write_text((tiny_run["run_dir"] / "config.yaml").read_text())
    (project / "metrics.jsonl").write_text("my own notes\n")
    before = snapshot(project)
    res = invoke("run", "--resume", str(project))
    _assert_clean_failure(res, "--resume", str(project), ".fedfm-run")
    assert snapshot(project) == before


@pytest.mark.parametrize("override, key", [("adapter.r=16", "adapter.r"), ("adapter.method=ia3", "adapter.method"),
                                           ('adapter.target_modules=["query"]', "adapter.target_modules"),
                                           ("model.from_config.hidden_size=64", "model.from_config.hidden_size")])
def test_resume_with_a_changed_layout_names_the_key_before_the_model_loads(tiny_run, tmp_path, no_model,
                                                                           override, key):
    copy = _copy_run(tiny_run, tmp_path)
    before = snapshot(copy)
    res = invoke("run", "--resume", str(copy), override)
    _assert_clean_failure(res, "--resume", key, f"{copy}/config.yaml")
    assert snapshot(copy) == before


def test_resume_may_change_where_it_computes(tiny_run, tmp_path):
    copy = _copy_run(tiny_run, tmp_path)
    res = invoke("run", "--resume", str(copy), "model.device=cpu", "federation.rounds=2")
    assert res.exit_code == 0, res.output
    assert _adapter_bytes(copy) == _adapter_bytes(tiny_run["run_dir"])


def test_resume_with_a_config_edited_by_hand_names_the_parameter_that_no_longer_fits(tiny_run, tmp_path):
    copy = _copy_run(tiny_run, tmp_path)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["adapter"]["r"] = 16
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    (copy / "metrics.jsonl").write_bytes((copy / "metrics.jsonl").read_bytes() + b'{"round": 3')
    before = snapshot(copy)
    res = invoke("run", "--resume", str(copy))
    _assert_clean_failure(res, "checkpoint: trainable parameter", "lora_A", "(8, 32)", "(16, 32)")
    assert snapshot(copy) == before  # a refused resume changes nothing, not even the cut-short metrics line


def test_resume_with_a_bad_metrics_line_names_it_before_the_model_loads(tiny_run, tmp_path, no_model):
    copy = _copy_run(tiny_run, tmp_path)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    before = snapshot(copy)
    res = invoke("run", "--resume", str(copy))
    _assert_clean_failure(res, f"{copy}/metrics.jsonl: line 2 is not a JSON object")
    assert snapshot(copy) == before


@pytest.mark.parametrize("how", ["random bytes", "cut short"])
def test_resume_passes_over_a_corrupt_newest_checkpoint(tiny_run, tmp_path, how):
    """It warns naming both files, resumes from the one before and ends where the uninterrupted run ended."""
    import os

    copy = _copy_run(tiny_run, tmp_path)
    newest = copy / "checkpoints" / "round_0002.pt"
    data = newest.read_bytes()
    newest.write_bytes(os.urandom(len(data)) if how == "random bytes" else data[: len(data) // 3])
    res = invoke("run", "--resume", str(copy))
    assert res.exit_code == 0, res.output
    out = one_line(res.output)
    assert f"warning: checkpoint {newest} is corrupt" in out and f"resuming from {newest.with_name('round_0001.pt')}" \
        in out and "older fedfm" not in out
    assert "resuming after round 1" in out
    assert [json.loads(line)["round"] for line in (copy / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert _adapter_bytes(copy) == _adapter_bytes(tiny_run["run_dir"])


def test_resume_with_no_checkpoint_that_reads_back_exits_2_calling_them_corrupt(tiny_run, tmp_path, no_model):
    copy = _copy_run(tiny_run, tmp_path)
    for p in (copy / "checkpoints").glob("round_*.pt"):
        p.write_bytes(b"\x80\x02random bytes, not a checkpoint" * 10)
    before = snapshot(copy)
    res = invoke("run", "--resume", str(copy))
    _assert_clean_failure(res, "round_0002.pt is corrupt", "round_0001.pt is corrupt", "no earlier checkpoint")
    assert "older fedfm" not in res.output
    assert snapshot(copy) == before


def test_resume_sets_aside_a_cut_short_metrics_line(tiny_run, tmp_path):
    copy = _copy_run(tiny_run, tmp_path)
    metrics = copy / "metrics.jsonl"
    whole = metrics.read_bytes()
    metrics.write_bytes(whole + b'{"round": 3, "eval_accuracy": 0.2')
    res = invoke("run", "--resume", str(copy), "federation.rounds=3")
    assert res.exit_code == 0, res.output
    assert "its last line was cut short; moved it to" in one_line(res.output)
    assert (copy / "metrics.jsonl.partial").read_bytes() == b'{"round": 3, "eval_accuracy": 0.2\n'
    assert [json.loads(line)["round"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------ a full disk: one line, how to go on


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_at_checkpoint(monkeypatch):
    import torch

    save = torch.save

    def full_at_round_2(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("round") == 2:
            f.write(b"half a checkpoint")
            _enospc()
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_at_round_2)
    return "checkpoints/round_0002.pt", "fedfm run --resume"


def _full_at_adapter(monkeypatch):
    from peft import PeftModel

    save = PeftModel.save_pretrained

    def full(self, path, *a, **k):
        save(self, path, *a, **k)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"half")
        _enospc()

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    return "adapter", "fedfm run --resume"


def _full_at_report(monkeypatch):
    from matplotlib.figure import Figure

    def full(self, path, *a, **k):
        Path(path).write_bytes(b"\x89PNG half")
        _enospc()

    monkeypatch.setattr(Figure, "savefig", full)
    return "report/accuracy.png", "fedfm report"


@pytest.mark.parametrize("where", [_full_at_checkpoint, _full_at_adapter, _full_at_report],
                         ids=["checkpoint", "adapter", "report"])
def test_a_full_disk_is_one_line_naming_the_file_and_how_to_go_on(tiny_run, tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        path, advice = where(mp)
        res = invoke("run", "bbc-lora", *tiny_run["overrides"], f"output.dir={run}")
    _assert_clean_failure(res, "disk full: could not write", f"{run}/{path}", f"{advice} {run}")
    assert not any(p.name.endswith(".tmp") for p in run.rglob("*"))  # no half-written file left behind
    if where is not _full_at_report:
        assert "round_0001.pt, is intact" in one_line(res.output) or "round_0002.pt, is intact" in one_line(res.output)
        res = invoke("run", "--resume", str(run))
    else:
        assert not (run / path).exists()
        res = invoke("report", str(run))
    assert res.exit_code == 0, res.output
    assert _adapter_bytes(run) == _adapter_bytes(tiny_run["run_dir"])
    assert (run / "report" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
