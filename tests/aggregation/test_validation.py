"""Every client update is validated before it touches the aggregate: a bad one is dropped with its reason in the
round's metrics and the aggregate is exactly that of the good ones."""
from __future__ import annotations

import json

import torch

from fedfm.client import ClientResult
from fedfm.simulation import Simulation, prepare
from fedfm.tracking import RunDir

BAD = ["wrong name", "wrong shape", "nan", "inf", "huge norm", "truncated bytes"]


def _corrupt(server, res: ClientResult, kind: str) -> ClientResult:
    codec = server.codec
    if kind == "truncated bytes":
        return ClientResult(res.client_id, res.update[: len(res.update) // 2], res.num_examples, res.metrics)
    st = dict(codec.decode(res.update, server.spec))
    name = next(iter(st))
    if kind == "wrong name":
        st["evil." + name] = st.pop(name)
    elif kind == "wrong shape":
        st[name] = torch.zeros(st[name].numel() + 1)
    elif kind == "nan":
        st[name] = st[name].clone()
        st[name].view(-1)[0] = float("nan")
    elif kind == "inf":
        st[name] = st[name].clone()
        st[name].view(-1)[0] = float("inf")
    elif kind == "huge norm":
        st[name] = st[name] * 0 + 1e6
    return ClientResult(res.client_id, codec.encode(st), res.num_examples, res.metrics)


def test_each_kind_of_bad_update_is_dropped_and_the_aggregate_is_that_of_the_good_ones(tiny_config, tmp_path):
    n = len(BAD) + 2
    cfg = tiny_config(**{"partition.num_clients": n, "federation.clients_per_round": n, "federation.rounds": 1,
                         "federation.min_clients": 2, "server.max_update_norm": 1e3, "eval.every": 0})
    run_dir = RunDir(tmp_path / "run")
    run_dir.create(overwrite=False)
    server = Simulation(prepare(cfg), run_dir)
    real = server.runtime.client_fn
    good: dict[int, tuple[torch.Tensor, int]] = {}
    kinds: dict[int, str] = {}

    def client(task):
        res = real(task)
        if task.client_id < len(BAD):
            kinds[task.client_id] = BAD[task.client_id]
            return _corrupt(server, res, BAD[task.client_id])
        good[task.client_id] = (server.server.check(res)[0], res.num_examples)
        return res

    server.runtime.client_fn = client
    x0 = server.global_flat.clone()
    server.run()
    row = json.loads((run_dir.path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["aggregated"] is True
    reasons = {d["id"]: d["error"] for d in row["dropped"]}
    assert set(reasons) == set(kinds)  # every bad one dropped, no good one
    assert "names" in reasons[BAD.index("wrong name")] or "missing" in reasons[BAD.index("wrong name")]
    assert "shape" in reasons[BAD.index("wrong shape")]
    assert "non-finite" in reasons[BAD.index("nan")] and "non-finite" in reasons[BAD.index("inf")]
    assert "max_update_norm" in reasons[BAD.index("huge norm")]
    assert "undecodable" in reasons[BAD.index("truncated bytes")]
    deltas = torch.stack([d for d, _ in good.values()])
    w = torch.tensor([float(k) for _, k in good.values()])
    expected = x0 + (w / w.sum()) @ deltas
    assert torch.allclose(server.global_flat, expected, atol=1e-7)
