"""``data.source``: files, folders, saved datasets, the built-in BBC News; column mapping and clear errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedfm.data import build_federated_data
from fedfm.data.sources import load_examples
from fedfm.errors import DataError

TINY_NAMES = ["money", "music", "sport", "tech"]


@pytest.fixture
def rows_df(tiny_csv):
    """The tiny data set (read with the csv module, not the code under test) as a DataFrame."""
    import csv

    with open(tiny_csv, newline="") as f:
        return pd.DataFrame(list(csv.DictReader(f)))


def _load(tiny_config, source, needs_labels=True, **extra):
    cfg = tiny_config(**{"data.source": str(source), **extra})
    return load_examples(cfg.data, needs_labels=needs_labels)


def _check_tiny(ex, df):
    assert len(ex) == len(df) == 240
    assert ex.texts == df["text"].tolist()
    assert ex.label_names == TINY_NAMES
    assert ex.num_classes == 4
    assert ex.labels.dtype == np.int64
    # label ids map back to the original strings, row by row
    assert [ex.label_names[i] for i in ex.labels] == df["label"].tolist()
    assert ex.is_test is None
    assert ex.groups is None  # no client_column set


# ------------------------------------------------------------------ formats

def test_csv(tiny_config, tiny_csv, rows_df):
    _check_tiny(_load(tiny_config, tiny_csv), rows_df)


def test_json_records(tiny_config, tmp_path, rows_df):
    path = tmp_path / "d.json"
    rows_df.to_json(path, orient="records")
    assert path.read_text().lstrip().startswith("[")
    _check_tiny(_load(tiny_config, path), rows_df)


def test_jsonl(tiny_config, tmp_path, rows_df):
    path = tmp_path / "d.jsonl"
    rows_df.to_json(path, orient="records", lines=True)
    assert len(path.read_text().splitlines()) == 240
    _check_tiny(_load(tiny_config, path), rows_df)


def test_json_file_holding_lines(tiny_config, tmp_path, rows_df):
    path = tmp_path / "d.json"  # JSON-lines content under a .json suffix
    rows_df.to_json(path, orient="records", lines=True)
    _check_tiny(_load(tiny_config, path), rows_df)


def test_parquet(tiny_config, tmp_path, rows_df):
    path = tmp_path / "d.parquet"
    rows_df.to_parquet(path)
    _check_tiny(_load(tiny_config, path), rows_df)


def test_folder_of_files_is_concatenated(tiny_config, tmp_path, rows_df):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    rows_df.iloc[:80].to_csv(folder / "a.csv", index=False)
    rows_df.iloc[80:150].to_json(folder / "b.jsonl", orient="records", lines=True)
    rows_df.iloc[150:200].to_json(folder / "c.json", orient="records")
    rows_df.iloc[200:].to_parquet(folder / "sub" / "d.parquet")
    (folder / "README.txt").write_text("not data")
    _check_tiny(_load(tiny_config, folder), rows_df)


def test_saved_dataset(tiny_config, tmp_path, rows_df):
    import datasets

    path = tmp_path / "saved"
    datasets.Dataset.from_pandas(rows_df).save_to_disk(str(path))
    _check_tiny(_load(tiny_config, path), rows_df)


def test_saved_dataset_dict_test_split_is_held_out(tiny_config, tmp_path, rows_df):
    import datasets

    path = tmp_path / "saved_dict"
    train, test = rows_df.iloc[:200].reset_index(drop=True), rows_df.iloc[200:].reset_index(drop=True)
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(train),
                          "test": datasets.Dataset.from_pandas(test)}).save_to_disk(str(path))
    cfg = tiny_config(**{"data.source": str(path)})
    ex = load_examples(cfg.data, needs_labels=True)
    assert len(ex) == 240
    assert ex.is_test is not None
    assert ex.is_test.sum() == 40
    test_texts = sorted(t for t, flag in zip(ex.texts, ex.is_test) if flag)
    assert test_texts == sorted(test["text"])
    assert ex.label_names == TINY_NAMES

    fed = build_federated_data(cfg, ex)
    assert sorted(fed.test.tolist()) == np.flatnonzero(ex.is_test).tolist()
    client_idx = np.concatenate([np.concatenate([c.train, c.test]) for c in fed.clients])
    assert sorted(client_idx.tolist()) == np.flatnonzero(~ex.is_test).tolist()
    assert fed.notes == [f"held-out set: split 'test' of {path} (40 examples)"]
    assert fed.describe()["notes"] == fed.notes  # partition.json says so too


def _glue_like(path, rows_df, test_label_feature):
    """train 160 / validation 40 / test 40 rows, labels as ``datasets`` ClassLabel ids; the test split is unlabelled
    (-1 everywhere, as GLUE ships it)."""
    import datasets

    ids = rows_df["label"].map(TINY_NAMES.index).tolist()
    labelled = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=TINY_NAMES)})
    unlabelled = datasets.Features({"text": datasets.Value("string"), "label": test_label_feature})
    part = {name: {"text": rows_df["text"].tolist()[a:b], "label": ids[a:b]}
            for name, (a, b) in {"train": (0, 160), "validation": (160, 200), "test": (200, 240)}.items()}
    part["test"]["label"] = [-1] * 40
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(part["train"], features=labelled),
        "validation": datasets.Dataset.from_dict(part["validation"], features=labelled),
        "test": datasets.Dataset.from_dict(part["test"], features=unlabelled),
    }).save_to_disk(str(path))


@pytest.mark.parametrize("test_label_feature", ["ClassLabel", "int64"])
def test_unlabelled_test_split_leaves_the_validation_split_held_out(tiny_config, tmp_path, rows_df, test_label_feature):
    import datasets

    feature = datasets.ClassLabel(names=TINY_NAMES) if test_label_feature == "ClassLabel" else datasets.Value("int64")
    path = tmp_path / "glue_like"
    _glue_like(path, rows_df, feature)
    cfg = tiny_config(**{"data.source": str(path)})
    ex = load_examples(cfg.data, needs_labels=True)
    assert len(ex) == 200  # the 40 unlabelled test rows are left out
    assert ex.label_names == ["0", "1", "2", "3"]  # four classes; -1 is none of them
    assert sorted(t for t, flag in zip(ex.texts, ex.is_test) if flag) == sorted(rows_df["text"][160:200])
    assert ex.notes == ["data.source: split 'test' has no labels (each is -1 or missing): its 40 examples are left out",
                        f"held-out set: split 'validation' of {path} (40 examples)"]
    fed = build_federated_data(cfg, ex)
    assert sorted(ex.texts[i] for i in fed.test) == sorted(rows_df["text"][160:200])
    assert fed.notes == ex.notes


def test_unlabelled_test_split_and_no_validation_split_hold_out_a_fraction(tiny_config, tmp_path, rows_df):
    import datasets

    path = tmp_path / "no_validation"
    _glue_like(path, rows_df, datasets.ClassLabel(names=TINY_NAMES))
    ds = datasets.load_from_disk(str(path))
    other = tmp_path / "train_and_unlabelled_test"
    datasets.DatasetDict({"train": ds["train"], "test": ds["test"]}).save_to_disk(str(other))
    cfg = tiny_config(**{"data.source": str(other), "data.test_fraction": 0.25})
    ex = load_examples(cfg.data, needs_labels=True)
    assert len(ex) == 160 and ex.is_test is None and ex.num_classes == 4
    fed = build_federated_data(cfg, ex)
    assert len(fed.test) == 40  # 25% of each of the 4 classes of 40
    assert fed.notes == ["data.source: split 'test' has no labels (each is -1 or missing): its 40 examples are left out",
                         "held-out set: 40 of 160 examples (data.test_fraction=0.25, stratified by label)"]


def test_unlabelled_rows_within_a_labelled_split_are_left_out(tiny_config, tmp_path, rows_df):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=TINY_NAMES)})
    ids = rows_df["label"].map(TINY_NAMES.index).tolist()
    ids[:5] = [-1] * 5  # datasets' mark of a missing ClassLabel
    path = tmp_path / "holes"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows_df["text"][:200].tolist(), "label": ids[:200]},
                                                              features=features),
                          "test": datasets.Dataset.from_dict({"text": rows_df["text"][200:].tolist(), "label": ids[200:]},
                                                             features=features)}).save_to_disk(str(path))
    ex = _load(tiny_config, path)
    assert len(ex) == 235 and ex.num_classes == 4
    assert not set(rows_df["text"][:5]) & set(ex.texts)
    assert ex.notes == ["data.source: 5 examples of split 'train' have no label and are left out",
                        f"held-out set: split 'test' of {path} (40 examples)"]


def test_negative_labels_of_a_file_are_a_class(tiny_config, tmp_path, rows_df):
    df = rows_df.copy()
    df["label"] = [(-1, 0, 1)[i % 3] for i in range(len(df))]  # e.g. negative / neutral / positive sentiment
    df.loc[0, "label"] = None
    path = tmp_path / "sentiment.csv"
    df.to_csv(path, index=False)
    ex = _load(tiny_config, path)
    assert len(ex) == 239 and ex.label_names == ["-1.0", "0.0", "1.0"]
    assert ex.notes == [f"data.source: 1 of the 240 rows of {path} have no label and are left out"]


def test_saved_dataset_dict_without_test_split(tiny_config, tmp_path, rows_df):
    import datasets

    path = tmp_path / "saved_train_only"
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(rows_df)}).save_to_disk(str(path))
    ex = _load(tiny_config, path)
    assert len(ex) == 240
    assert ex.is_test is None  # the held-out set is then drawn with data.test_fraction


# ------------------------------------------------------------------ column mapping

def test_string_and_int_labels_give_same_classes(tiny_config, tmp_path, rows_df):
    as_int = rows_df.copy()
    as_int["label"] = as_int["label"].map({n: 10 * (i + 1) for i, n in enumerate(TINY_NAMES)})
    p_str, p_int = tmp_path / "s.csv", tmp_path / "i.csv"
    rows_df.to_csv(p_str, index=False)
    as_int.to_csv(p_int, index=False)
    ex_s, ex_i = _load(tiny_config, p_str), _load(tiny_config, p_int)
    assert ex_s.num_classes == ex_i.num_classes == 4
    assert ex_s.label_names == TINY_NAMES
    assert ex_i.label_names == ["10", "20", "30", "40"]  # names come from the data
    np.testing.assert_array_equal(ex_s.labels, ex_i.labels)


def test_renamed_columns(tiny_config, tmp_path, rows_df):
    path = tmp_path / "renamed.csv"
    rows_df.rename(columns={"text": "body", "label": "topic"}).to_csv(path, index=False)
    ex = _load(tiny_config, path, **{"data.text_column": "body", "data.label_column": "topic"})
    assert ex.texts == rows_df["text"].tolist()
    assert ex.label_names == TINY_NAMES


def test_rows_missing_text_or_label_are_dropped(tiny_config, tmp_path, rows_df):
    df = rows_df.copy()
    df.loc[3, "text"] = None
    df.loc[7, "label"] = None
    path = tmp_path / "holes.csv"
    df.to_csv(path, index=False)
    ex = _load(tiny_config, path)
    assert len(ex) == 238
    assert rows_df.loc[3, "text"] not in ex.texts
    assert rows_df.loc[7, "text"] not in ex.texts


def test_max_examples_subsamples(tiny_config, tiny_csv):
    ex = _load(tiny_config, tiny_csv, **{"data.max_examples": 50})
    assert len(ex) == 50
    assert len(ex.labels) == 50
    assert set(ex.texts) <= set(pd.read_csv(tiny_csv)["text"])


def test_client_column_gives_groups(tiny_config, tiny_csv, rows_df):
    ex = _load(tiny_config, tiny_csv, **{"data.client_column": "site"})
    assert ex.groups is not None
    assert ex.groups.tolist() == rows_df["site"].tolist()


def test_by_column_partition_one_client_per_value(tiny_config, tiny_csv):
    cfg = tiny_config(**{"data.client_column": "site", "partition.method": "by_column"})
    ex = load_examples(cfg.data, needs_labels=True)
    fed = build_federated_data(cfg, ex)
    assert len(fed.clients) == 4
    assert sorted(c.name for c in fed.clients) == ["site0", "site1", "site2", "site3"]
    for c in fed.clients:
        idx = np.concatenate([c.train, c.test])
        assert len(idx) > 0
        assert set(ex.groups[idx].tolist()) == {c.name}
    # every non-test example belongs to exactly one client
    all_idx = np.concatenate([np.concatenate([c.train, c.test]) for c in fed.clients])
    assert len(all_idx) == len(set(all_idx.tolist())) == len(ex) - len(fed.test)


def test_builtin_bbc_news(tiny_config):
    ex = _load(tiny_config, "bbc-news")
    assert len(ex) == 2225
    assert ex.num_classes == 5
    assert ex.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(ex.labels).tolist() == [510, 386, 417, 511, 401]
    assert all(isinstance(t, str) and t for t in ex.texts)


# ------------------------------------------------------------------ errors

def _data_error(tiny_config, source, **extra) -> str:
    with pytest.raises(DataError) as info:
        _load(tiny_config, source, **extra)
    return str(info.value)


def test_missing_text_column(tiny_config, tiny_csv):
    msg = _data_error(tiny_config, tiny_csv, **{"data.text_column": "nope"})
    assert "data.text_column" in msg
    assert "'nope'" in msg
    assert "columns are: text, label, site" in msg


def test_missing_label_column(tiny_config, tiny_csv):
    msg = _data_error(tiny_config, tiny_csv, **{"data.label_column": "category"})
    assert "data.label_column" in msg and "'category'" in msg
    assert "text, label, site" in msg


def test_missing_client_column(tiny_config, tiny_csv):
    msg = _data_error(tiny_config, tiny_csv, **{"data.client_column": "user"})
    assert "data.client_column" in msg and "'user'" in msg


def test_one_class_label_column(tiny_config, tmp_path, rows_df):
    df = rows_df.copy()
    df["label"] = "same"
    path = tmp_path / "one.csv"
    df.to_csv(path, index=False)
    msg = _data_error(tiny_config, path)
    assert "data.label_column" in msg
    assert "only one class" in msg and "same" in msg


def test_nonexistent_path(tiny_config, tmp_path):
    missing = tmp_path / "nope.csv"
    msg = _data_error(tiny_config, missing)
    assert "data.source" in msg
    assert str(missing) in msg and "does not exist" in msg
    assert "bbc-news" in msg  # lists the built-in datasets


def test_folder_without_data_files(tiny_config, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.md").write_text("hello")
    msg = _data_error(tiny_config, folder)
    assert "data.source" in msg
    assert str(folder) in msg and "no " in msg


@pytest.mark.parametrize("name, content", [
    ("broken.parquet", b"this is not parquet"),
    ("broken.json", b"{not json at all"),
])
def test_unreadable_file(tiny_config, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    msg = _data_error(tiny_config, path)
    assert "data.source" in msg
    assert "could not read" in msg and str(path) in msg


def test_unsupported_suffix(tiny_config, tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<text>a</text>")
    msg = _data_error(tiny_config, path)
    assert "data.source" in msg and "'.xml'" in msg


def test_empty_csv(tiny_config, tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    msg = _data_error(tiny_config, path)
    assert "data.source" in msg and "no rows" in msg


# ------------------------------------------------------------------ plain text (.txt)

def _lm_load(tiny_config, source, **extra):
    cfg = tiny_config(**{"data.source": str(source), "task.name": "lm", "data.label_column": None,
                         "partition.method": "iid", **extra})
    return cfg, load_examples(cfg.data, needs_labels=False)


def test_txt_folder_one_row_per_file(tiny_config, tmp_path):
    from fedfm.data.sources import read_table

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document.\n\nIts second paragraph.\n")
    (folder / "sub" / "b.txt").write_bytes(b"caf\xe9 latin-1 bytes")
    (folder / "empty.txt").write_text("  \n\n ")
    table = read_table(str(folder))
    assert set(table) == {"text", "file"}
    assert table["file"] == ["a.txt", "empty.txt", "sub/b.txt"]  # relative paths, sorted
    assert table["text"][0] == "First document.\n\nIts second paragraph."  # a whole file is one document
    assert table["text"][2] == "caf\ufffd latin-1 bytes"  # undecodable bytes are replaced, not fatal
    _, ex = _lm_load(tiny_config, folder, **{"data.client_column": "file"})
    assert len(ex) == 2 and ex.groups.tolist() == ["a.txt", "sub/b.txt"]  # the empty file is dropped


def test_single_txt_file_one_row_per_paragraph(tiny_config, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Para one,\nstill one.\n\n\n  Para two.  \r\n\r\nPara three.\n\n   \n")
    _, ex = _lm_load(tiny_config, path, **{"data.client_column": "file"})
    assert ex.texts == ["Para one,\nstill one.", "Para two.", "Para three."]
    assert ex.groups.tolist() == ["book.txt"] * 3


def test_folder_mixing_txt_and_csv(tiny_config, tmp_path, rows_df):
    from fedfm.data.sources import read_table

    folder = tmp_path / "mixed"
    folder.mkdir()
    rows_df.iloc[:5].to_csv(folder / "rows.csv", index=False)
    (folder / "doc.txt").write_text("a whole document")
    table = read_table(str(folder))
    assert table["text"] == ["a whole document"] + rows_df["text"].iloc[:5].tolist()
    assert table["file"] == ["doc.txt"] + ["rows.csv"] * 5  # every row says which file it came from
    assert table["label"] == [None] + rows_df["label"].iloc[:5].tolist()
    _, ex = _lm_load(tiny_config, folder)
    assert len(ex) == 6


def test_unreadable_txt_names_the_file(tiny_config, tmp_path, monkeypatch):
    from pathlib import Path

    path = tmp_path / "locked.txt"
    path.write_text("secret")
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    msg = _data_error(tiny_config, path, **{"task.name": "lm", "data.label_column": None})
    assert "data.source" in msg and "could not read" in msg and str(path) in msg and "Permission denied" in msg


def test_by_file_on_a_source_without_files_names_the_fields(tiny_config, tiny_csv):
    msg = _data_error(tiny_config, tiny_csv, **{"partition.method": "by_file"})
    assert "data.client_column" in msg and "'file'" in msg and "by_file" in msg
