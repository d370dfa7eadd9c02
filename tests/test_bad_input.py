"""Property-based: whatever config overrides or data file a user gives, ``fedfm run`` either gets as far as loading
the model, or exits 2 with one line naming a key or a file, no traceback, and no run directory left behind.

The model never loads here: the loader raises ``PassedValidation``, which counts as a run that was accepted.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import fedfm.cli as cli
from fedfm.cli import app
from fedfm.config import RunConfig, _known_fields

from tests.conftest import make_rows, tiny_overrides, write_csv

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class PassedValidation(Exception):
    """Raised where the model would load: the input was accepted."""


def _load(*args, **kwargs):
    raise PassedValidation


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A working directory of its own (a relative output.dir lands there), the tiny data, and no model loading."""
    import fedfm.models
    import fedfm.models.loader

    tmp = tmp_path_factory.mktemp("bad_input")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setattr(cli.console, "_width", 10_000)
        for mod, name in [(fedfm.models.loader, "load_base"), (fedfm.models.loader, "load_tokenizer"),
                          (fedfm.models, "build_model")]:
            mp.setattr(mod, name, _load)
        yield {"tmp": tmp, "csv": write_csv(tmp / "tiny.csv", make_rows(80)), "n": itertools.count()}


def _fresh(env) -> Path:
    return env["tmp"] / f"case{next(env['n'])}"


def _run(env, case: Path, overrides: list[str]):
    args = tiny_overrides(env["csv"], case, **{"partition.num_clients": 4}) + overrides
    return CliRunner().invoke(app, ["run", "bbc-lora", *args])


def _check(res, names: list[str], case: Path, before: set[str]) -> None:
    """Accepted (the model was about to load), or exit 2 in one line naming one of ``names``, with no run directory
    left behind (neither the case's own nor one a relative ``output.dir`` put in the working directory)."""
    if isinstance(res.exception, PassedValidation):
        return
    assert res.exit_code == 2, f"exit {res.exit_code}: {res.output!r} {res.exception!r}"
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert any(name in lines[0] for name in names), f"names none of {names[:4]}…: {lines[0]}"
    assert not (case / "run").exists(), f"run directory left behind: {lines[0]}"
    assert {p.name for p in Path.cwd().iterdir()} <= before | {case.name}, f"a directory left behind: {lines[0]}"


# ------------------------------------------------------------------ config overrides

def _leaf_keys() -> list[str]:
    sections = {k for k in _known_fields(RunConfig) if any(o.startswith(k + ".") for o in _known_fields(RunConfig))}
    return sorted(set(_known_fields(RunConfig)) - sections)


KEYS = _leaf_keys()
DOTTED = [k for k in _known_fields(RunConfig) if "." in k]
PATHS = {"data.source", "output.dir", "runtime.state_dir", "model.name_or_path", "model.tokenizer", "model.gguf_file"}


