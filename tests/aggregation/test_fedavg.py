import torch

from fedfm.aggregation import AGGREGATORS, Updates
from fedfm.aggregation.server_opt import FedAvg


def test_fedavg_is_example_weighted_mean_by_hand():
    agg = AGGREGATORS.get("fedavg")()
    updates = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, -2.0]])
    weights = torch.tensor([1.0, 3.0])
    u = Updates(rnd=1, results=[], x=torch.zeros(3), spec=None, flat=updates, ranks=[0, 0])
    state, delta, measurements = agg(agg.init(), u, weights)
    # (1*[1,0,2] + 3*[3,4,-2]) / 4 = [10/4, 12/4, -4/4]
    assert torch.allclose(delta, torch.tensor([2.5, 3.0, -1.0])) and state == {} and measurements == {}


def test_server_lr_scales_the_step():
    x = torch.tensor([1.0, 1.0])
    assert torch.allclose(FedAvg(lr=1.0).step({}, x, torch.tensor([0.5, -1.0]))[1], torch.tensor([1.5, 0.0]))
    assert torch.allclose(FedAvg(lr=0.5).step({}, x, torch.tensor([0.5, -1.0]))[1], torch.tensor([1.25, 0.5]))
