"""The composition matrix: every pair of registered choices (client algorithm × aggregator × server optimizer ×
schedule × privacy mode × secure aggregation × codec × adapter method) is covered by a configuration that runs two
rounds on a tiny model keeping the invariants of its choices, or refused at config time with its reason; the docs
show the matrix as it is."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from fedfm import composition
from fedfm.compression.feedback import RESIDUAL
from fedfm.config import load_config
from fedfm.hetero import HeteroSimulation, prepare_transfer
from fedfm.simulation import Simulation, prepare
from tests.conftest import make_rows, tiny_overrides, write_csv

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
BASE = {"partition.num_clients": 4, "federation.clients_per_round": 4, "federation.min_clients": 2,
        "client.steps": 1, "client.epochs": None, "federation.rounds": 2, "eval.every": 2, "eval.per_client": False,
        "eval.max_examples": 32}
SHARDS = 8
_MATRIX: dict = {}


def _service():
    """The owner's forward-only service on the tiny model, in its own process (black-box tuning), started once."""
    if "service" not in _MATRIX:
        from fedfm.ownership.blackbox import start_service
        from tests.conftest import TINY_BERT

        _MATRIX["service"] = start_service({"from_config": TINY_BERT, "tokenizer": "minilm", "name_or_path": None},
                                           300, threads=1)
    return _MATRIX["service"]


def _setup(tmp_path_factory):
    if not _MATRIX:
        tmp = tmp_path_factory.mktemp("composition")
        csv = write_csv(tmp / "tiny.csv", make_rows())

        def make(ov):
            ov = {**BASE, **ov}
            if ov.get("client.algorithm") == "fedbpt":  # one inference service for every black-box run
                ov["blackbox.service"] = _service().address
            return load_config("bbc-lora", tiny_overrides(csv, tmp, **ov))

        _MATRIX.update(make=make, matrix=composition.build(make))
    return _MATRIX["make"], _MATRIX["matrix"]


def test_every_allowed_pair_is_covered_and_every_refused_one_names_its_reason(tmp_path_factory):
    import itertools

    _, m = _setup(tmp_path_factory)
    keys = list(composition.axes())
    covered = {((a, c[a]), (b, c[b])) for c in m.configs for a, b in itertools.combinations(keys, 2)}
    assert set(m.allowed) <= covered
    n_pairs = sum(len(composition.axes()[a]) * len(composition.axes()[b]) for a, b in itertools.combinations(keys, 2))
    assert len(m.allowed) + len(m.refused) == n_pairs
    for pair, reason in m.refused.items():
        assert re.search(r"[a-z_]+\.[a-z_]+", reason), (pair, reason)  # each error names the config key
    assert len(m.configs) < len(m.allowed) / 4  # the covering design keeps the runs few


def test_the_docs_show_the_matrix(tmp_path_factory):
    _, m = _setup(tmp_path_factory)
    text = DOC.read_text()
    begin, end = "<!-- composition-matrix -->", "<!-- /composition-matrix -->"
    want = "\n" + composition.render(m) + "\n"
    if os.environ.get("FEDFM_WRITE_DOCS"):  # FEDFM_WRITE_DOCS=1 pytest tests/test_composition.py -k docs
        head, rest = text.split(begin)
        DOC.write_text(head + begin + want + end + rest.split(end, 1)[1])
        text = DOC.read_text()
    assert text.split(begin)[1].split(end)[0] == want


