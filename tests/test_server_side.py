"""The server side alone: built from a config and the layout of the shared state, stepped with encoded results,
with no client data (no FederatedData, no examples, no model) anywhere in reach."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fedfm.client import ClientResult
from fedfm.compression import make_codec
from fedfm.models.state import Layout
from fedfm.server import Server

LAYOUT = Layout({"lora_A.weight": (2, 3), "classifier.bias": (4,)})


def _reachable(root, limit: int = 100_000) -> list:
    """Every object reachable from ``root`` through attributes, dict values, list/tuple/set items (not into tensors
    or modules' internals: a module met is itself reported)."""
    seen, todo, out = set(), [root], []
    while todo and len(seen) < limit:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.Tensor, np.ndarray)):
            continue
        seen.add(id(obj))
        out.append(obj)
        if isinstance(obj, torch.nn.Module):
            continue
        if isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            todo.extend(vars(obj).values())
    return out


def _result(cid: int, delta: torch.Tensor, n: int, codec_name: str = "fp32") -> ClientResult:
    return ClientResult(client_id=cid, update=make_codec(codec_name).encode(LAYOUT.unflatten(delta)), num_examples=n)


def test_server_steps_from_encoded_results_alone(tiny_config):
    cfg = tiny_config(**{"federation.clients_per_round": 3, "federation.min_clients": 2})
    x0 = torch.linspace(-1, 1, LAYOUT.numel)
    server = Server(cfg, LAYOUT, x0, client_sizes=np.array([10, 30, 20, 40]))
    d = [torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    bad = ClientResult(client_id=2, update=b"not a state", num_examples=20)
    row = server.aggregate_results(1, [_result(0, d[0], 10), _result(1, d[1], 30), bad])
    assert row["aggregated"] is True
    assert [x["id"] for x in row["dropped"]] == [2]
    expected = x0 + (10 * d[0] + 30 * d[1]) / 40  # FedAvg of the two usable updates, server lr 1
    torch.testing.assert_close(server.global_flat, expected)
    # what the next round broadcasts is the new state, as bytes a client decodes
    payload, extras = server.broadcast(2, 0)
    torch.testing.assert_close(LAYOUT.flatten(server.codec.decode(payload, LAYOUT)), expected)
    assert extras == {}
    # the checkpoint names the layout and holds the state; a new server resumes from it
    ck = server.checkpoint_state(1)
    again = Server(cfg, LAYOUT, x0, client_sizes=np.array([10, 30, 20, 40]))
    again.load_checkpoint_state(ck)
    torch.testing.assert_close(again.global_flat, expected)
    assert again.start_round == 2


@pytest.mark.parametrize("over", [
    {"privacy.mode": "client", "privacy.noise_multiplier": 1.0, "secagg.enabled": True},
    {"client.algorithm": "scaffold", "client.optimizer": "sgd", "server.optimizer": "fedadam"},
], ids=["dp-secagg", "scaffold-fedadam"])
def test_no_client_data_and_no_model_is_in_reach_of_the_server(tiny_config, over):
    from fedfm.client.data import LocalData
    from fedfm.data import ClientData, FederatedData
    from fedfm.data.sources import Examples

    cfg = tiny_config(**{"federation.clients_per_round": 2, **over})
    server = Server(cfg, LAYOUT, torch.zeros(LAYOUT.numel), client_sizes=np.array([10, 30, 20, 40]))
    server.aggregate_results(1, [_result(0, torch.ones(LAYOUT.numel), 10), _result(1, torch.ones(LAYOUT.numel), 30)])
    found = [type(o).__name__ for o in _reachable(server)
             if isinstance(o, (FederatedData, ClientData, LocalData, Examples, torch.nn.Module))]
    assert found == []
    assert len(_reachable(server)) > 20  # the walk did go through the server's parts


def test_too_few_usable_results_leave_the_state_unchanged(tiny_config):
    cfg = tiny_config(**{"federation.clients_per_round": 3, "federation.min_clients": 2})
    x0 = torch.zeros(LAYOUT.numel)
    server = Server(cfg, LAYOUT, x0, client_sizes=np.ones(4, dtype=int))
    row = server.aggregate_results(1, [_result(0, torch.ones(LAYOUT.numel), 5),
                                       ClientResult(client_id=1, error="dropped out")])
    assert row["aggregated"] is False and torch.equal(server.global_flat, x0)


def test_nothing_of_the_clients_side_is_imported(tiny_config, tmp_path):
    """In a fresh interpreter, importing and stepping the server side loads no data, task, model-loading or
    simulation module (beyond what validating the config itself asked the registries for)."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(tiny_config(**{"federation.clients_per_round": 2, "federation.min_clients": 1}).to_yaml())
    script = textwrap.dedent(f"""
        import sys
        import numpy as np, torch
        from fedfm.config import load_config

        cfg = load_config({str(cfg_path)!r})  # validating a config asks the registries (tasks, partitioners)
        before = set(sys.modules)
        from fedfm.client import ClientResult
        from fedfm.models.state import Layout
        from fedfm.server import Server

        layout = Layout({{"w": (3,)}})
        server = Server(cfg, layout, torch.zeros(3), client_sizes=np.array([4, 4]))
        upd = server.codec.encode(layout.unflatten(torch.tensor([1.0, 2.0, 3.0])))
        row = server.aggregate_results(1, [ClientResult(client_id=0, update=upd, num_examples=4)])
        assert row["aggregated"], row
        print(server.global_flat.tolist())
        loaded = sorted(m for m in set(sys.modules) - before
                        if m.startswith(("fedfm.data", "fedfm.simulation", "fedfm.tasks", "fedfm.models.loader",
                                         "fedfm.models.adapters", "transformers", "peft")))
        print(loaded)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "[1.0, 2.0, 3.0]"
    assert lines[-1] == "[]"


@pytest.mark.parametrize("codec_name", ["fp16"])
def test_results_are_decoded_with_the_configured_codec(tiny_config, codec_name):
    cfg = tiny_config(**{"codec.name": codec_name, "federation.clients_per_round": 1, "federation.min_clients": 1})
    server = Server(cfg, LAYOUT, torch.zeros(LAYOUT.numel), client_sizes=np.array([3, 3, 3, 3]))
    delta = torch.full((LAYOUT.numel,), 0.5)
    server.aggregate_results(1, [_result(3, delta, 3, codec_name)])
    torch.testing.assert_close(server.global_flat, delta)
