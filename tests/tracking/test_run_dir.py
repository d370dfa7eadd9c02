"""The run directory keeps what is not fedfm's, and trusts nothing it reads back: a marker names the directories
fedfm made, --overwrite removes only the files fedfm writes, a cut-short metrics line is set aside, a corrupt
checkpoint is passed over for the one before it, a full disk is one line that says how to go on."""
import errno
import json
import os

import pytest
import torch

from fedfm.errors import DiskFull, FedfmError
from fedfm.tracking import MARKER, RunDir, owned

from tests.conftest import snapshot


@pytest.mark.parametrize("path", [".fedfm-run", "config.yaml", "partition.json", "metrics.jsonl",
                                  "metrics.jsonl.partial", "privacy_audit.json", "checkpoints/round_0012.pt",
                                  "checkpoints/.round_0003.pt.tmp", "client_state/client_000007.v3.safetensors",
                                  "report/loss.png", "report/summary.md", "report/generations_round_4.jsonl",
                                  "adapter/adapter_model.safetensors", "model/config.json", ".adapter.tmp/vocab.txt",
                                  ".config.yaml.tmp"])
def test_the_files_fedfm_writes_are_its_own(path):
    assert owned(path)


@pytest.mark.parametrize("path", ["notes.txt", "config.yml", "data/train.csv", "report/my_plot.png",
                                  "report/notes.md", "checkpoints/best.pt", "checkpoints/round_1.pt",
                                  "client_state/mine.safetensors", "adapterx/a.bin", "metrics.jsonl.bak"])
def test_other_files_are_not(path):
    assert not owned(path)


def _old_run(path):
    """A run directory fedfm made, with the user's own files beside and inside fedfm's folders."""
    rd = RunDir(path)
    rd.create(overwrite=False)
    rd.write_config("name: old\n")
    rd.append_metrics({"round": 1})
    rd.save_checkpoint(1, {"round": 1, "global": torch.zeros(3)}, keep=2)
    (rd.adapter).mkdir()
    (rd.adapter / "adapter_model.safetensors").write_bytes(b"old adapter")
    (rd.report / "loss.png").write_bytes(b"old plot")
    (path / "notes.txt").write_text("mine")
    (path / "data").mkdir()
    (path / "data" / "train.csv").write_text("text,label\n")
    (rd.report / "my_plot.png").write_bytes(b"my plot")
    (rd.checkpoints / "best.pt").write_bytes(b"my pick")
    return rd


