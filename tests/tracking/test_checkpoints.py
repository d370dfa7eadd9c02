import numpy as np
import torch

from fedfm.tracking import RunDir


def test_a_checkpoint_of_tensors_and_numpy_scalars_loads_back_as_tensors_and_builtins(tmp_path):
    """numpy scalars (a clock's finish time, a sampled client id) are saved as Python ones, so the checkpoint loads
    with weights_only=True; only the last ``keep`` files stay."""
    rd = RunDir(tmp_path / "run")
    for rnd in (1, 2, 3):
        state = {"round": rnd, "global": torch.arange(3.0) * rnd,
                 "in_flight": [(np.float64(1.5), 0, np.int64(7), 2, {"metrics": {"loss": np.float32(0.25)}})],
                 "manifest": {np.int64(4): 3}}
        rd.save_checkpoint(rnd, state, keep=2)
    assert [p.name for p in rd.list_checkpoints()] == ["round_0002.pt", "round_0003.pt"]
    ck = rd.load_last_checkpoint()
    assert ck["round"] == 3 and torch.equal(ck["global"], torch.tensor([0.0, 3.0, 6.0]))
    finish, _, client, _, res = ck["in_flight"][0]
    assert (finish, client, res["metrics"]["loss"], ck["manifest"]) == (1.5, 7, 0.25, {4: 3})
    assert type(finish) is float and type(client) is int and type(next(iter(ck["manifest"]))) is int
