"""HetLoRA and FlexLoRA on hand-made LoRA factors; rank views round-trip; tiers; heterogeneous ranks end to end."""
import numpy as np
import pytest
import torch

from fedfm.aggregation import RoundInfo, WeightedMean
from fedfm.aggregation.lora import FlexLoRA, HetLoRA
from fedfm.compression import make_codec
from fedfm.models.ranks import FullView, RankView, assign_ranks, lora_pairs, lora_rank
from fedfm.models.state import StateSpec


class _Lora(torch.nn.Module):
    """One LoRA module laid out and named as peft does (A: [r, in], B: [out, r]) plus a head."""

    def __init__(self, r, d_in, d_out):
        super().__init__()
        self.layer = torch.nn.Module()
        self.layer.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(d_in, r, bias=False)})
        self.layer.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(r, d_out, bias=False)})
        self.head = torch.nn.Linear(2, 1)


def _spec(r, d_in, d_out):
    return StateSpec(_Lora(r, d_in, d_out))


def _factors(spec, flat):
    st = spec.unflatten(flat)
    (a, b), = lora_pairs(spec)
    return st[a], st[b]


def test_spec_layout_is_found():
    spec = _spec(3, 3, 4)
    assert lora_rank(spec) == 3
    assert lora_pairs(spec) == [("layer.lora_A.default.weight", "layer.lora_B.default.weight")]


def test_flexlora_with_equal_full_ranks_equals_fedavg_of_the_products():
    torch.manual_seed(0)
    r, d_in, d_out = 3, 3, 4  # r = min(in, out): the SVD keeps everything
    spec = _spec(r, d_in, d_out)
    x = torch.randn(spec.numel)
    updates = torch.randn(3, spec.numel)
    weights = torch.tensor([1.0, 2.0, 5.0])
    delta = FlexLoRA()(updates, weights, RoundInfo(x=x, ranks=[r, r, r], spec=spec))
    A, B = _factors(spec, x + delta)
    p = weights / weights.sum()
    want = sum(p[k] * (_factors(spec, x + updates[k])[1] @ _factors(spec, x + updates[k])[0]) for k in range(3))
    assert torch.allclose(B @ A, want, atol=1e-5)
    head = spec.unflatten(x + delta)["head.weight"]
    assert torch.allclose(head, spec.unflatten(x + p @ updates)["head.weight"], atol=1e-6)  # FedAvg for the rest
    assert torch.allclose(A @ A.T, torch.eye(r), atol=1e-5)  # A = Vᵀ[:r]: orthonormal rows


def test_flexlora_low_rank_client_gets_the_best_rank_k_approximation():
    torch.manual_seed(1)
    spec = _spec(3, 5, 6)
    x = torch.randn(spec.numel)
    updates = torch.randn(2, spec.numel)
    delta = FlexLoRA()(updates, torch.ones(2), RoundInfo(x=x, ranks=[3, 3], spec=spec))
    A, B = _factors(spec, x + delta)
    view = RankView(spec, 1)
    cut = view.restrict(spec.unflatten(x + delta))
    (a, b), = lora_pairs(spec)
    W = sum(0.5 * (_factors(spec, x + updates[k])[1] @ _factors(spec, x + updates[k])[0]) for k in range(2))
    U, S, Vh = torch.linalg.svd(W)
    assert torch.allclose(cut[b] @ cut[a], S[0] * torch.outer(U[:, 0], Vh[0]), atol=1e-5)


def test_hetlora_with_equal_ranks_and_example_weights_equals_fedavg():
    torch.manual_seed(2)
    spec = _spec(4, 3, 5)
    x = torch.randn(spec.numel)
    updates = torch.randn(3, spec.numel)
    w = torch.tensor([3.0, 1.0, 4.0])
    delta = HetLoRA(weighting="examples")(updates, w, RoundInfo(x=x, ranks=[4, 4, 4], spec=spec))
    fedavg = WeightedMean()(updates, w)
    assert torch.allclose(delta, fedavg, atol=1e-6)