def test_create_over_a_run_removes_only_fedfms_files_and_writes_a_new_marker(tmp_path):
    rd = _old_run(tmp_path / "run")
    RunDir(rd.path).create(overwrite=True)
    left = snapshot(rd.path)
    assert set(left) == {MARKER, "checkpoints", "report", "notes.txt", "data", "data/train.csv",
                         "report/my_plot.png", "checkpoints/best.pt"}
    assert (rd.path / "notes.txt").read_text() == "mine" and (rd.checkpoints / "best.pt").read_bytes() == b"my pick"
    marker = json.loads((rd.path / MARKER).read_text())
    assert set(marker) == {"fedfm", "created"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_fedfm_did_not_make_is_refused_untouched(tmp_path, overwrite):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("name: mine\n")
    (project / "sub").mkdir()
    (project / "sub" / "metrics.jsonl").write_text("mine\n")
    before = snapshot(project)
    with pytest.raises(FedfmError, match=f"not a fedfm run directory.*no {MARKER}"):
        RunDir(project).create(overwrite=overwrite)
    with pytest.raises(FedfmError, match=MARKER):
        RunDir(project).check_resumable()
    assert snapshot(project) == before


def test_an_existing_run_is_kept_without_overwrite(tmp_path):
    rd = _old_run(tmp_path / "run")
    before = snapshot(rd.path)
    with pytest.raises(FedfmError, match="--overwrite"):
        RunDir(rd.path).create(overwrite=False)
    assert snapshot(rd.path) == before


# ------------------------------------------------------------------ metrics.jsonl


@pytest.mark.parametrize("tail", [b'{"round": 3, "eval_lo', b'{"round": 3, "eval_loss": 1.2}', b'\x00\x00\x00',
                                  b'{"round": 3, "eval_lo\n'])
def test_a_cut_short_last_metrics_line_is_set_aside_not_dropped(tmp_path, tail):
    rd = RunDir(tmp_path)
    whole = b'{"round": 1}\n{"round": 2}\n'
    rd.metrics_file.write_bytes(whole + tail)
    note = rd.set_aside_partial_metrics()
    assert "metrics.jsonl" in note and "metrics.jsonl.partial" in note
    assert rd.metrics_file.read_bytes() == whole
    assert (tmp_path / "metrics.jsonl.partial").read_bytes() == tail.rstrip(b"\n") + b"\n"
    assert [r["round"] for r in rd.read_metrics()] == [1, 2]


def test_whole_metrics_are_left_as_they_are(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics_file.write_bytes(b'{"round": 1}\n\n{"round": 2}\n')
    assert rd.set_aside_partial_metrics() is None
    assert rd.metrics_file.read_bytes() == b'{"round": 1}\n\n{"round": 2}\n'
    assert not (tmp_path / "metrics.jsonl.partial").exists()


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics_file.write_bytes(b'{"round": 1}\nnot json\n{"round": 2}\n')
    with pytest.raises(FedfmError, match="metrics.jsonl: line 2 is not a JSON object"):
        rd.set_aside_partial_metrics()


# ------------------------------------------------------------------ checkpoints


def _three_checkpoints(tmp_path) -> RunDir:
    rd = RunDir(tmp_path / "run")
    for rnd in (1, 2, 3):
        rd.save_checkpoint(rnd, {"round": rnd, "global": torch.full((4,), float(rnd)),
                                 "shapes": {"w": [2, 2]}}, keep=3)
    return rd


CORRUPTIONS = {
    "random bytes": lambda b: os.urandom(len(b)),
    "cut short": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "zeros": lambda b: bytes(len(b)),
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_with_a_warning_naming_both(tmp_path, how):
    rd = _three_checkpoints(tmp_path)
    newest = rd.checkpoints / "round_0003.pt"
    newest.write_bytes(CORRUPTIONS[how](newest.read_bytes()))
    said = []
    ck = rd.load_last_checkpoint(said.append)
    assert ck["round"] == 2
    assert len(said) == 1 and str(newest) in said[0] and str(rd.checkpoints / "round_0002.pt") in said[0]
    assert "corrupt" in said[0] and "older fedfm" not in said[0]


def test_a_checkpoint_of_another_round_or_length_is_corrupt(tmp_path):
    rd = _three_checkpoints(tmp_path)
    torch.save({"round": 2, "global": torch.zeros(4)}, rd.checkpoints / "round_0003.pt")
    torch.save({"round": 2, "global": torch.zeros(3), "shapes": {"w": [2, 2]}}, rd.checkpoints / "round_0002.pt")
    said = []
    assert rd.load_last_checkpoint(said.append)["round"] == 1
    assert "round_0003.pt is corrupt: it holds round 2" in said[0] and "round_0002.pt is corrupt" in said[0]


def test_no_checkpoint_that_reads_back_is_an_error_calling_them_corrupt(tmp_path):
    rd = _three_checkpoints(tmp_path)
    for p in rd.list_checkpoints():
        p.write_bytes(os.urandom(2000))
    with pytest.raises(FedfmError) as info:
        rd.load_last_checkpoint()
    msg = str(info.value)
    assert "round_0003.pt is corrupt" in msg and "round_0001.pt is corrupt" in msg and "older fedfm" not in msg
    assert "\n" not in msg


def test_a_full_disk_while_checkpointing_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    rd = _three_checkpoints(tmp_path)
    before = (rd.checkpoints / "round_0003.pt").read_bytes()

    def full(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFull) as info:
        rd.save_checkpoint(4, {"round": 4, "global": torch.zeros(4)}, keep=3)
    msg = str(info.value)
    assert str(rd.checkpoints / "round_0004.pt") in msg and f"fedfm run --resume {rd.path}" in msg
    assert "round_0003.pt, is intact" in msg and "\n" not in msg
    monkeypatch.undo()
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == ["round_0001.pt", "round_0002.pt", "round_0003.pt"]
    assert (rd.checkpoints / "round_0003.pt").read_bytes() == before and rd.load_last_checkpoint()["round"] == 3


def test_other_os_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)

    def denied(*a, **k):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(PermissionError):
        rd.save_checkpoint(1, {"round": 1}, keep=2)
