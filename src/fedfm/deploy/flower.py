"""fedfm as a Flower app (Message API, flwr 1.42): a ``ServerApp`` around ``Deployment`` and a ``ClientApp`` around
``client.party.Client``.

What travels is fedfm's own bytes: a task (``client.wire``, the codec's payload inside) and the run's config down, a
result (the codec's update inside) up, each in a ``ConfigRecord`` of a Flower message, counted at the message. A
SuperNode names its own data in its node config, which never leaves it:

    flower-supernode --superlink HOST:PORT ... --node-config 'data="/site/train.csv" test-data="/site/test.csv" client-id=0'

and ``fedfm deploy run CONFIG --superlink HOST:PORT`` (or ``flwr run`` on the app ``fedfm deploy app`` writes)
starts the run; the server side writes the same run directory as ``fedfm run``.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..client import ClientResult, ClientTask
from ..client.wire import result_from_bytes, task_to_bytes
from ..config import RunConfig, config_from_text
from ..display import Display
from ..errors import FedfmError, UpdateRejected
from ..runtime import Runtime
from . import Deployment, Node, assign_clients, check_config, deployment_config

RECORD = "fedfm"  # the one ConfigRecord in every fedfm message


# ---------------------------------------------------------------------------------------------- the client side
client_app = ClientApp()


def _node_settings(context: Context) -> dict[str, Any]:
    """The SuperNode's own settings (its node config): ``data`` (its training file), optionally ``test-data`` (its
    local test split), ``client-id``, ``state-dir``. Or, as Flower's simulation engine gives every virtual SuperNode,
    ``partition-id`` (with ``num-partitions``): then the client is that partition of the config's ``data.source``,
    cut as ``fedfm run`` cuts it (the same seeded ``partition.*``), and its client id is the partition id."""
    nc = dict(context.node_config)
    state_dir = str(nc["state-dir"]) if nc.get("state-dir") else None
    if not nc.get("data") and nc.get("partition-id") is not None:
        pid = int(nc["partition-id"])
        return {"partition": pid, "data": None, "test": None, "client_id": pid, "state_dir": state_dir}
    if not nc.get("data"):
        raise FedfmError("this SuperNode's node config names no data: start it with --node-config "
                         "'data=\"/path/to/train.csv\"' (and optionally test-data=\"...\" client-id=N)")
    cid = nc.get("client-id")
    return {"partition": None, "data": str(nc["data"]), "test": str(nc["test-data"]) if nc.get("test-data") else None,
            "client_id": int(cid) if cid is not None and str(cid) != "" else None, "state_dir": state_dir}


class _Partition:
    """A client of the seeded partition of the config's data (Flower's simulation engine): its examples, its own
    rows encoded, cut as a simulation cuts them."""

    def __init__(self, cfg, pid: int):
        from ..simulation import prepare

        data = prepare(cfg).data
        if not 0 <= pid < len(data.clients):
            raise FedfmError(f"partition-id {pid} is not one of the {len(data.clients)} clients (partition.num_clients)")
        self.cfg, self.data, self.client = cfg, data, data.clients[pid]

    def info(self) -> dict[str, Any]:
        ex, c = self.data.examples, self.client
        labels = sorted({ex.label_names[int(ex.labels[i])] for i in [*c.train, *c.test]}) if ex.labels is not None else []
        return {"client_id": c.id, "train_examples": int(len(c.train)), "labels": labels}

    def local(self, bundle_task):
        from ..client.data import local_data
        from ..simulation import encode

        encoded, _ = encode(self.cfg, bundle_task, self.data.examples)
        return local_data(bundle_task, encoded, self.client.train, self.client.test)


# the client this process built last: kept while the process lives (Flower's simulation engine reuses its workers;
# a SuperNode starts a process per message, so there it is built for every task)
_LAST: dict[tuple, Any] = {}


def _client(cfg_text: str, cfg, node: dict[str, Any], client_id: int, state_dir, z):
    from ..client.party import Client

    key = (cfg_text, tuple(sorted(node.items())), client_id, str(state_dir), z)
    if key not in _LAST:
        _LAST.clear()
        if node["partition"] is not None:
            from ..models import build_model

            if cfg.runtime.threads:  # as Client.from_config does
                import torch

                torch.set_num_threads(cfg.runtime.threads)

            part = _Partition(cfg, node["partition"])
            bundle = build_model(cfg, part.data.examples, public_texts=part.data.public_texts())
            _LAST[key] = Client(cfg, bundle, part.local(bundle.task), client_id, state_dir, z)
        else:
            _LAST[key] = Client.from_config(cfg, node["data"], client_id, test_source=node["test"],
                                            state_dir=state_dir, noise_multiplier=z)
    return _LAST[key]


def _state_dir(node: dict[str, Any], run: str, client_id: int):
    """Where this client keeps its state across rounds of the fedfm run ``run`` (SCAFFOLD's c_i, personal
    parameters, its DP-SGD steps): ``state-dir`` of the node config, else ``$FEDFM_CACHE/node-state``."""
    from pathlib import Path

    from ..models.loader import cache_root

    if not run.isalnum():
        raise FedfmError(f"the server's run id {run!r} is not alphanumeric")
    root = Path(node["state_dir"]) if node["state_dir"] else cache_root() / "node-state"
    return root / run / f"client_{client_id:06d}"


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Joining: this client's id (if its node config names one), its training example count and the label names it
    holds; read from its own files with the run's config, no model loaded."""
    from ..client.party import own_examples

    cfg = config_from_text(str(msg.content[RECORD]["config"]), "the server's config")
    node = _node_settings(context)
    if node["partition"] is not None:
        info = _Partition(cfg, node["partition"]).info()
        return Message(RecordDict({RECORD: ConfigRecord({"info": json.dumps(info)})}), reply_to=msg)
    examples, n_test = own_examples(cfg, node["data"], node["test"])
    n = len(examples)
    train = n - n_test if n_test is not None else n - int(round(cfg.partition.local_test_fraction * n))
    labels = sorted({examples.label_names[i] for i in examples.labels}) if examples.labels is not None else []
    info = {"client_id": node["client_id"], "train_examples": int(train), "labels": labels}
    return Message(RecordDict({RECORD: ConfigRecord({"info": json.dumps(info)})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round's task: the base and this client's own data loaded, the task run, the result's bytes sent back."""
    from ..client.wire import task_from_bytes

    record = msg.content[RECORD]
    cfg_text = str(record["config"])
    cfg = config_from_text(cfg_text, "the server's config")
    node = _node_settings(context)
    body = bytes(record["task"])
    task = task_from_bytes(body)
    if node["client_id"] is not None and task.client_id != node["client_id"]:
        raise FedfmError(f"this SuperNode is client {node['client_id']}, the task is for client {task.client_id}")
    z = record.get("dp_noise_multiplier")
    state_dir = _state_dir(node, str(record["run"]), task.client_id)
    client = _client(cfg_text, cfg, node, task.client_id, state_dir, float(z) if z is not None else None)
    result = client.handle(body)
    if cfg.secagg.enabled:  # the update stays here, checked, until this client masks it (train.secagg)
        result = _keep_for_masking(client, result, state_dir / "secagg", task.round)
    return Message(RecordDict({RECORD: ConfigRecord({"result": result})}), reply_to=msg)


# ------------------------------------------------------------------ SecAgg+ with each party on its own machine
def _keep_for_masking(client, result_bytes: bytes, folder, rnd: int) -> bytes:
    """Under secure aggregation: check this client's own update as the server would (``UpdateCheck``), keep it on
    this machine for the masking phase, and send the result without it (metrics as ``privacy.disclose`` cut them).
    An update the check rejects is not kept: the client says why and drops out before masking."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from ..aggregation.chain import UpdateCheck
    from ..client import CLIENT_ALGORITHMS
    from ..client.wire import result_to_bytes
    from ..models.ranks import view_of

    result = result_from_bytes(result_bytes)
    if result.error is not None:
        return result_bytes
    ctx, layout = client.ctx, client.ctx.spec.layout()
    check = UpdateCheck(ctx.codec, layout, lambda cid: view_of(layout, ctx.ranks, cid), ctx.cfg.server.max_update_norm,
                        CLIENT_ALGORITHMS.get(ctx.cfg.client.algorithm).extra_names, ctx.cfg.client.algorithm)
    try:
        flat, _ = check(result)
    except Exception as e:
        return result_to_bytes(dataclasses.replace(result, update=b"", error=f"rejected by the client before "
                                                                             f"masking: {e}"))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"flat": flat.contiguous(), "num_examples": torch.tensor([result.num_examples], dtype=torch.float64)},
              str(folder / f"update.r{rnd:06d}.safetensors"))
    return result_to_bytes(dataclasses.replace(result, update=b""))


def _secagg_round(record) -> tuple[Any, Any]:
    """The round's SecAgg+ configuration (roster, graph, ring) as the server sent it, and the ring codec."""
    from ..privacy.secagg import RingCodec, SecAggConfig

    clients = tuple(json.loads(str(record["clients"])))
    config = SecAggConfig(clients, int(record["dim"]), int(record["k"]), int(record["t"]), int(record["bits"]),
                          int(str(record["graph_seed"])), bytes(record["session"]))
    return config, RingCodec.for_sum(float(record["ring_clip"]), len(clients), int(record["bits"]))


@client_app.train("secagg")
def secagg(msg: Message, context: Context) -> Message:
    """One phase of SecAgg+ (Bell et al. 2020) for this client's party: advertise its keys, share them, mask its
    kept update, help unmask the sum. Its secrets live on this machine between phases (0600) and are deleted when
    the round's unmasking is done; the server side gets protocol messages only."""
    import os

    from safetensors.torch import load_file

    from ..privacy import secagg as sa
    from ..privacy.secure import SecureClient
    from ..randomness import Randomness

    record = msg.content[RECORD]
    cfg = config_from_text(str(record["config"]), "the server's config")
    node = _node_settings(context)
    cid, rnd, phase = int(record["client_id"]), int(record["round"]), str(record["phase"])
    if node["client_id"] is not None and cid != node["client_id"]:
        raise FedfmError(f"this SuperNode is client {node['client_id']}, the message is for client {cid}")
    folder = _state_dir(node, str(record["run"]), cid) / "secagg"
    party_file = folder / f"party.r{rnd:06d}.json"
    config, codec = _secagg_round(record)
    body = bytes(record["body"])
    if phase == "advertise":
        party = sa.SecAggClient(cid, config)
        out = party.advertise_keys()
    else:
        if not party_file.exists():
            raise FedfmError(f"SecAgg+ {phase} for round {rnd}: this client holds no party of that round")
        party = sa.party_from_bytes(config, party_file.read_bytes())
        clip = float(record["clip"]) if float(record["clip"]) >= 0 else None
        share = float(record["noise_share"]) if float(record["noise_share"]) >= 0 else None
        secure = SecureClient(party, codec, int(record["max_examples"]), int(record["min_survivors"]), clip, share)
        if phase == "share":
            out = party.share_keys(sa.ShareKeysRequest.from_bytes(body))
        elif phase == "mask":
            kept = load_file(str(folder / f"update.r{rnd:06d}.safetensors"))
            # a noise share the server cannot redraw: drawn here, from this machine's OS (from the run's seed, as
            # in a simulation, only under privacy.randomness: seeded)
            seed = Randomness.from_config(cfg).seed("noise_share", rnd, cid)
            x = secure.contribution(kept["flat"], int(kept["num_examples"][0]), seed)
            out = party.masked_input_collection(sa.MaskingRequest.from_bytes(body), x)
        elif phase == "unmask":
            out = secure.unmasking(sa.UnmaskingRequest.from_bytes(body))
        else:
            raise FedfmError(f"SecAgg+: unknown phase {phase!r}")
    if phase == "unmask":  # the round is over for this client: its secrets and its update go
        for p in folder.glob(f"*.r{rnd:06d}.*"):
            p.unlink(missing_ok=True)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = party_file.with_name(f".{party_file.name}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(sa.party_to_bytes(party))
        os.replace(tmp, party_file)
    return Message(RecordDict({RECORD: ConfigRecord({"body": out.to_bytes()})}), reply_to=msg)


# ---------------------------------------------------------------------------------------------- the server side
class FlowerRuntime(Runtime):
    """Carries a round's tasks to the clients' SuperNodes as Flower messages and their results back. A client whose
    node does not answer within ``runtime.worker_timeout_s`` (or answers with an error) drops out of the round,
    named; its node is not sampled again. A node that dies mid-round is answered for by the SuperLink once its
    heartbeat lapses (Flower 1.42: 2 × 30 s), with a NODE_UNAVAILABLE error, and it leaves the connected nodes."""

    def __init__(self, grid: Grid, cfg: RunConfig):
        self.grid, self.cfg = grid, cfg
        self.config_text = cfg.to_yaml()
        self.run_token = ""  # the fedfm run's id: a client keeps its state under it, across a resume too
        self.extra: dict[str, Any] = {}  # more for every task (the noise multiplier the server derived)
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.lost: set[int] = set()  # nodes that did not answer
        self.counts = {"message_bytes_down": 0, "message_bytes_up": 0}

    def _message(self, node: int, kind: str, fields: dict[str, Any]) -> Message:
        return Message(RecordDict({RECORD: ConfigRecord(fields)}), dst_node_id=node, message_type=kind)

    def discover(self, say=print) -> list[Node]:
        """Wait for ``partition.num_clients`` SuperNodes (up to ``runtime.connect_timeout_s``), ask each what it
        holds, and give each its client id."""
        want, limit = self.cfg.partition.num_clients, self.cfg.runtime.connect_timeout_s
        deadline = time.monotonic() + limit
        while True:
            found = sorted(self.grid.get_node_ids())
            if len(found) >= want:
                break
            if time.monotonic() > deadline:
                raise FedfmError(f"deployment: {len(found)} of partition.num_clients={want} SuperNodes connected to "
                                 f"the SuperLink within runtime.connect_timeout_s={limit:g}")
            time.sleep(0.5)
        say(f"{len(found)} SuperNodes connected; asking each what it holds")
        replies = list(self.grid.send_and_receive(
            [self._message(n, MessageType.QUERY, {"config": self.config_text}) for n in found], timeout=limit))
        infos: dict[int, dict[str, Any]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise FedfmError(f"SuperNode {node} could not join: {reply.error.reason}")
            infos[node] = json.loads(str(reply.content[RECORD]["info"]))
        silent = [n for n in found if n not in infos]
        if silent:
            raise FedfmError(f"deployment: SuperNode(s) {silent} did not answer within runtime.connect_timeout_s="
                             f"{limit:g}")
        ids = assign_clients([(n, infos[n]["client_id"]) for n in found], want)
        unused = [n for n in found if n not in ids]
        if unused:
            say(f"SuperNode(s) {unused} not used: partition.num_clients={want} are")
        self.node_of = {cid: node for node, cid in ids.items()}
        return [Node(node_id=node, client_id=cid, train_examples=int(infos[node]["train_examples"]),
                     labels=list(infos[node]["labels"])) for node, cid in ids.items()]

    def set_config(self, cfg: RunConfig) -> None:
        """The config every client trains with (``deployment_config``: the label names settled)."""
        self.cfg, self.config_text = cfg, cfg.to_yaml()

    def reachable(self) -> list[int]:
        """The clients whose node is connected and has not been lost; fewer than ``federation.min_clients`` stops
        the run (no round could aggregate)."""
        connected = set(self.grid.get_node_ids()) - self.lost
        out = [cid for cid, node in self.node_of.items() if node in connected]
        need = self.cfg.federation.min_clients
        if len(out) < need:
            gone = sorted(cid for cid in self.node_of if cid not in out)
            raise FedfmError(f"deployment: only {len(out)} of {len(self.node_of)} clients' SuperNodes are connected "
                             f"(clients {gone} lost), fewer than federation.min_clients={need}")
        return out

    def exchange(self, kind: str, fields: dict[int, dict[str, Any]]) -> dict[int, Any]:
        """One message to each client's node (``fields`` by client id), the replies back: by client id, the reply's
        ConfigRecord, or a string saying why there is none (an error the node or the SuperLink answered with, or
        silence for ``runtime.worker_timeout_s``; a silent node is not sampled again)."""
        limit = self.cfg.runtime.worker_timeout_s
        messages = []
        for cid, f in fields.items():
            messages.append(self._message(self.node_of[cid], kind, f))
            self.counts["message_bytes_down"] += sum(len(v) for v in f.values() if isinstance(v, bytes)) + \
                sum(len(v.encode()) for v in f.values() if isinstance(v, str))
        replies = list(self.grid.send_and_receive(messages, timeout=limit))
        # a reply names the message it answers (pushing set each message's id); the SuperLink itself answers for a
        # node whose heartbeat stopped (NODE_UNAVAILABLE, sent from the SuperLink's node id, not the dead node's)
        node_of_message = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        client_of = {node: cid for cid, node in self.node_of.items() if cid in fields}
        out: dict[int, Any] = {}
        for reply in replies:
            node = node_of_message.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in client_of:
                continue
            if reply.has_error():
                out[client_of[node]] = f"SuperNode {node}: {reply.error.reason}"
            else:
                out[client_of[node]] = reply.content[RECORD]
                self.counts["message_bytes_up"] += sum(len(v) for v in out[client_of[node]].values()
                                                       if isinstance(v, bytes))
        for cid in fields:
            if cid not in out:
                self.lost.add(self.node_of[cid])
                out[cid] = (f"SuperNode {self.node_of[cid]} (client {cid}) did not answer within "
                            f"runtime.worker_timeout_s={limit:g}")
        return out

    def common(self) -> dict[str, Any]:
        """What every message of the run carries: the config, the run's id, what the server derived for all."""
        return {"config": self.config_text, "run": self.run_token, **self.extra}

    def run(self, tasks: list[ClientTask], on_result=None) -> list[ClientResult]:
        got = self.exchange(MessageType.TRAIN, {t.client_id: {"task": task_to_bytes(t), **self.common()} for t in tasks})
        out = []
        for t in tasks:
            reply = got[t.client_id]
            if isinstance(reply, str):
                res = ClientResult(client_id=t.client_id, error=reply, crashed="did not answer" not in reply)
            else:
                try:
                    res = result_from_bytes(bytes(reply["result"]))
                except UpdateRejected as e:
                    res = ClientResult(client_id=t.client_id, error=f"SuperNode {self.node_of[t.client_id]}: {e}")
            if on_result is not None:
                on_result(res)
            out.append(res)
        return out

    def take_counts(self) -> dict[str, int]:
        counts, self.counts = self.counts, {k: 0 for k in self.counts}
        return counts


class FlowerParties:
    """SecAgg+'s client parties on the clients' own SuperNodes (``SecureSum.parties`` in a deployment): each phase
    is one ``train.secagg`` message to every client of the round, carrying fedfm's protocol messages as bytes. A
    client that fails a phase is dropped, as the protocol allows; the server side sees masked inputs and their sum
    only (the updates stayed on the clients, ``_keep_for_masking``)."""

    def __init__(self, runtime: FlowerRuntime, stage, rnd, u):
        self.runtime, self.stage, self.u = runtime, stage, u
        c = rnd.config
        self.params = {"round": int(u.rnd), "clients": json.dumps(list(c.clients)), "dim": int(c.dim), "k": int(c.k),
                       "t": int(c.t), "bits": int(c.bits), "graph_seed": str(c.graph_seed), "session": c.session,
                       "ring_clip": float(rnd.codec.clip), "max_examples": int(stage.max_examples),
                       "min_survivors": int(stage.min_survivors),
                       "clip": float(u.clip) if u.clip is not None else -1.0,
                       "noise_share": float(u.noise_share) if u.noise_share is not None else -1.0}

    def _phase(self, phase: str, bodies: dict[int, bytes], kind) -> tuple[list, list[dict]]:
        fields = {cid: {**self.runtime.common(), **self.params, "client_id": cid, "phase": phase, "body": body}
                  for cid, body in bodies.items()}
        got = self.runtime.exchange("train.secagg", fields)
        replies, dropped = [], []
        for cid, reply in got.items():
            if isinstance(reply, str):
                dropped.append({"id": cid, "error": f"SecAgg+ {phase}: {reply}"})
            else:
                replies.append(kind.from_bytes(bytes(reply["body"])))
        return replies, dropped

    def advertise_keys(self) -> list:
        from ..privacy.secagg import AdvertiseKeys

        return self._phase("advertise", {c: b"" for c in json.loads(self.params["clients"])}, AdvertiseKeys)[0]

    def share_keys(self, requests: dict) -> list:
        from ..privacy.secagg import ShareKeys

        return self._phase("share", {c: r.to_bytes() for c, r in requests.items()}, ShareKeys)[0]

    def masked_inputs(self, requests: dict, results) -> tuple[list, list[dict]]:
        from ..privacy.secagg import MaskedInput

        dropped = [{"id": r.client_id, "error": r.error} for r in results if r.error is not None]
        trained = {r.client_id for r in results if r.error is None}
        masked, failed = self._phase("mask", {c: req.to_bytes() for c, req in requests.items() if c in trained},
                                     MaskedInput)
        return masked, dropped + failed

    def unmasking(self, requests: dict) -> tuple[list, list[dict]]:
        from ..privacy.secagg import UnmaskingResponse

        return self._phase("unmask", {c: r.to_bytes() for c, r in requests.items()}, UnmaskingResponse)


class PrintDisplay(Display):
    """One line per round on the ServerApp's output (``flwr run --stream`` and the SuperLink's log show it)."""

    def message(self, text: str) -> None:
        print(f"fedfm: {text}", flush=True)

    def round_end(self, row: dict) -> None:
        keys = ("eval_accuracy", "fed_accuracy", "fed_loss", "train_loss", "bytes_up", "bytes_down",
                "message_bytes_up", "message_bytes_down")
        parts = [f"{k} {row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float))]
        dropped = [f"{d['id']}: {d.get('error')}" for d in row.get("dropped") or []]
        print(f"fedfm: round {row['round']} | " + " | ".join(parts) + (f" | dropped {dropped}" if dropped else ""),
              flush=True)


def _stages(stage):
    """A chain's stages, outermost first (each wraps the next as ``inner``)."""
    while stage is not None:
        yield stage
        stage = getattr(stage, "inner", None)


def run_id(run_dir, resume: bool) -> str:
    """The fedfm run's id, kept in the run directory (``deployment.json``) so that a resumed run has the same."""
    import uuid

    path = run_dir.path / "deployment.json"
    if resume and path.exists():
        return str(json.loads(path.read_text())["run"])
    rid = uuid.uuid4().hex
    run_dir.write_json("deployment.json", {"run": rid})
    return rid


def serve(grid: Grid, run_config: dict[str, Any], display: Optional[Display] = None) -> list[dict[str, Any]]:
    """The server side of a deployment run: the config from the run config (``fedfm-config``: the YAML text), the
    clients joined, the rounds run into the run directory, the report drawn."""
    from ..federation import begin, open_run_dir
    from ..tracking import RunDir

    from ..display import Displays
    from ..tracking.sinks import open_sinks

    display = display or PrintDisplay()
    text = str(run_config.get("fedfm-config") or "")
    if not text.strip():
        raise FedfmError("run config fedfm-config is empty: expected the run's fedfm config as YAML text "
                         "(fedfm deploy run sends it)")
    cfg = config_from_text(text, "run config fedfm-config")
    resume, overwrite = bool(run_config.get("resume", False)), bool(run_config.get("overwrite", False))
    check_config(cfg)
    run_dir = RunDir(cfg.output_dir())
    ck = open_run_dir(run_dir, resume, overwrite, display.message)
    # tracking.sinks: the same as `fedfm run` logs; refused here if unusable; ended FINISHED, FAILED or KILLED
    with open_sinks(cfg, run_dir, resume) as sinks:
        runtime = FlowerRuntime(grid, cfg)
        nodes = runtime.discover(display.message)
        cfg = deployment_config(cfg, nodes)
        runtime.set_config(cfg)
        display.message(f"run {cfg.name} -> {run_dir.path.resolve()}; clients: " +
                        ", ".join(f"{n.client_id}=node {n.node_id} ({n.train_examples} examples)" for n in
                                  sorted(nodes, key=lambda n: n.client_id)))
        fed = Deployment(cfg, nodes, runtime, run_dir, Displays(display, sinks))
        begin(fed, run_dir, ck, resume, overwrite, display.message, say=display.message)
        runtime.run_token = run_id(run_dir, resume)
        if cfg.secagg.enabled:  # the sum by SecAgg+ between the clients' own parties, over Flower messages
            from ..privacy.secure import SecureSum

            for stage in _stages(fed.server.chain):
                if isinstance(stage, SecureSum):
                    stage.parties = lambda st, rnd, u: FlowerParties(runtime, st, rnd, u)
        if fed.server.sample_dp is not None:  # the z every client's DP-SGD uses (derived from the target ε if unset)
            runtime.extra["dp_noise_multiplier"] = float(fed.server.sample_dp.noise_multiplier)
        run_dir.write_json("partition.json", fed.describe())
        with run_dir.writing():
            rows = fed.run()
        try:
            from ..tracking.report import make_report

            make_report(run_dir.path)
        except Exception as e:  # a plot failing must not hide a finished run
            display.message(f"report not drawn: {e}")
        sinks.finish(run_dir)
    display.message(f"done: run directory {run_dir.path.resolve()}")
    return rows


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        serve(grid, dict(context.run_config))
    except FedfmError as e:
        print(f"fedfm: error: {e}", file=sys.stderr, flush=True)
        raise
