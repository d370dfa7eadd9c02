"""SecAgg+ in a deployment: each client's protocol party runs in its own ClientApp (train.secagg), its update never
leaves it unmasked, and the server side unmasks only the sum. The Flower messages here go through an in-process grid
that hands each one to fedfm's ClientApp with that node's own node config, as a SuperNode would, and records what
comes back to the server side."""

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict

from fedfm.client.wire import result_from_bytes
from fedfm.config import load_config
from fedfm.deploy.flower import RECORD, client_app, serve
from fedfm.privacy import secagg as sa
from fedfm.privacy.secure import SecureClient
from tests.conftest import make_rows, tiny_overrides, write_csv


@pytest.fixture(autouse=True)
def _flower_task(monkeypatch):
    """What Flower sets in a ServerApp's process before it runs (messages are made with the run's id)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class InProcessGrid:
    """Each message to node n answered by fedfm's ClientApp run with node n's node config; every reply kept."""

    def __init__(self, node_configs: dict[int, dict]):
        self.node_configs, self.replies = node_configs, []

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(),
                          run_config={})
            try:
                reply = client_app(message=m, context=ctx)
            except Exception as e:  # as Flower's ClientApp runner answers for a ClientApp that raised
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            self.replies.append((m.metadata.message_type, node, reply))
            out.append(reply)
        return out


def site_nodes(tmp_path, rows: list[dict], count: int, first_node: int) -> dict[int, dict]:
    """Node configs of ``count`` organisations, each with its own site's rows in its own folder (org<i>/train.csv)
    and its own state folder: node ``first_node + i`` is client i."""
    nodes = {}
    for i in range(count):
        org = tmp_path / f"org{i}"
        org.mkdir()
        mine = [r for r in rows if r["site"] == f"site{i}"]
        nodes[first_node + i] = {"data": str(write_csv(org / "train.csv", mine)), "client-id": i,
                                 "state-dir": str(org / "state")}
    return nodes


@pytest.mark.parametrize("privacy", ["none", "client"])
def test_what_the_server_side_receives_from_each_client_is_masked(tmp_path, monkeypatch, privacy):
    rows = make_rows(n=180, seed=7, sites=3)
    nodes = {}
    for i in range(3):
        mine = [r for r in rows if r["site"] == f"site{i}"]
        org = tmp_path / f"org{i}"
        org.mkdir()
        nodes[100 + i] = {"data": str(write_csv(org / "train.csv", mine[:-12])),
                          "test-data": str(write_csv(org / "test.csv", mine[-12:])), "client-id": i,
                          "state-dir": str(org / "state")}
    extra = {"privacy.mode": "client", "privacy.noise_multiplier": 0.5, "privacy.clip": 1.0} if privacy == "client" \
        else {}
    cfg = load_config("bbc-lora", tiny_overrides(tmp_path / "no-data.csv", tmp_path, **{
        "partition.num_clients": 3, "federation.clients_per_round": 3, "federation.rounds": 2,
        "secagg.enabled": True, **extra}))

    truth: dict[int, list[np.ndarray]] = {}  # each client's ring vector before masking, seen inside its own party
    real = SecureClient.contribution

    def spy(self, flat, num_examples, seed):
        x = real(self, flat, num_examples, seed)
        truth.setdefault(self.party.u, []).append(x.copy())
        return x

    monkeypatch.setattr(SecureClient, "contribution", spy)
    grid = InProcessGrid(nodes)
    rows_out = serve(grid, {"fedfm-config": cfg.to_yaml()})

    assert [r["round"] for r in rows_out] == [1, 2]
    for r in rows_out:
        assert r["aggregated"] and r["secagg_included"] == 3 and r["dropped"] == []
    # the training replies carry no update: it stayed with its client until masked
    trained = [result_from_bytes(bytes(rep.content[RECORD]["result"])) for kind, _, rep in grid.replies
               if kind == "train"]
    assert len(trained) == 6 and all(t.update == b"" and t.error is None for t in trained)
    # each masked input is nothing like the client's input: the masks cover every coordinate
    masked = [(node, sa.MaskedInput.from_bytes(bytes(rep.content[RECORD]["body"]))) for kind, node, rep in grid.replies
              if kind == "train.secagg" and rep.content[RECORD] and "body" in rep.content[RECORD]
              and _is_masked_input(rep)]
    assert len(masked) == 6
    for node, m in masked:
        x = truth[m.u].pop(0)
        y = sa.from_bytes(m.y, 32, len(x))
        assert np.mean(y == x) < 0.01
    # and the secrets each client kept between phases are gone once its round is over
    for i in range(3):
        left = [p.name for p in (tmp_path / f"org{i}" / "state").rglob("*") if "secagg" in str(p) and p.is_file()]
        assert left == [], left


def _is_masked_input(reply) -> bool:
    try:
        sa.MaskedInput.from_bytes(bytes(reply.content[RECORD]["body"]))
        return True
    except Exception:
        return False


def test_a_client_that_fails_after_sharing_its_keys_drops_out_and_the_others_are_summed(tmp_path):
    """A client that advertised and shared its keys but could not train (its file is gone) sends no masked input;
    the round unmasks the sum of the other clients' (its neighbours reveal its pairwise masks), as SecAgg+ allows."""
    nodes = site_nodes(tmp_path, make_rows(n=200, seed=8, sites=5), 5, first_node=7)
    cfg = load_config("bbc-lora", tiny_overrides(tmp_path / "no-data.csv", tmp_path, **{
        "partition.num_clients": 5, "federation.clients_per_round": 5, "federation.min_clients": 2,
        "federation.rounds": 1, "secagg.enabled": True}))

    class Failing(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            if messages and messages[0].metadata.message_type == "train":  # site 4's disk fails after joining
                (tmp_path / "org4" / "train.csv").unlink(missing_ok=True)
            return super().send_and_receive(messages, timeout)

    row = serve(Failing(nodes), {"fedfm-config": cfg.to_yaml()})[0]
    assert row["aggregated"] is True and row["secagg_included"] == 4, row.get("secagg_error")
    assert [d["id"] for d in row["dropped"]] == [4] and "train.csv" in row["dropped"][0]["error"]
