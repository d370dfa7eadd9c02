"""Image data: built-in image datasets, folders of images (one sub-folder per class), ``.npz`` arrays, and the image
column of a saved ``datasets`` directory, decoded into ``Examples.images`` (one H x W x 3 uint8 RGB array each)."""
from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLIT_FOLDERS = {"train": "train", "training": "train", "test": "test", "testing": "test", "validation": "validation",
                 "valid": "validation", "val": "validation"}

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# the ten classes in the order of their label ids (Xiao, Rasul & Vollgraf 2017)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzipped or not) as a uint8 array of its stated shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"data.source: could not read {path}: {type(e).__name__}: {e.strerror or e}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"data.source: {path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"data.source: {path} states shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def fashion_mnist(root: Path = FASHION_MNIST_DIR) -> dict:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images of 28 x 28, 10 classes, from
    Debian's ``dataset-fashion-mnist`` IDX files. The test images are the held-out set (``__split__`` test)."""
    files = {(split, kind): root / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
             for split, prefix in (("train", "train"), ("test", "t10k")) for kind in ("images", "labels")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise DataError(f"data.source 'fashion-mnist': {missing[0]} is missing; install Debian's package "
                        "(apt-get install dataset-fashion-mnist)")
    table: dict = {"image": [], "label": [], "__split__": []}
    for split in ("train", "test"):
        images, labels = read_idx(files[split, "images"]), read_idx(files[split, "labels"])
        if len(images) != len(labels) or images.ndim != 3:
            raise DataError(f"data.source 'fashion-mnist': {files[split, 'images']} and {files[split, 'labels']} "
                            "do not match (expected N images of H x W and N labels)")
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"data.source 'fashion-mnist': {files[split, 'labels']} has label {labels.max()}; "
                            f"expected 0..{len(FASHION_MNIST_CLASSES) - 1}")
        table["image"] += list(images)
        table["label"] += [FASHION_MNIST_CLASSES[i] for i in labels]
        table["__split__"] += [split] * len(labels)
    return table


def lfw_subset() -> dict:
    """scikit-image's bundled subset of Labeled Faces in the Wild (Huang et al. 2007): 200 images of 25 x 25, the
    first 100 faces and the other 100 not."""
    try:
        from skimage.data import lfw_subset as load
    except ImportError:
        raise DataError("data.source 'lfw-subset' needs the package scikit-image (pip install 'fedfm[vision]')") from None
    images = load()
    return {"image": list(images), "label": ["face"] * 100 + ["not face"] * (len(images) - 100)}