def test_hetlora_sparsity_weighted_zero_padding_by_hand():
    # r=2, in=out=1: A = [[1],[2]], B = [[3, 4]]. Client 0 has rank 1, client 1 rank 2.
    spec = _spec(2, 1, 1)
    st = spec.unflatten(torch.zeros(spec.numel))
    (a, b), = lora_pairs(spec)
    x_state = {**st, a: torch.tensor([[1.0], [2.0]]), b: torch.tensor([[3.0, 4.0]])}
    x = spec.flatten(x_state)
    d0 = spec.flatten({**st, a: torch.tensor([[0.5], [0.0]]), b: torch.tensor([[1.0, 0.0]])})
    d1 = torch.zeros(spec.numel)
    delta = HetLoRA()(torch.stack([d0, d1]), torch.tensor([1.0, 1.0]), RoundInfo(x=x, ranks=[1, 2], spec=spec))
    # client 0: A_0 = [[1.5],[0]], B_0 = [[4, 0]] -> W_0 = 6; client 1: A_1 = [[1],[2]], B_1 = [[3, 4]] -> W_1 = 11
    # p = [6/17, 11/17]; A = [20/17, 22/17]; B = [57/17, 44/17]
    A, B = _factors(spec, x + delta)
    assert torch.allclose(A.flatten(), torch.tensor([20 / 17, 22 / 17]), atol=1e-6)
    assert torch.allclose(B.flatten(), torch.tensor([57 / 17, 44 / 17]), atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_rank_views_round_trip_through_the_codec(rank):
    torch.manual_seed(3)
    spec = _spec(4, 3, 5)
    state = spec.unflatten(torch.randn(spec.numel))
    view = RankView(spec, rank)
    codec = make_codec("fp32")
    back = view.expand(codec.decode(codec.encode(view.restrict(state)), view))  # validated against the view
    (a, b), = lora_pairs(spec)
    assert back[a].shape == state[a].shape and back[b].shape == state[b].shape
    assert torch.equal(back[a][:rank], state[a][:rank]) and not back[a][rank:].any()
    assert torch.equal(back[b][:, :rank], state[b][:, :rank]) and not back[b][:, rank:].any()
    assert torch.equal(back["head.weight"], state["head.weight"])
    if rank < 4:  # a full-rank update is refused by a low-rank view
        from fedfm.errors import UpdateRejected

        with pytest.raises(UpdateRejected, match="shape"):
            codec.decode(codec.encode(state), view)
    assert FullView(spec).restrict(state) is state


def test_tiers_assign_ranks_by_fraction_reproducibly():
    r = assign_ranks({4: 0.3, 8: 0.4, 16: 0.3}, 10, seed=0)
    assert sorted(r.tolist()) == [4] * 3 + [8] * 4 + [16] * 3
    assert r.tolist() == assign_ranks({4: 0.3, 8: 0.4, 16: 0.3}, 10, seed=0).tolist()
    assert assign_ranks([2, 4, 4], 3, 0).tolist() == [2, 4, 4]
    with pytest.raises(ValueError, match="one per client"):
        assign_ranks([2, 4], 3, 0)


@pytest.mark.parametrize("aggregator", ["hetlora", "flexlora"])
def test_heterogeneous_ranks_through_the_yaml(tiny_config, aggregator):
    from fedfm.client import ClientTask
    from fedfm.simulation import Simulation, prepare

    over = {"adapter.r": 4, "federation.rounds": 2, "federation.clients_per_round": 4, "server.aggregator": aggregator}
    full = Simulation(prepare(tiny_config(**over)))
    rows_full = full.run()
    het = Simulation(prepare(tiny_config(**over, **{"adapter.rank_per_client": [1, 2, 4, 4]})))
    rows = het.run()
    assert rows[-1]["aggregated"] and np.isfinite(rows[-1]["eval_loss"])
    assert rows[-1]["bytes_up"] < rows_full[-1]["bytes_up"]  # rank-1 and rank-2 clients send less
    assert rows[-1]["bytes_down"] < rows_full[-1]["bytes_down"]
    # a rank-1 client trains only its leading component: the rest of its LoRA stays exactly zero
    payload, extras = het.broadcast(3, 0)
    res = het.client_algo(ClientTask(client_id=0, round=3, payload=payload, seed=1, extras=extras))
    assert res.error is None
    for a, b in lora_pairs(het.spec):
        assert not het.spec.params[a].detach()[1:].any() and not het.spec.params[b].detach()[:, 1:].any()
        assert het.spec.params[a].detach()[0].any()
