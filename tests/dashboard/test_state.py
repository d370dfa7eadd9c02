"""The dashboard's state, read from a run directory alone: rows of any driver, a last line being written, DP."""
from __future__ import annotations

import json

import pytest
import yaml

from fedfm.dashboard.state import MetricsTail, RunState, clients_table, is_run_dir

CREATED = "2026-01-01T00:00:00+00:00"
T0 = 1767225600.0  # CREATED as a timestamp

ROWS = [
    {"round": 0, "eval_accuracy": 0.25, "eval_loss": 1.4},  # eval.initial: eval keys only
    {"round": 1, "clients": [0, 2], "dropped": [], "bytes_up": 200, "bytes_down": 200, "wall_s": 1.0,
     "eval_accuracy": 0.5, "eval_loss": 1.2, "train_loss": 1.3, "epsilon": 2.0, "delta": 1e-5,
     "client_acc": {"0": 0.4, "2": 0.6}, "client_acc_worst10": 0.4,
     "client_stats": [{"id": 0, "examples": 30, "bytes_up": 100, "bytes_down": 100, "seconds": 0.5, "epsilon": 2.0},
                      {"id": 2, "examples": 60, "bytes_up": 100, "bytes_down": 100, "seconds": 0.7, "epsilon": 1.5}]},
    {"round": 2, "clients": [0, 1], "bytes_up": 100, "bytes_down": 200, "fed_accuracy": 0.55, "epsilon": 3.0,
     "dropped": [{"id": 1, "error": "<img src=x onerror=\"window.pwned=1\">"}],
     "client_stats": [{"id": 0, "examples": 30, "bytes_up": 100, "bytes_down": 100, "seconds": 0.25,
                       "epsilon": 3.0}]},
]


def write_run(path, rows=ROWS, privacy=None, rounds=3, tail=b""):
    path.mkdir(parents=True, exist_ok=True)
    (path / ".fedfm-run").write_text(json.dumps({"fedfm": "0.1.0", "created": CREATED}))
    (path / "config.yaml").write_text(yaml.safe_dump({"name": "tiny", "federation": {"rounds": rounds},
                                                      "privacy": privacy or {"mode": "none"}}))
    (path / "partition.json").write_text(json.dumps({
        "method": "dirichlet", "num_clients": 3, "label_names": ["a", "<script>b</script>"], "test_size": 9,
        "clients": [{"id": i, "name": str(i), "n_train": 10 * (i + 1), "n_test": 3, "label_counts": [i, 10]}
                    for i in range(3)]}))
    (path / "metrics.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + tail)
    return path


def test_clients_accumulate_over_rounds():
    table = {c["id"]: c for c in clients_table(ROWS)}
    assert list(table) == ["0", "1", "2"]
    c0, c1, c2 = table["0"], table["1"], table["2"]
    assert (c0["last_round"], c0["examples"], c0["bytes_up"], c0["bytes_down"]) == (2, 30, 200, 200)
    assert c0["seconds"] == 0.25 and c0["epsilon"] == 3.0  # the last round's, not a sum
    assert c0["accuracy"] == 0.4 and c2["accuracy"] == 0.6
    assert (c1["last_round"], c1["dropped"], c1["examples"], c1["bytes_up"]) == (2, 1, None, 0)
    assert c1["last_error"] == "<img src=x onerror=\"window.pwned=1\">"  # as the client said it: the page escapes
    assert (c2["last_round"], c2["dropped"], c2["last_error"], c2["epsilon"]) == (1, 0, None, 1.5)


def test_a_client_only_evaluated_has_no_last_round():
    """eval.per_client scores every client each round: that is not taking part in the round."""
    rows = [{"round": 1, "clients": [0], "client_acc": {"0": 0.5, "7": 0.25}},
            {"round": 2, "clients": [1], "client_acc": {"0": 0.75, "7": 0.5}}]
    table = {c["id"]: c for c in clients_table(rows)}
    assert (table["0"]["last_round"], table["0"]["accuracy"]) == (1, 0.75)
    assert (table["7"]["last_round"], table["7"]["accuracy"]) == (None, 0.5)


def test_malformed_client_parts_are_passed_over():
    rows = [{"round": 1, "clients": 3, "client_stats": [None, {"examples": 4}, {"id": 5, "bytes_up": "many"}],
             "dropped": "all", "client_acc": [0.5]}]
    assert clients_table(rows) == [{"id": "5", "last_round": 1, "examples": None, "bytes_up": 0, "bytes_down": 0,
                                    "seconds": None, "dropped": 0, "last_error": None, "epsilon": None,
                                    "accuracy": None}]


def test_client_ids_sort_as_numbers_then_names():
    rows = [{"round": 1, "clients": [10, 2, "site-b", "site-a"]}]
    assert [c["id"] for c in clients_table(rows)] == ["2", "10", "site-a", "site-b"]


def test_state_of_a_running_run(tmp_path):
    run = write_run(tmp_path / "run", privacy={"mode": "sample", "target_epsilon": 8.0, "delta": 1e-5})
    state = RunState(run).read(now=T0 + 100)
    assert state["status"] == "running" and state["name"] == "tiny"
    assert (state["round"], state["rounds"]) == (2, 3)
    assert state["elapsed_s"] == 100.0  # from .fedfm-run's created to now, while it runs
    s = state["series"]
    assert s["round"] == [0, 1, 2]
    assert s["eval_accuracy"] == [0.25, 0.5, None] and s["fed_accuracy"] == [None, None, 0.55]
    assert s["train_loss"] == [None, 1.3, None] and s["epsilon"] == [None, 2.0, 3.0]
    assert state["privacy"] == {"mode": "sample", "target_epsilon": 8.0, "delta": 1e-5, "epsilon": 3.0}
    assert state["partition"]["label_names"] == ["a", "<script>b</script>"]
    assert [c["label_counts"] for c in state["partition"]["clients"]] == [[0, 10], [1, 10], [2, 10]]
    assert state["clients_total"] == 3 and state["notes"] == []
    json.dumps(state, allow_nan=False)  # what /api/state sends is plain JSON


def test_a_last_line_being_written_is_read_once_whole(tmp_path):
    run = write_run(tmp_path / "run", rows=ROWS[:2], tail=b'{"round": 2, "eval_acc')
    state = RunState(run)
    assert state.read()["round"] == 1
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'uracy": 0.75}\n')
    got = state.read()
    assert got["round"] == 2 and got["series"]["eval_accuracy"][-1] == 0.75 and got["notes"] == []