def _yaml(key: str, value) -> str:
    """A value as the right-hand side of ``key=value`` (YAML flow style); a path stays under the working directory
    (no "/", "~", "." or "..": a folder given as data.source is read recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, str):
        return "p_" + value.replace("/", "_").replace("~", "_") if key in PATHS and value else value
    return json.dumps(value)


values = st.one_of(
    st.booleans(),
    st.integers(-10**6, 10**6),
    st.integers(0, 12),
    st.sampled_from([0, -1, 1, 2**40, 0.5, 1.5, -0.25]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.inf, -math.inf, math.nan, "inf", "nan", ".inf", "yes", "no", "on", "null", "", "[]", "{}"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=8),
    st.just([]),
    st.lists(st.integers(-3, 3), max_size=3),
)
keys = st.one_of(st.sampled_from(KEYS), st.builds(lambda k, s: k + s, st.sampled_from(KEYS), st.sampled_from(["x", "_", ".x"])))


@SETTINGS
@given(overrides=st.lists(st.tuples(keys, values), min_size=1, max_size=3))
def test_any_config_override_is_run_or_refused_in_one_line(env, overrides):
    case, before = _fresh(env), {p.name for p in env["tmp"].iterdir()}
    res = _run(env, case, [f"{k}={_yaml(k, v)}" for k, v in overrides])
    # a message names the key it refuses, or the key it is refused against (federation.clients_per_round against
    # partition.num_clients), or the data file
    _check(res, [k for k, _ in overrides] + DOTTED + [str(env["csv"])], case, before)


# ------------------------------------------------------------------ combinations that cannot work

COMBINATIONS = {  # overrides -> the keys its one line must name (docs/communication.md, "What does not compose")
    "topk under secagg": (["codec.name=topk", "secagg.enabled=true"], ["codec.name", "secagg.enabled"]),
    "randk under secagg": (["codec.name=randk", "secagg.enabled=true"], ["codec.name", "secagg.enabled"]),
    "topk as the downlink": (["codec.downlink=topk"], ["codec.downlink"]),
    "topk with scaffold": (["codec.name=topk", "client.algorithm=scaffold", "client.optimizer=sgd"],
                           ["codec.name", "client.algorithm"]),
    "error feedback on ray": (["codec.name=topk", "runtime.name=ray"], ["runtime.name", "codec.name"]),
}


@pytest.mark.parametrize("case_name", list(COMBINATIONS))
def test_a_combination_that_cannot_work_exits_2_naming_its_keys_before_the_model_loads(env, case_name):
    overrides, names = COMBINATIONS[case_name]
    case, before = _fresh(env), {p.name for p in env["tmp"].iterdir()}
    res = _run(env, case, overrides)
    assert not isinstance(res.exception, PassedValidation), f"{case_name}: accepted"
    _check(res, names[:1], case, before)
    assert all(name in res.output for name in names), res.output


# ------------------------------------------------------------------ data files

def _csv(rows: list[dict]) -> bytes:
    import csv
    import io

    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue().encode()


ROWS = make_rows(40)
DATA = {
    "empty.csv": lambda junk: b"",
    "header-only.csv": lambda junk: b"text,label\n",
    "no-text.csv": lambda junk: _csv([{"body": r["text"], "label": r["label"]} for r in ROWS]),
    "no-label.csv": lambda junk: _csv([{"text": r["text"]} for r in ROWS]),
    "one-class.csv": lambda junk: _csv([{**r, "label": "only"} for r in ROWS]),
    "garbage.csv": lambda junk: junk,
    "not-utf8.csv": lambda junk: _csv(ROWS[:8]).replace(b"the", b"th\xe9") + junk,
    "few-rows.csv": lambda junk: _csv(ROWS[:3]),
    "empty.json": lambda junk: b"",
    "list.json": lambda junk: json.dumps([{"text": r["text"]} for r in ROWS]).encode(),
    "scalar.json": lambda junk: b"42",
    "truncated.json": lambda junk: json.dumps(ROWS).encode()[: max(1, len(junk))],
    "garbage.json": lambda junk: junk,
    "garbage.jsonl": lambda junk: b"{}\n" + junk,
    "empty-texts.jsonl": lambda junk: b"".join(json.dumps({"text": "", "label": r["label"]}).encode() + b"\n"
                                              for r in ROWS),
}


@SETTINGS
@given(kind=st.sampled_from(sorted(DATA)), junk=st.binary(min_size=1, max_size=64),
       column=st.sampled_from([None, "text", "label", "nope"]))
def test_any_data_file_is_run_or_refused_in_one_line(env, kind, junk, column):
    case = _fresh(env)
    case.mkdir()
    path = case / kind
    path.write_bytes(DATA[kind](junk))
    extra = [f"data.source={path}"] + ([f"data.label_column={column}"] if column else [])
    before = {p.name for p in env["tmp"].iterdir()}
    res = _run(env, case, extra)
    _check(res, [str(path), "data.", "partition."], case, before)
