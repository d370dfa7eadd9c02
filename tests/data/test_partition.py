import numpy as np
import pytest

from fedfm.data.partition import (
    PARTITIONERS,
    PartitionSpec,
    check_partition,
    label_counts,
    partition,
)
from fedfm.errors import ConfigError, DataError

N, C = 600, 6
LABELS = np.random.default_rng(123).integers(0, C, size=N)
GROUPS = np.array([f"user{i % 7}" for i in range(N)])
METHODS = ["iid", "dirichlet", "shards", "by_column", "quantity"]


def _run(method, seed=0, labels=LABELS, groups=GROUPS, **spec):
    return partition(method, labels, groups, PartitionSpec(**spec), seed)


def _is_partition(parts, n):
    return np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_all_methods_registered():
    assert set(METHODS) <= set(PARTITIONERS.names())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_a_partition(method):
    parts = _run(method, num_clients=8)
    assert _is_partition(parts, N)
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates
    if method != "by_column":
        assert len(parts) == 8
        assert min(len(p) for p in parts) >= 2


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_output(method):
    a, b = _run(method, seed=7), _run(method, seed=7)
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards", "quantity"])
def test_different_seed_different_output(method):
    a, b = _run(method, seed=1), _run(method, seed=2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_iid_sizes_nearly_equal():
    sizes = [len(p) for p in _run("iid", num_clients=7)]
    assert max(sizes) - min(sizes) <= 1


def test_unlabelled_iid_and_quantity_take_n():
    for method in ("iid", "quantity"):
        parts = partition(method, None, None, PartitionSpec(num_clients=5), 0, n=50)
        assert _is_partition(parts, 50) and len(parts) == 5


def _mean_max_share(parts):
    counts = np.array(label_counts(parts, LABELS, C), dtype=float)
    return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))


def test_dirichlet_small_alpha_is_more_skewed():
    skewed = np.mean([_mean_max_share(_run("dirichlet", seed=s, alpha=0.1)) for s in range(3)])
    uniform = np.mean([_mean_max_share(_run("dirichlet", seed=s, alpha=100.0)) for s in range(3)])
    assert uniform < 0.3  # close to 1/C
    assert skewed > uniform + 0.25


def test_dirichlet_respects_min_size_even_when_resampling_fails():
    # 30 clients, alpha tiny: rejection sampling almost never succeeds, so the top-up fallback must.
    labels = np.repeat(np.arange(3), 40)
    parts = partition("dirichlet", labels, None, PartitionSpec(num_clients=30, alpha=0.01, min_size=3), 0)
    assert _is_partition(parts, len(labels))
    assert min(len(p) for p in parts) >= 3


def test_shards_limits_labels_per_client():
    labels = np.repeat(np.arange(10), 40)  # balanced; 40 shards of 10 never straddle two labels
    spec = PartitionSpec(num_clients=20, shards_per_client=2)
    parts = partition("shards", labels, None, spec, 3)
    distinct = [len(np.unique(labels[p])) for p in parts]
    assert max(distinct) <= 2
    assert all(len(p) == 20 for p in parts)
    # and it is label-skewed compared with iid, which sees (nearly) all 10 labels per client
    iid = partition("iid", labels, None, spec, 3)
    assert min(len(np.unique(labels[p])) for p in iid) > 2


def test_by_column_one_client_per_group():
    groups = np.array([3, 1, 3, 2, 1, 3, 2, 2, 9])
    parts = partition("by_column", None, groups, PartitionSpec(num_clients=2), 0)
    assert len(parts) == 4
    for value, p in zip([1, 2, 3, 9], parts):
        assert np.array_equal(p, np.flatnonzero(groups == value))


def test_by_column_strings_sorted_order():
    parts = _run("by_column")
    names = sorted(set(GROUPS))
    assert len(parts) == len(names) == 7
    for name, p in zip(names, parts):
        assert np.array_equal(p, np.flatnonzero(GROUPS == name))


