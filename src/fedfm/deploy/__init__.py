"""A federation between organisations: the server side on one machine, each client on its own, over Flower.

``Deployment`` is the simulation's round loop (``federation.Federation``) with its clients elsewhere: the server side
builds its own model from the config (for the layout, the initial state and the final adapter) and never any
client's data; what it knows of each client is what the client said when it joined (``Node``: its client id, its
training example count, the label names it holds). Rounds, sampling, the aggregation chain, client-level DP,
checkpoints and resume are the simulation's own, so with the same seed and data a deployment trains the same model.

The Flower side (``deploy.flower``: the ``ServerApp``, the ``ClientApp``, the runtime that carries tasks as Flower
messages) is imported only when a deployment runs; this module does not import flwr.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..config import RunConfig, validate_config
from ..errors import ConfigError, FedfmError
from ..federation import Federation
from ..randomness import Randomness


@dataclass
class Node:
    """A client as the server side knows it: where to reach it, and what it told when it joined."""

    node_id: int  # Flower's id of its SuperNode
    client_id: int  # its place in the federation (node config ``client-id``, else given in order of node id)
    train_examples: int  # what sampling and the clock weigh it by
    labels: list[str] = field(default_factory=list)  # the label names in its data (classification)


def check_config(cfg: RunConfig) -> None:
    """What a deployment cannot do (yet), refused before anything loads, naming the key."""
    from ..client import CLIENT_ALGORITHMS

    state = getattr(CLIENT_ALGORITHMS.get(cfg.client.algorithm), "process_state", None)
    refusals = [
        (bool(state), f"{state}; a Flower ClientApp may start afresh for every message, and the server side does "
                      f"not track what each SuperNode holds"),
        (cfg.federation.schedule != "sync", f"federation.schedule {cfg.federation.schedule!r}: a deployment runs "
                                            "synchronous rounds (fedbuff here simulates time)"),
        (cfg.attack.kind != "none", f"attack.kind {cfg.attack.kind!r}: simulated attacks are for simulations"),
        (bool(cfg.partition.validation_fraction), "partition.validation_fraction: the validation splits are scored "
                                                  "in a simulation (fedfm sweep); a SuperNode keeps its own data"),
        (cfg.model.train_tokenizer is not None, "model.train_tokenizer: the server side has no text to train it on"),
        (bool(cfg.continual.stages), "continual.stages: a lifelong federation runs in a simulation "
                                     "(fedfm.continual); no message tells a SuperNode that a stage began or ended"),
        (getattr(CLIENT_ALGORITHMS.get(cfg.client.algorithm), "not_deployable", None),
         f"client.algorithm {cfg.client.algorithm!r}: "
         f"{getattr(CLIENT_ALGORITHMS.get(cfg.client.algorithm), 'not_deployable', '')}"),
        (getattr(CLIENT_ALGORITHMS.get(cfg.client.algorithm), "interactive", False),
         f"client.algorithm {cfg.client.algorithm!r}: its client talks to the server half batch by batch while it "
         "trains, and a deployment carries one task and one result per client and round"),
    ]
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"deployment: {why}")


def assign_clients(found: list[tuple[int, Optional[int]]], num_clients: int) -> dict[int, int]:
    """{node id: client id} for ``num_clients`` nodes: a node keeps the ``client-id`` its node config names, the
    others take the free ids in order of node id. ``found``: (node id, its client id or None) for each node."""
    named = [(n, c) for n, c in found if c is not None]
    ids: dict[int, int] = {}
    for node, cid in named:
        if not 0 <= cid < num_clients:
            raise FedfmError(f"SuperNode {node}: client-id {cid} is not in 0..{num_clients - 1} "
                             f"(partition.num_clients={num_clients})")
        if cid in ids.values():
            other = next(n for n, c in ids.items() if c == cid)
            raise FedfmError(f"SuperNodes {other} and {node} both say client-id {cid}")
        ids[node] = cid
    free = iter(sorted(set(range(num_clients)) - set(ids.values())))
    for node, _ in sorted((n, c) for n, c in found if c is None):
        cid = next(free, None)
        if cid is None:
            break
        ids[node] = cid
    return ids


def deployment_config(cfg: RunConfig, nodes: list[Node]) -> RunConfig:
    """The run's config as every party uses it: the label names all sites hold between them, numbered as one
    table would number them (``data.label_names``), and each client scoring the global model on its own test split
    (``eval.federated``; ``eval.per_client`` and ``eval.membership_audit`` off), since the server side has no data
    of its own."""
    from ..data.sources import label_order
    from ..tasks import TASKS

    data = cfg.model_dump(mode="json")
    if TASKS.get(cfg.task.name).needs_labels:
        if cfg.data.label_names is None:
            data["data"]["label_names"] = label_order([n for node in nodes for n in node.labels])
        names = set(data["data"]["label_names"])
        for node in nodes:
            unknown = sorted(set(node.labels) - names)
            if unknown:
                raise FedfmError(f"client {node.client_id} (SuperNode {node.node_id}) holds label(s) {unknown[:5]} "
                                 f"that data.label_names does not list")
        if len(names) < 2:
            raise FedfmError(f"the clients hold {len(names)} class(es) between them; classification needs at least 2")
    # the server side holds no data: each client scores the global model on its own test split instead of the
    # server scoring every client's (eval.per_client) or auditing both sides (eval.membership_audit)
    data["eval"].update(federated=True, per_client=False, membership_audit=False)
    return validate_config(data)


class Deployment(Federation):
    """The server side of a deployment: the config (as ``deployment_config`` makes it), the clients that joined,
    a runtime that reaches them (``deploy.flower.FlowerRuntime``), the run directory."""

    def __init__(self, cfg: RunConfig, nodes: list[Node], runtime, run_dir=None, display=None):
        from ..clock import SimClock
        from ..attacks import make_attack
        from ..data.sources import Examples
        from ..display import Display
        from ..evaluation import ServerModel
        from ..models import build_model
        from ..schedules import make_schedule
        from ..server import Server

        check_config(cfg)
        self.cfg, self.run_dir, self.display = cfg, run_dir, display or Display()
        self.random = Randomness.from_config(cfg)
        self.nodes = sorted(nodes, key=lambda n: n.client_id)
        if [n.client_id for n in self.nodes] != list(range(len(self.nodes))):
            raise FedfmError(f"deployment: client ids {[n.client_id for n in self.nodes]} are not 0..{len(nodes) - 1}")
        n = len(self.nodes)
        # its own base with the adapter, built from the config alone (no examples: the label names are the config's)
        self.bundle = build_model(cfg, Examples(texts=[], label_names=cfg.data.label_names))
        self.model, self.spec, self.task = self.bundle.model, self.bundle.spec, self.bundle.task
        none = np.zeros(0, dtype=np.int64)
        sizes = np.array([node.train_examples for node in self.nodes])
        sample_dp = None
        if cfg.privacy.mode == "sample":  # z for every client (derived from the target ε over their sizes)
            from ..privacy.dpsgd import sample_level_dp

            sample_dp = sample_level_dp(cfg, sizes)
        self.server = Server(cfg, self.spec.layout(), self.spec.flat(), sizes, run_dir=run_dir,
                             display=self.display, model=ServerModel(cfg, self.bundle, None, none, none),
                             sample_dp=sample_dp)
        self.codec = self.server.codec
        self.runtime = runtime
        self.clock = SimClock(cfg.clock, n, cfg.federation.seed)
        self.attack = make_attack(cfg, n)
        self.schedule = make_schedule(self)
        self.server.parts.update(schedule=self.schedule)

    def reachable(self) -> np.ndarray:
        """The clients whose SuperNode is still connected: a node lost in a round is not sampled again."""
        return np.asarray(sorted(self.runtime.reachable()), dtype=np.int64)

    def aggregate_results(self, rnd: int, results, weights=None) -> dict[str, Any]:
        row = super().aggregate_results(rnd, results, weights)
        row.update(self.runtime.take_counts())  # what the Flower messages carried, counted at the message
        return row

    def describe(self) -> dict[str, Any]:
        """What ``partition.json`` holds in a deployment: what each client said when it joined."""
        return {"method": "deployment", "num_clients": len(self.nodes), "label_names": self.cfg.data.label_names,
                "test_size": 0, "notes": [],
                "clients": [{"id": n.client_id, "name": f"node {n.node_id}", "n_train": n.train_examples,
                             "n_test": None, "label_counts": None, "labels": n.labels} for n in self.nodes]}
