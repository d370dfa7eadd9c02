"""A client built from its own data only, run in its own process: task bytes in, result bytes out, aggregated by a
server side that never sees the client's file."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fedfm.client import ClientResult, ClientTask
from fedfm.client.wire import result_from_bytes, result_to_bytes, task_from_bytes, task_to_bytes
from fedfm.errors import UpdateRejected
from tests.conftest import make_rows, write_csv


def test_messages_round_trip_and_refuse_garbage():
    task = ClientTask(client_id=3, round=7, payload=b"\x00\x01abc", seed=12345, extras={"c": b"xyz", "e": b""})
    assert task_from_bytes(task_to_bytes(task)) == task
    asks_eval = ClientTask(client_id=1, round=2, payload=b"p", seed=5, evaluate=True)  # eval.federated's request
    assert task_from_bytes(task_to_bytes(asks_eval)) == asks_eval
    res = ClientResult(client_id=3, update=b"u" * 10, num_examples=42, metrics={"train_loss": 0.5, "steps": 2},
                       extras={"delta_c": b"dc"})
    assert result_from_bytes(result_to_bytes(res)) == res
    err = ClientResult(client_id=1, error="dropped out", crashed=True)
    assert result_from_bytes(result_to_bytes(err)) == err
    with pytest.raises(UpdateRejected, match="not a fedfm result message"):
        result_from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def test_a_client_in_its_own_process_given_only_its_own_file(tiny_config, tmp_path):
    from fedfm.data.sources import load_examples
    from fedfm.models import build_model
    from fedfm.server import Server

    rows = make_rows(n=240, seed=3, sites=3)  # every site holds every label
    own = write_csv(tmp_path / "site0.csv", [r for r in rows if r["site"] == "site0"])  # the client's file
    held = write_csv(tmp_path / "server_held_out.csv", [r for r in rows if r["site"] == "site1"])  # the server's
    cfg = tiny_config(**{"data.source": str(held), "federation.clients_per_round": 1, "federation.min_clients": 1,
                         "partition.num_clients": 1})
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(cfg.to_yaml())

    # the server side: its own model (for the layout and the initial state), built from its own held-out file
    bundle = build_model(cfg, load_examples(cfg.data, needs_labels=True, seed=cfg.federation.seed))
    server = Server(cfg, bundle.spec.layout(), bundle.spec.flat(), client_sizes=np.array([80]))
    payload, extras = server.broadcast(1, 0)
    task = ClientTask(client_id=0, round=1, payload=payload, extras=extras, seed=server.random.seed("client_task", 1, 0))
    (tmp_path / "task.bin").write_bytes(task_to_bytes(task))

    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from fedfm.config import load_config
        from fedfm.client.party import Client

        cfg = load_config({str(cfg_path)!r})
        client = Client.from_config(cfg, {str(own)!r}, client_id=0)
        Path({str(tmp_path / "result.bin")!r}).write_bytes(client.handle(Path({str(tmp_path / "task.bin")!r}).read_bytes()))
        print(sorted(m for m in sys.modules if m in ("fedfm.simulation", "fedfm.server")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"  # the client process never loads the server side
    result = result_from_bytes((tmp_path / "result.bin").read_bytes())
    assert result.error is None, result.error
    n_own = sum(r["site"] == "site0" for r in rows)
    local_test = int(round(cfg.partition.local_test_fraction * n_own))
    assert result.num_examples == n_own - local_test  # it trained on its own rows, its local test split kept apart
    assert result.metrics["steps"] >= 1

    before = server.global_flat.clone()
    row = server.aggregate_results(1, [result])
    assert row["aggregated"] is True and row["dropped"] == []
    delta = server.global_flat - before
    assert float(delta.norm()) > 0
    decoded = server.spec.flatten(server.codec.decode(result.update, server.spec))
    torch.testing.assert_close(delta, decoded)  # one client, FedAvg, server lr 1: the global moves by its update


def _party_setup(tiny_config, tmp_path, **over):
    from fedfm.data.sources import load_examples
    from fedfm.models import build_model
    from fedfm.server import Server

    rows = make_rows(n=160, seed=4, sites=2)
    own = write_csv(tmp_path / "site0.csv", [r for r in rows if r["site"] == "site0"])
    held = write_csv(tmp_path / "held.csv", [r for r in rows if r["site"] == "site1"])
    cfg = tiny_config(**{"data.source": str(held), "federation.clients_per_round": 1, "federation.min_clients": 1,
                         "partition.num_clients": 1, **over})
    bundle = build_model(cfg, load_examples(cfg.data, needs_labels=True, seed=cfg.federation.seed))
    server = Server(cfg, bundle.spec.layout(), bundle.spec.flat(), client_sizes=np.array([64]))
    return cfg, own, server


def _task(server, rnd: int) -> bytes:
    payload, extras = server.broadcast(rnd, 0)
    return task_to_bytes(ClientTask(client_id=0, round=rnd, payload=payload, extras=extras,
                                    seed=server.random.seed("client_task", rnd, 0)))


def _sent(result: bytes):
    """What a result carries but its wall time."""
    r = result_from_bytes(result)
    return r.update, r.extras, r.num_examples, {k: v for k, v in r.metrics.items() if k != "seconds"}


@pytest.mark.parametrize("over", [{"client.algorithm": "scaffold", "client.optimizer": "sgd"},
                                  {"codec.name": "topk", "codec.fraction": 0.05, "codec.values": "int8"}],
                         ids=["scaffold-c_i", "topk-error-feedback-residual"])
def test_a_client_that_lives_one_task_keeps_its_state_across_rounds_in_its_state_dir(tiny_config, tmp_path, over):
    """SCAFFOLD's c_i, top-k's error-feedback residual: a new Client per round (a Flower ClientApp's process per
    message) with a state directory sends what one long-lived client sends; a round asked again (a resumed server)
    is answered as the first time."""
    from fedfm.client.party import Client

    cfg, own, server = _party_setup(tiny_config, tmp_path, **over)
    long_lived = Client.from_config(cfg, own, client_id=0)
    sent, tasks = {}, {}
    for rnd in (1, 2):
        task = tasks[rnd] = _task(server, rnd)
        one = Client.from_config(cfg, own, client_id=0, state_dir=tmp_path / "state").handle(task)
        assert _sent(one) == _sent(long_lived.handle(task)), rnd  # byte for byte, c_i included
        sent[rnd] = one
        server.aggregate_results(rnd, [result_from_bytes(one)])
    assert sorted(p.name for p in (tmp_path / "state").glob("manifest.*")) == ["manifest.r000001.json",
                                                                               "manifest.r000002.json"]
    # the same task again (a server resumed from round 1's checkpoint sends it): c_i is read as round 1 left it
    again = Client.from_config(cfg, own, client_id=0, state_dir=tmp_path / "state").handle(tasks[2])
    assert _sent(again) == _sent(sent[2])


def test_sample_level_dp_in_a_client_of_its_own_accounts_across_rounds(tiny_config, tmp_path):
    from fedfm.client.party import Client

    cfg, own, server = _party_setup(tiny_config, tmp_path, **{"privacy.mode": "sample", "privacy.noise_multiplier": 1.0,
                                                              "privacy.clip": 1.0})
    with pytest.raises(Exception, match="state directory"):
        Client.from_config(cfg, own, client_id=0)
    got = []
    for rnd in (1, 2):
        res = result_from_bytes(Client.from_config(cfg, own, client_id=0, state_dir=tmp_path / "s").handle(
            _task(server, rnd)))
        assert res.error is None, res.error
        assert set(res.metrics) == {"dp_steps", "dp_epsilon"}  # all a DP-SGD client tells
        got.append(res.metrics)
        server.aggregate_results(rnd, [res])
    assert got[1]["dp_steps"] == 2 * got[0]["dp_steps"] > 0  # its accountant went on from where it was
    assert got[1]["dp_epsilon"] > got[0]["dp_epsilon"] > 0