def test_a_replaced_metrics_file_is_read_from_the_start(tmp_path):
    """--overwrite, or a resume that drops the rounds after its last checkpoint: the file shrinks or is replaced."""
    run = write_run(tmp_path / "run")
    state = RunState(run)
    assert state.read()["round"] == 2
    tmp = run / ".metrics.jsonl.tmp"
    tmp.write_text(json.dumps(ROWS[0]) + "\n")
    tmp.replace(run / "metrics.jsonl")
    assert state.read()["series"]["round"] == [0]
    (run / "metrics.jsonl").unlink()
    assert state.read()["round"] is None


def test_lines_that_are_not_rows_are_skipped_and_said(tmp_path):
    run = write_run(tmp_path / "run", rows=[])
    (run / "metrics.jsonl").write_text('{"round": 1, "eval_loss": NaN}\nnot json\n[1, 2]\n{"no": "round"}\n'
                                       '{"round": 2, "eval_loss": "high"}\n')
    state = RunState(run).read()
    assert state["series"]["round"] == [1, 2]
    assert state["series"]["eval_loss"] == [None, None]  # NaN and a string are not points
    assert state["notes"] == ["metrics.jsonl: 3 line(s) that are not a round's JSON object skipped"]


def test_rows_of_other_drivers_with_fewer_keys(tmp_path):
    """fedmd / continual rows: a round and a metric or two, no clients, bytes or DP."""
    run = write_run(tmp_path / "run", rows=[{"round": 1, "fm_accuracy": 0.3}, {"round": 2, "eval_accuracy": 0.4}],
                    rounds=2)
    state = RunState(run).read(now=T0 + 50)
    assert state["clients"] == [] and state["series"]["eval_accuracy"] == [None, 0.4]
    assert state["status"] == "finished"  # its last round is the config's last
    assert state["privacy"]["mode"] == "none" and state["privacy"]["epsilon"] is None


def test_finished_when_the_adapter_is_written_and_elapsed_stops_at_the_last_row(tmp_path):
    run = write_run(tmp_path / "run", rounds=10)  # stopped early (its ε spent): the adapter says it is done
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / ".adapter_model.safetensors.tmp").write_text("")  # not fedfm's finished file: not linked
    import os

    os.utime(run / "metrics.jsonl", (T0 + 42, T0 + 42))
    state = RunState(run).read(now=T0 + 1000)
    assert state["status"] == "finished" and state["elapsed_s"] == 42.0
    assert [f["href"] for f in state["links"]["adapter"]] == ["files/adapter/adapter_config.json"]


def test_a_directory_the_run_has_not_written_yet(tmp_path):
    state = RunState(tmp_path / "not-yet").read()
    assert state["status"] == "waiting" and state["round"] is None and state["partition"] is None
    assert state["series"]["round"] == [] and state["clients"] == [] and state["elapsed_s"] is None


@pytest.mark.parametrize("files, expected", [((), False), (("notes.txt",), False), ((".fedfm-run",), True),
                                             (("metrics.jsonl",), True)])
def test_is_run_dir(tmp_path, files, expected):
    for f in files:
        (tmp_path / f).write_text("")
    assert is_run_dir(tmp_path) is expected


def test_metrics_tail_reads_only_what_was_appended(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n')
    tail = MetricsTail(path)
    assert len(tail.read()) == 1
    with open(path, "a") as f:
        f.write('{"round": 2}\n')
    assert [r["round"] for r in tail.read()] == [1, 2]
    assert [r["round"] for r in tail.read()] == [1, 2]  # nothing new: nothing added twice


def test_small_files_are_parsed_again_only_when_they_change(tmp_path):
    run = write_run(tmp_path / "run")
    state = RunState(run)
    assert state.read()["partition"]["method"] == "dirichlet"
    calls = []
    parse = state.partition.parse
    state.partition.parse = lambda b: calls.append(1) or parse(b)
    state.read()
    assert calls == []  # unchanged: not read again
    desc = json.loads((run / "partition.json").read_text())
    (run / ".partition.json.tmp").write_text(json.dumps({**desc, "method": "iid"}))
    (run / ".partition.json.tmp").replace(run / "partition.json")  # as the run writes it: a new file renamed over
    assert state.read()["partition"]["method"] == "iid" and calls == [1]
    (run / "partition.json").write_text("{ half")
    assert state.read()["partition"] is None  # being written: shown when whole


def test_reading_on_gives_what_reading_from_scratch_gives(tmp_path):
    run = write_run(tmp_path / "run", rows=ROWS[:1])
    state = RunState(run)
    for row in ROWS[1:]:
        state.read(now=T0)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    assert state.read(now=T0) == RunState(run).read(now=T0)
    assert state.read(now=T0)["clients"] == clients_table(ROWS)