def test_quantity_sizes_unequal_and_above_min():
    for seed in range(3):
        parts = partition("quantity", None, None, PartitionSpec(num_clients=20, min_size=5), seed, n=2000)
        sizes = [len(p) for p in parts]
        assert len(parts) == 20 and sum(sizes) == 2000
        assert min(sizes) >= 5
        assert max(sizes) / min(sizes) > 2


def test_label_counts():
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    assert label_counts(parts, labels, 4) == [[1, 1, 0, 0], [0, 1, 3, 0]]


def test_check_partition_rejects_overlap_and_gaps():
    good = [np.array([0, 2], dtype=np.int64), np.array([1, 3], dtype=np.int64)]
    check_partition(good, 4)
    with pytest.raises(AssertionError):
        check_partition([np.array([0, 1], dtype=np.int64), np.array([1, 3], dtype=np.int64)], 4)
    with pytest.raises(AssertionError):
        check_partition([np.array([0, 1], dtype=np.int64)], 4)


@pytest.mark.parametrize(
    "method, labels, groups, spec, field",
    [
        ("dirichlet", LABELS, None, dict(alpha=0), "partition.alpha"),
        ("dirichlet", LABELS, None, dict(alpha=-1.0), "partition.alpha"),
        ("iid", LABELS, None, dict(num_clients=0), "partition.num_clients"),
        ("shards", LABELS, None, dict(shards_per_client=0), "partition.shards_per_client"),
        ("quantity", LABELS, None, dict(power=0), "partition.power"),
        ("iid", LABELS[:10], None, dict(num_clients=8, min_size=2), "partition.min_size"),
        ("dirichlet", None, GROUPS, {}, "partition.method 'dirichlet' needs labels"),
        ("shards", None, GROUPS, {}, "partition.method 'shards' needs labels"),
        ("by_column", LABELS, None, {}, "data.client_column"),
        ("dirichlett", LABELS, None, {}, "partition.method"),
    ],
)
def test_config_errors_name_the_field(method, labels, groups, spec, field):
    with pytest.raises(ConfigError) as e:
        partition(method, labels, groups, PartitionSpec(**spec), 0)
    assert field in str(e.value)


def test_mismatched_labels_and_groups_is_a_data_error():
    with pytest.raises(DataError):
        partition("iid", LABELS, GROUPS[:-1], PartitionSpec(), 0)


def test_by_file_is_by_column_on_the_file_column():
    files = np.array(["b.txt", "a.txt", "b.txt", "sub/c.txt", "a.txt"])
    parts = partition("by_file", None, files, PartitionSpec(num_clients=2), 0)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]
    with pytest.raises(ConfigError, match="'by_file' needs the 'file' column"):
        partition("by_file", LABELS, None, PartitionSpec(), 0)


def test_by_file_config_reads_the_file_column(tiny_config):
    cfg = tiny_config(**{"partition.method": "by_file", "federation.clients_per_round": 20})
    assert cfg.data.client_column == "file"  # set by validation; clients_per_round is checked against the data
    with pytest.raises(ConfigError, match="by_file.*data.client_column is 'site'"):
        tiny_config(**{"partition.method": "by_file", "data.client_column": "site"})


def test_by_file_one_client_per_txt_file_named_by_file(tiny_config, tmp_path):
    from fedfm.data import build_federated_data
    from fedfm.data.sources import load_examples

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    names = ["a.txt", "b.txt", "sub/c.txt"]
    for k, name in enumerate(names):
        (folder / name).write_text(f"document {k}")
    for j in range(4):
        (folder / f"z{j}.txt").write_text(f"more text {j}")
    cfg = tiny_config(**{"data.source": str(folder), "task.name": "lm", "data.label_column": None,
                         "partition.method": "by_file", "data.test_fraction": 0.1, "partition.local_test_fraction": 0})
    ex = load_examples(cfg.data, needs_labels=False)
    fed = build_federated_data(cfg, ex)
    assert len(fed.test) == 1
    files = sorted(set(names + [f"z{j}.txt" for j in range(4)]) - {ex.groups[fed.test[0]]})
    assert [c.name for c in fed.clients] == files  # one client per file, named by its path in the folder
    for c in fed.clients:
        assert [ex.groups[i] for i in c.train] == [c.name]