def _invariants(server, rows, c: dict) -> None:
    """What every run and each of its choices must keep."""
    assert rows and any(r.get("aggregated") for r in rows if r["round"] > 0), rows
    for r in rows:
        for k in ("train_loss", "eval_loss"):
            if k in r:
                assert math.isfinite(r[k]), (k, r[k])
    assert torch.isfinite(server.global_flat).all()
    trained = [r for r in rows if r["round"] > 0]
    if c["privacy.mode"] == "client":
        eps = [r["epsilon"] for r in trained]
        assert eps == sorted(eps) and eps[0] > 0 and all("dp_clipped_fraction" not in r for r in trained)
    if c["privacy.mode"] == "sample":
        assert trained[-1]["epsilon"] > 0 and "train_loss" not in trained[-1]
    if c["secagg.enabled"]:
        assert all("secagg_clients" in r for r in trained)
    if c["federation.schedule"] == "fedbuff":
        assert all(len(r["staleness"]) == 2 for r in trained)
    if c["client.algorithm"] == "scaffold":
        assert float(server.server.algo_server.c.abs().sum()) > 0
    if c["client.algorithm"] == "fedbpt":  # each client's calls, counted by the service
        assert all(r["api_calls"] and min(r["api_calls"].values()) >= 2 for r in trained if r["aggregated"])
    if c["client.algorithm"] == "split":  # activations up, gradients down, counted in the round's bytes
        assert all(0 < r["split_bytes_up"] <= r["bytes_up"] and r["split_bytes_down"] > 0 for r in trained)
    if c["client.algorithm"] == "offsite":  # the emulator sent once; the full model with the adapter scored
        assert trained[0]["emulator_bytes_down"] > 0 and all("plugged_loss" in r for r in rows if "eval_loss" in r)
    if c["server.aggregator"] in ("hetlora", "flexlora"):
        assert server.ranks is not None and set(server.ranks.tolist()) <= {2, 4}
    if c["adapter.method"] == "fedsa-lora":
        assert server.personal.names  # the B factors stay on the clients
    if c["server.optimizer"] != "fedavg":
        assert server.server.chain_state["optimizer"]  # its moments or momentum, checkpointed
    down = server.downlink  # the broadcast: codec.name, or fp32 under a sparse codec (it sends changes, not states)
    assert down.name == (c["codec.name"] if down.carries_state and server.codec.carries_state else "fp32")
    payload = down.encode(server.spec.unflatten(server.global_flat), torch.Generator().manual_seed(0))
    per_value = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}[down.name]
    assert per_value * server.spec.numel <= len(payload) < (per_value + 1) * server.spec.numel + 4096
    if not server.codec.carries_state:  # a sparse codec: each client that trained keeps what it did not send
        assert any(RESIDUAL in (server.store.get(cid) or {}) for cid in range(4))


def _fedmd_invariants(sim, rows, c: dict) -> None:
    """fedmd: logits of the public set go up (exactly P × C values of the codec's cast per client) and come back
    from round 2; the server's foundation model stays finite."""
    per_value = {"fp32": 4, "fp16": 2, "bf16": 2}[c["codec.name"]]
    P, C = len(sim.data.public), sim.num_classes
    trained = [r for r in rows if r["round"] > 0]
    assert trained and all(r["consensus_clients"] == len(r["clients"]) for r in trained), rows
    assert all(r["bytes_up"] == len(r["clients"]) * P * C * per_value for r in trained)
    assert trained[0]["bytes_down"] == 0 and all(r["bytes_down"] == len(r["clients"]) * P * C * per_value
                                                  for r in trained[1:])
    assert all(math.isfinite(r["server_kl_after"]) for r in trained) and torch.isfinite(sim.fm.state).all()


@pytest.mark.parametrize("shard", range(SHARDS))
def test_each_covering_configuration_runs_two_rounds_and_keeps_its_invariants(tmp_path_factory, shard):
    make, m = _setup(tmp_path_factory)
    failures = []
    for c in m.configs[shard::SHARDS]:
        try:
            cfg = make(composition.overrides(c))
            if c["client.algorithm"] == "fedmd":  # clients of their own models: fedfm.hetero's driver
                sim = HeteroSimulation(prepare_transfer(cfg))
                _fedmd_invariants(sim, sim.run(), c)
                continue
            server = Simulation(prepare(cfg))
            _invariants(server, server.run(), c)
        except Exception as e:  # report every failing configuration of the shard, not just the first
            failures.append(f"{c}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)
