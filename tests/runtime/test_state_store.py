import torch

from fedfm.runtime.state_store import ClientStateStore


def test_memory_store_roundtrip():
    store = ClientStateStore(cache_clients=10)
    store.put(3, {"c": torch.ones(2)})
    assert 3 in store and torch.equal(store.get(3)["c"], torch.ones(2))
    assert store.get(4) is None


def test_spills_least_recently_used_to_disk(tmp_path):
    store = ClientStateStore(cache_clients=2, state_dir=tmp_path)
    for cid in range(5):
        store.put(cid, {"c": torch.full((3,), float(cid))})
    assert len(store._mem) == 2 and len(store) == 5
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"client_{i:06d}.safetensors" for i in range(3)]  # no temp files left
    for cid in range(5):
        assert torch.equal(store.get(cid)["c"], torch.full((3,), float(cid)))


def test_checkpoint_roundtrip(tmp_path):
    store = ClientStateStore(cache_clients=1, state_dir=tmp_path / "a")
    store.put(0, {"x": torch.zeros(1)})
    store.put(1, {"x": torch.ones(1)})
    other = ClientStateStore(cache_clients=5)
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.get(0)["x"], torch.zeros(1)) and torch.equal(other.get(1)["x"], torch.ones(1))
