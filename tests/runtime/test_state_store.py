import torch

from fedfm.runtime.state_store import ClientStateStore


def test_memory_store_roundtrip():
    store = ClientStateStore(cache_clients=10)
    store.put(3, {"c": torch.ones(2)})
    assert 3 in store and torch.equal(store.get(3)["c"], torch.ones(2))
    assert store.get(4) is None


def test_memory_only_checkpoint_holds_the_tensors():
    store = ClientStateStore(cache_clients=5)
    store.put(0, {"x": torch.zeros(1)})
    other = ClientStateStore(cache_clients=5)
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.get(0)["x"], torch.zeros(1))


def test_spills_least_recently_used_to_disk(tmp_path):
    store = ClientStateStore(cache_clients=2, state_dir=tmp_path)
    for cid in range(5):
        store.put(cid, {"c": torch.full((3,), float(cid))})
    assert len(store._mem) == 2 and len(store) == 5
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"client_{i:06d}.v{i}.safetensors" for i in range(3)]  # no temp files left
    for cid in range(5):
        assert torch.equal(store.get(cid)["c"], torch.full((3,), float(cid)))


def test_checkpoint_roundtrip(tmp_path):
    store = ClientStateStore(cache_clients=1, state_dir=tmp_path / "a")
    store.put(0, {"x": torch.zeros(1)})
    store.put(1, {"x": torch.ones(1)})
    other = ClientStateStore(cache_clients=5, state_dir=tmp_path / "a")  # resuming: the same run's state_dir
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.get(0)["x"], torch.zeros(1)) and torch.equal(other.get(1)["x"], torch.ones(1))


def test_checkpoints_are_manifests_and_resume_reads_the_versions_they_name(tmp_path):
    """A checkpoint with a state_dir records versions, not tensors; later writes never change what it names."""
    store = ClientStateStore(cache_clients=2, state_dir=tmp_path)
    for cid in range(6):
        store.put(cid, {"c": torch.full((2,), float(cid))})
    ck = store.state_dict()
    assert set(ck["__manifest__"]) == set(range(6)) and all(isinstance(v, int) for v in ck["__manifest__"].values())
    assert store.in_memory <= 2
    for cid in range(6):  # the next "round" changes every client
        store.put(cid, {"c": torch.full((2,), 100.0 + cid)})
    store.state_dict()
    resumed = ClientStateStore(cache_clients=2, state_dir=tmp_path)
    resumed.load_state_dict(ck)
    for cid in range(6):
        assert torch.equal(resumed.get(cid)["c"], torch.full((2,), float(cid)))


def test_files_no_kept_checkpoint_names_are_deleted(tmp_path):
    store = ClientStateStore(cache_clients=1, state_dir=tmp_path, keep_manifests=2)
    for rnd in range(5):
        store.put(0, {"c": torch.full((1,), float(rnd))})
        store.put(1, {"c": torch.full((1,), float(rnd))})
        store.state_dict()
    assert len(list(tmp_path.glob("client_*.safetensors"))) == 4  # 2 clients x the last 2 checkpoints


def test_a_missing_state_file_is_a_clear_error(tmp_path):
    import pytest

    from fedfm.errors import FedfmError

    store = ClientStateStore(cache_clients=1, state_dir=tmp_path)
    store.put(0, {"c": torch.zeros(1)})
    ck = store.state_dict()
    for p in tmp_path.glob("*.safetensors"):
        p.unlink()
    with pytest.raises(FedfmError, match="client state file.*missing.*client_000000"):
        ClientStateStore(state_dir=tmp_path).load_state_dict(ck)


def test_ten_thousand_clients_stay_within_the_cache(tmp_path):
    store = ClientStateStore(cache_clients=50, state_dir=tmp_path)
    for cid in range(10_000):
        store.put(cid, {"c": torch.full((4,), float(cid))})
    assert store.in_memory == 50 and len(store) == 10_000
    ck = store.state_dict()
    assert len(ck["__manifest__"]) == 10_000
    assert torch.equal(store.get(1234)["c"], torch.full((4,), 1234.0))
