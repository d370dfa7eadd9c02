import pytest
import torch

from fedfm.aggregation import AGGREGATORS
from fedfm.aggregation.server_opt import FedAvg


def test_fedavg_is_example_weighted_mean_by_hand():
    agg = AGGREGATORS.get("fedavg")()
    updates = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, -2.0]])
    weights = torch.tensor([1.0, 3.0])
    # (1*[1,0,2] + 3*[3,4,-2]) / 4 = [10/4, 12/4, -4/4]
    assert torch.allclose(agg(updates, weights), torch.tensor([2.5, 3.0, -1.0]))


def test_server_lr_scales_the_step():
    x = torch.tensor([1.0, 1.0])
    assert torch.allclose(FedAvg(lr=1.0).step(x, torch.tensor([0.5, -1.0])), torch.tensor([1.5, 0.0]))
    assert torch.allclose(FedAvg(lr=0.5).step(x, torch.tensor([0.5, -1.0])), torch.tensor([1.25, 0.5]))


def test_shape_errors_are_clear():
    agg = AGGREGATORS.get("fedavg")()
    with pytest.raises(ValueError, match="updates"):
        agg(torch.zeros(2, 3), torch.ones(3))
