import json
from pathlib import Path

import pytest

from fedfm.errors import FedfmError
from fedfm.tracking.report import make_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BEST_ACC = 0.8125
ALL_PNGS = {"accuracy.png", "loss.png", "bytes.png", "client_accuracy.png", "partition.png"}


def _write_metrics(run_dir: Path, records) -> None:
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def _records():
    return [
        # Round 0: evaluation of the initial model, no train keys.
        {"round": 0, "eval_loss": 1.40, "eval_accuracy": 0.25,
         "client_acc": {"0": 0.2, "1": 0.3, "2": 0.25},
         "client_acc_mean": 0.25, "client_acc_worst10": 0.2},
        {"round": 1, "wall_s": 2.5, "train_loss": 1.2, "eval_loss": 1.1,
         "eval_accuracy": 0.55, "client_acc": {"0": 0.5, "1": 0.6, "2": 0.55},
         "client_acc_mean": 0.55, "client_acc_worst10": 0.5,
         "bytes_up": 3_000_000, "bytes_down": 4_500_000, "clients": [0, 1, 2], "dropped": []},
        # Round without evaluation (eval keys absent or null).
        {"round": 2, "wall_s": 2.0, "train_loss": 0.9, "eval_loss": None,
         "bytes_up": 2_000_000, "bytes_down": 4_500_000, "clients": [0, 2],
         "dropped": [{"id": 1, "error": "timeout"}]},
        {"round": 3, "wall_s": 3.0, "train_loss": 0.7, "eval_loss": 0.6,
         "eval_accuracy": BEST_ACC, "eval_perplexity": 1.82,
         "client_acc": {"0": 0.75, "1": 0.875, "2": 0.8125},
         "client_acc_mean": 0.8125, "client_acc_worst10": 0.75,
         "bytes_up": 3_000_000, "bytes_down": 4_500_000, "clients": [0, 1, 2], "dropped": []},
        {"round": 4, "wall_s": 2.5, "train_loss": 0.65, "eval_loss": 0.62,
         "eval_accuracy": 0.8, "eval_perplexity": 1.86,
         "client_acc": {"0": 0.7, "1": 0.9, "2": 0.8},
         "client_acc_mean": 0.8, "client_acc_worst10": 0.7,
         "bytes_up": 3_000_000, "bytes_down": 4_500_000, "clients": [0, 1, 2], "dropped": []},
    ]


def _partition(label_counts=True):
    counts = [[10, 5, 0, 1], [0, 20, 3, 3], [7, 7, 7, 7]]
    return {
        "method": "dirichlet",
        "num_clients": 3,
        "label_names": ["cat", "dog", "bird", "fish"] if label_counts else None,
        "clients": [
            {"id": i, "n_train": sum(c), "n_test": 5,
             "label_counts": c if label_counts else None}
            for i, c in enumerate(counts)
        ],
    }


def _make_run_dir(d: Path) -> Path:
    d.mkdir()
    _write_metrics(d, _records())
    (d / "partition.json").write_text(json.dumps(_partition()), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One full report shared by the read-only tests (drawing is the slow part)."""
    d = _make_run_dir(tmp_path_factory.mktemp("report") / "run")
    return d, make_report(str(d))  # a str path is accepted too


def _assert_png(p: Path) -> None:
    assert p.is_file(), p
    data = p.read_bytes()
    assert data.startswith(PNG_MAGIC), p
    assert len(data) > 5_000, (p, len(data))


def test_make_report_draws_all_plots(report):
    run_dir, paths = report
    assert {p.name for p in paths} == ALL_PNGS
    for p in paths:
        assert p.parent == run_dir / "report"
        _assert_png(p)


def test_summary_contents(report):
    run_dir, paths = report
    summary = (run_dir / "report" / "summary.md").read_text(encoding="utf-8")
    assert str(BEST_ACC) in summary
    assert "eval_accuracy" in summary
    assert "eval_perplexity" in summary
    # Totals: 4 training rounds, 11 MB up, 18 MB down, 10 s wall.
    assert "| rounds | 4 |" in summary
    assert "11000000" in summary and "18000000" in summary
    assert "10.0" in summary
    for p in paths:
        assert p.name in summary
    # Best eval loss is the minimum (0.6 at round 3), not the maximum.
    loss_row = next(line for line in summary.splitlines() if line.startswith("| eval_loss "))
    assert "0.6000 (round 3)" in loss_row.split("|")[3]


def test_sparse_metrics_and_no_partition(tmp_path: Path):
    d = tmp_path / "sparse"
    d.mkdir()
    _write_metrics(d, [
        {"round": 1, "train_loss": 1.0},
        {"round": 2, "train_loss": None, "eval_accuracy": None},
        {"round": 3, "train_loss": 0.8, "bytes_up": 512, "bytes_down": 2048},
    ])
    paths = make_report(d)
    assert {p.name for p in paths} == {"loss.png", "bytes.png"}
    for p in paths:
        _assert_png(p)
    summary = (d / "report" / "summary.md").read_text(encoding="utf-8")
    assert "| rounds | 3 |" in summary


def test_partition_without_label_counts(tmp_path: Path):
    d = tmp_path / "nolabels"
    d.mkdir()
    _write_metrics(d, [{"round": 1, "eval_accuracy": 0.5}])
    (d / "partition.json").write_text(json.dumps(_partition(label_counts=False)))
    names = {p.name for p in make_report(d)}
    assert names == {"accuracy.png", "partition.png"}
    _assert_png(d / "report" / "partition.png")


def test_missing_run_dir(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(FedfmError, match="nope"):
        make_report(missing)


def test_missing_metrics_file(tmp_path: Path):
    with pytest.raises(FedfmError, match="metrics.jsonl"):
        make_report(tmp_path)


def test_bad_json_line(tmp_path: Path):
    run_dir = _make_run_dir(tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines.insert(2, '{"round": 2, "train_loss": ')  # becomes line 3
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FedfmError) as exc:
        make_report(run_dir)
    msg = str(exc.value)
    assert "line 3" in msg
    assert "metrics.jsonl" in msg