def read_npz(path: Path) -> dict:
    """Arrays in an ``.npz`` file: ``images`` (N x H x W or N x H x W x C) and ``labels`` (N), with optional
    ``label_names`` (labels are then ids into it) and ``split`` (N strings: train/test/validation)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # a bad zip, or a pickled object array
        raise DataError(f"data.source: could not read {path}: {type(e).__name__}: {e}") from None
    if "images" not in arrays:
        raise DataError(f"data.source: {path} has no 'images' array (arrays: {', '.join(arrays) or 'none'}); expected "
                        "images of N x H x W or N x H x W x C and labels of N")
    images = arrays["images"]
    if images.ndim not in (3, 4):
        raise DataError(f"data.source: {path}: 'images' has shape {images.shape}; expected N x H x W or N x H x W x C")
    table: dict = {"image": list(images)}
    for key, column in (("labels", "label"), ("split", "__split__")):
        if key in arrays:
            if len(arrays[key]) != len(images):
                raise DataError(f"data.source: {path}: {len(arrays[key])} {key} for {len(images)} images")
            table[column] = arrays[key].tolist()
    if "label_names" in arrays and "label" in table:
        names = [str(n) for n in arrays["label_names"].tolist()]
        bad = [v for v in table["label"] if not isinstance(v, int) or not 0 <= v < len(names)]
        if bad:
            raise DataError(f"data.source: {path}: label {bad[0]!r} is not an index into its {len(names)} label_names")
        table["label"] = [names[v] for v in table["label"]]
    return table


def image_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(path: Path, files: list[Path]) -> dict:
    """A folder of images, one sub-folder per class (``root/cat/1.png``), optionally inside split folders
    (``root/train/cat/1.png``, ``root/test/cat/2.png``). Images are decoded later, only those that are used."""
    table: dict = {"image": [], "label": [], "file": []}
    loose = [f for f in files if f.parent == path]
    if loose:
        raise DataError(f"data.source: folder {path}: image {loose[0].name} is not in a class folder; expected one "
                        "sub-folder per class (root/<class>/<image>)")
    split_layout = all(f.relative_to(path).parts[0].lower() in SPLIT_FOLDERS for f in files)
    if split_layout:
        table["__split__"] = []
    for f in files:
        parts = f.relative_to(path).parts
        if split_layout:
            if len(parts) < 3:
                raise DataError(f"data.source: folder {path}: {f.relative_to(path)} is in a split folder but not in a "
                                "class folder inside it (root/<split>/<class>/<image>)")
            table["__split__"].append(SPLIT_FOLDERS[parts[0].lower()])
            parts = parts[1:]
        table["image"].append(str(f))
        table["label"].append(parts[0])
        table["file"].append(f.relative_to(path).as_posix())
    return table


def _as_rgb(array: np.ndarray) -> np.ndarray:
    """H x W (grey), H x W x 1, x 3 or x 4 -> H x W x 3 uint8 (grey repeated by a view, not copied)."""
    if array.dtype != np.uint8:
        if array.dtype.kind == "f":
            if not np.isfinite(array).all():
                raise ValueError("it has non-finite values")
            scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0  # floats in [0, 1] or already in [0, 255]
            array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
        elif array.dtype.kind in "iub":
            if array.min(initial=0) < 0 or array.max(initial=0) > 255:
                raise ValueError(f"its {array.dtype} values lie outside 0..255")
            array = array.astype(np.uint8)
        else:
            raise ValueError(f"its dtype is {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return np.broadcast_to(array[..., None], (*array.shape, 3))
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return array[..., :3]
    raise ValueError(f"its shape is {array.shape}; expected H x W, H x W x 1, H x W x 3 or H x W x 4")


def _open(value, base: Optional[Path]):
    from PIL import Image

    if isinstance(value, dict):  # a datasets Image feature read with decode=False: {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, (str, Path)):
        p = Path(value).expanduser()
        if not p.is_absolute() and base is not None:
            p = base / p
        return Image.open(p)
    return value


def decode_image(value, base: Optional[Path] = None) -> np.ndarray:
    """One image (an array, a PIL image, encoded bytes, a ``datasets`` image dict or a file path) as H x W x 3 uint8.
    Raises ValueError or OSError when it cannot be decoded."""
    if isinstance(value, np.ndarray):
        return _as_rgb(value)
    image = _open(value, base)
    if not hasattr(image, "convert"):
        raise ValueError(f"it is a {type(value).__name__}, not an image")
    with image:
        image.load()
        return np.asarray(image.convert("RGB"))


def decode_images(values: list, names: list[str], bad_images: str, source: str,
                  base: Optional[Path] = None) -> tuple[list[Optional[np.ndarray]], list[str]]:
    """Decode every value; one that cannot be decoded is refused (a DataError naming its file and index) or, with
    ``data.bad_images: skip``, left out (None in its place) and named in a note."""
    out: list[Optional[np.ndarray]] = []
    bad: list[str] = []
    for i, (value, name) in enumerate(zip(values, names)):
        try:
            out.append(decode_image(value, base))
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for bad files
            what = f"image {i} ({name})" if name else f"image {i}"
            if bad_images == "refuse":
                raise DataError(f"data.source: {source}: {what} cannot be decoded: {type(e).__name__}: {e}. "
                                "Set data.bad_images: skip to leave such images out") from None
            out.append(None)
            bad.append(what)
    notes = []
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        notes.append(f"data.bad_images skip: {len(bad)} image(s) of {source} cannot be decoded and are left out: {shown}")
    return out, notes
