"""A deployment survives a SuperNode that dies mid-round: the round goes on with the others, the dead node's client
is dropped naming its SuperNode, and later rounds sample only the clients still connected."""
import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from fedfm.config import load_config
from fedfm.deploy.local import LocalFederation
from fedfm.errors import FedfmError
from tests.conftest import make_rows, tiny_overrides, write_csv


def _clientapps(proc) -> list[psutil.Process]:
    """The ClientApp processes a SuperNode started (its children running ``flwr-clientapp``)."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if any("clientapp" in part for part in k.cmdline()):
                out.append(k)
        except psutil.Error:
            pass
    return out


def test_a_supernode_killed_mid_round_is_dropped_and_not_sampled_again(tmp_path):
    rows = make_rows(n=240, seed=3, sites=3)
    sites = []
    for i in range(3):
        mine = [r for r in rows if r["site"] == f"site{i}"]
        org = tmp_path / f"org{i}"
        org.mkdir()
        sites.append((write_csv(org / "train.csv", mine[:-16]), write_csv(org / "test.csv", mine[-16:])))
    cfg = load_config("bbc-lora", tiny_overrides(tmp_path / "no-data-here.csv", tmp_path, **{
        "partition.num_clients": 3, "federation.clients_per_round": 3, "federation.min_clients": 2,
        "federation.rounds": 3, "runtime.connect_timeout_s": 120, "runtime.worker_timeout_s": 75}))
    victim = 2
    with LocalFederation(tmp_path / "flower", secure=False) as fed:
        fed.start_superlink()
        nodes = [fed.start_supernode(f"site{i}", train, test, client_id=i) for i, (train, test) in enumerate(sites)]
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(status=fed.run(cfg.to_yaml(), timeout_s=400)),
                                  daemon=True)
        t0 = time.monotonic()
        runner.start()
        run_log = fed.work / "run.log"
        # the clients joined (their query ClientApps have come and gone) ...
        while "clients:" not in (run_log.read_text() if run_log.exists() else "") and time.monotonic() - t0 < 200:
            time.sleep(0.2)
        joined = time.monotonic() - t0
        # ... then round 1's task reaches the victim: its ClientApp starts training; kill the SuperNode and it
        while not _clientapps(nodes[victim]) and time.monotonic() - t0 < 200:
            time.sleep(0.1)
        seen = bool(_clientapps(nodes[victim]))
        time.sleep(1.0)  # well inside the round: the ClientApp is loading its model and data
        killed = time.monotonic() - t0
        fed.kill(nodes[victim])
        runner.join(timeout=400)
        took = time.monotonic() - t0
        log = run_log.read_text()
        print(f"joined {joined:.1f}s, killed {killed:.1f}s (ClientApp seen: {seen}), run ended {took:.1f}s")
        assert seen, log[-3000:]
        assert outcome.get("status") == "finished:completed", log[-3000:]

    metrics = [json.loads(x) for x in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in metrics] == [1, 2, 3]
    first = metrics[0]
    print("round 1 dropped:", first["dropped"], "wall_s", first.get("wall_s"))
    assert sorted(first["clients"]) == [0, 1, 2]
    assert [d["id"] for d in first["dropped"]] == [victim]
    assert "SuperNode" in first["dropped"][0]["error"], first["dropped"][0]
    assert first["aggregated"] is True and first["fed_clients"] == 2
    for r in metrics[1:]:
        assert sorted(r["clients"]) == [0, 1] and r["dropped"] == [] and r["aggregated"] is True


def test_the_superlinks_node_unavailable_reply_drops_the_dead_nodes_client(tiny_config):
    """Flower's SuperLink answers for a node whose heartbeat stopped: an error reply from the SuperLink's own node id
    (not the dead node's) to the message sent to it; the client is matched by the message it answers."""
    from types import SimpleNamespace as NS

    from fedfm.client import ClientTask
    from fedfm.deploy.flower import FlowerRuntime

    class Grid:
        def get_node_ids(self):
            return [11]  # node 22 is offline now

        def send_and_receive(self, messages, timeout=None):
            for i, m in enumerate(messages):
                m.metadata.message_id = f"m{i}"  # as pushing sets it
            # node 11 never answers within the timeout; the SuperLink (node id 0) answers for node 22
            return [NS(metadata=NS(src_node_id=0, reply_to_message_id="m1"), has_error=lambda: True,
                       error=NS(code=5, reason="Error: Node Unavailable"))]

    rt = FlowerRuntime(Grid(), tiny_config(**{"runtime.worker_timeout_s": 1}))
    rt._message = lambda node, kind, fields: NS(metadata=NS(dst_node_id=node, message_id=""))
    rt.node_of = {0: 11, 1: 22}
    out = rt.run([ClientTask(client_id=c, round=1, payload=b"", seed=0) for c in (0, 1)])
    assert out[0].error == "SuperNode 11 (client 0) did not answer within runtime.worker_timeout_s=1"
    assert out[1].error == "SuperNode 22: Error: Node Unavailable" and out[1].crashed
    # 11 lost (it did not answer), 22 no longer connected: no round can aggregate federation.min_clients=1
    with pytest.raises(FedfmError, match=r"only 0 of 2 clients' SuperNodes are connected \(clients \[0, 1\] lost\), "
                                         r"fewer than federation.min_clients=1"):
        rt.reachable()
