"""Image data: Fashion-MNIST from Debian's IDX files, scikit-image's lfw_subset, class folders, ``.npz`` arrays and a
saved ``datasets`` image column; undecodable images named and refused or skipped; partitions over image labels."""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedfm.config import DataConfig
from fedfm.data import build_federated_data
from fedfm.data.images import FASHION_MNIST_DIR, read_idx
from fedfm.data.sources import concat_examples, load_examples
from fedfm.errors import DataError
from tests.conftest import needs_fashion



def _load(source, **data):
    return load_examples(DataConfig(source=str(source), **data), needs_labels=True, images=True)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _pattern(label: int, size: int = 12) -> np.ndarray:
    """An RGB image whose label can be read back from its pixels."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[..., label % 3] = 40 * (label + 1)
    return img


@needs_fashion
def test_fashion_mnist_reads_debians_idx_files_with_its_test_split_held_out():
    ex = _load("fashion-mnist")
    assert len(ex) == 70_000 and ex.num_classes == 10
    assert np.bincount(ex.labels).tolist() == [7000] * 10
    assert int(ex.is_test.sum()) == 10_000 and not ex.is_test[:60_000].any()
    assert ex.images[0].shape == (28, 28, 3) and ex.images[0].dtype == np.uint8
    # the first training image and label, read independently of the code under test
    with gzip.open(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz") as f:
        raw = f.read()
    first = np.frombuffer(raw, dtype=np.uint8, count=28 * 28, offset=16).reshape(28, 28)
    assert (ex.images[0][..., 0] == first).all() and (ex.images[0][..., 2] == first).all()
    with gzip.open(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz") as f:
        first_label = f.read()[8]
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert ex.label_names == names  # numbered as the dataset numbers its classes
    assert ex.labels[0] == first_label


@needs_fashion
def test_dirichlet_partition_works_on_image_labels(tiny_config):
    cfg = tiny_config(**{"data.source": "fashion-mnist", "data.max_examples": 3000, "partition.method": "dirichlet",
                         "partition.alpha": 0.1, "partition.num_clients": 5})
    ex = load_examples(cfg.data, needs_labels=True, seed=0, images=True)
    data = build_federated_data(cfg, ex)
    counts = np.array(data.describe()["clients"][0]["label_counts"])
    assert sum(len(c.train) for c in data.clients) + len(data.test) <= len(ex)
    # Dirichlet(0.1) skews each client's label mix: a client's largest class holds far more than a tenth
    shares = [max(c["label_counts"]) / max(1, sum(c["label_counts"])) for c in data.describe()["clients"]]
    assert max(shares) > 0.3 and counts.sum() > 0


def test_lfw_subset_is_100_faces_and_100_others():
    ex = _load("lfw-subset")
    assert len(ex) == 200 and ex.label_names == ["face", "not face"]
    assert ex.labels[:100].tolist() == [0] * 100 and ex.labels[100:].tolist() == [1] * 100
    assert ex.images[0].shape == (25, 25, 3) and ex.images[0].dtype == np.uint8
    from skimage.data import lfw_subset

    assert (ex.images[7][..., 1] == np.rint(lfw_subset()[7] * 255).astype(np.uint8)).all()


def test_idx_reader_refuses_a_file_that_is_not_idx(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0c\x01\x00\x00\x00\x02ab")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "y-idx1-ubyte"
    short.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DataError, match="states shape"):
        read_idx(short)


def _class_folder(root: Path, per_class: int = 3, split: str | None = None) -> Path:
    for label, name in enumerate(["cat", "dog"]):
        folder = root / (split or "") / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_pattern(label)).save(folder / f"{i}.png")
    return root


def test_a_folder_per_class(tmp_path):
    root = _class_folder(tmp_path / "pets")
    ex = _load(root)
    assert len(ex) == 6 and ex.label_names == ["cat", "dog"]
    for img, label in zip(ex.images, ex.labels):
        assert img.shape == (12, 12, 3) and (img == _pattern(int(label))).all()


def test_split_folders_hold_out_their_test_images(tmp_path):
    root = _class_folder(tmp_path / "pets", split="train")
    _class_folder(root, per_class=1, split="test")
    ex = _load(root)
    assert len(ex) == 8 and int(ex.is_test.sum()) == 2


def test_an_image_outside_class_folders_is_named(tmp_path):
    root = _class_folder(tmp_path / "pets")
    Image.fromarray(_pattern(0)).save(root / "stray.png")
    with pytest.raises(DataError, match="stray.png is not in a class folder"):
        _load(root)


def test_an_undecodable_image_is_refused_naming_its_file_and_index(tmp_path):
    root = _class_folder(tmp_path / "pets")
    (root / "dog" / "1.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"image 4 \(dog/1.png\) cannot be decoded.*data.bad_images"):
        _load(root)


def test_bad_images_skip_leaves_it_out_and_says_so(tmp_path):
    root = _class_folder(tmp_path / "pets")
    (root / "dog" / "1.png").write_bytes(b"\x89PNG truncated")
    ex = _load(root, bad_images="skip")
    assert len(ex) == 5 and ex.labels.tolist() == [0, 0, 0, 1, 1]
    assert any("dog/1.png" in n and "1 image(s)" in n for n in ex.notes)


def test_npz_arrays_with_label_names_and_a_split(tmp_path):
    images = np.stack([_pattern(i % 2) for i in range(6)])
    path = tmp_path / "arrays.npz"
    np.savez(path, images=images, labels=np.array([i % 2 for i in range(6)]), label_names=np.array(["a", "b"]),
             split=np.array(["train"] * 4 + ["test"] * 2))
    ex = _load(path)
    assert ex.label_names == ["a", "b"] and ex.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert ex.is_test.tolist() == [False] * 4 + [True] * 2
    assert all((img == _pattern(int(lab))).all() for img, lab in zip(ex.images, ex.labels))


def test_npz_grey_and_float_images_become_rgb_uint8(tmp_path):
    grey = np.linspace(0, 1, 2 * 5 * 5).reshape(2, 5, 5)
    path = tmp_path / "grey.npz"
    np.savez(path, images=grey, labels=np.array([0, 1]))
    ex = _load(path)
    assert ex.images[1].shape == (5, 5, 3) and ex.images[1][4, 4, 2] == 255 and ex.images[0][0, 0, 0] == 0


def test_npz_without_images_or_with_bad_values_is_named(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, pixels=np.zeros((2, 3, 3)))
    with pytest.raises(DataError, match="no 'images' array"):
        _load(path)
    np.savez(path, images=np.full((2, 3, 3), 300, dtype=np.int32), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"image 0 cannot be decoded: ValueError: its int32 values lie outside 0..255"):
        _load(path)


def test_a_saved_datasets_image_column(tmp_path):
    from datasets import Dataset, Features, Image as ImageFeature, Value

    rows = {"image": [{"bytes": _png(_pattern(i % 2)), "path": None} for i in range(4)], "label": ["x", "y", "x", "y"]}
    ds = Dataset.from_dict(rows, features=Features({"image": ImageFeature(), "label": Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    ex = _load(tmp_path / "ds")
    assert ex.label_names == ["x", "y"] and all((img == _pattern(int(lab))).all() for img, lab in zip(ex.images, ex.labels))
    rows["image"][2] = {"bytes": b"garbage", "path": None}
    ds = Dataset.from_dict(rows, features=Features({"image": ImageFeature(decode=False), "label": Value("string")}))
    ds.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match="image 2 cannot be decoded"):
        _load(tmp_path / "bad")


def test_a_text_task_on_images_and_an_image_task_on_text_are_named(tmp_path):
    with pytest.raises(DataError, match=r"data.text_column: lfw-subset holds images.*image_classification"):
        load_examples(DataConfig(source="lfw-subset"), needs_labels=True)
    with pytest.raises(DataError, match=r"data.image_column: column 'image' not found in bbc-news"):
        _load("bbc-news")


def test_concat_keeps_images(tmp_path):
    a, b = _load(_class_folder(tmp_path / "a")), _load(_class_folder(tmp_path / "b", per_class=1))
    both = concat_examples(a, b)
    assert len(both) == 8 and len(both.images) == 8 and both.labels.tolist()[-2:] == [0, 1]
