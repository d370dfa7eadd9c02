"""A simulation whose clients run different models (client.algorithm fedmd, docs/ownership.md): ``Simulation`` holds
one shared base and one global state, which clients of several architectures do not have, so this is the smallest
driver that holds several.

Each architecture's base is loaded once in the process (a client group and the server's foundation model with the
same model and adapter share one); each client keeps its whole trainable state in the client state store and loads
it in place. The data is read, the public set carved and the clients partitioned as in a ``Simulation``
(``simulation.prepare``); each architecture encodes the examples with its own tokenizer. Every task and result
crosses as ``client.wire`` bytes, and the server half (``client.fedmd.FedMDServer``) sees the clients' logits only.

``mode`` gives the two arms a transfer run is compared with, on the same clients, data and steps: ``alone`` (each
client trains on its own data only) and ``fedavg`` (FedAvg among the clients of the same architecture: each group's
sampled clients start from the group's model, and their trained states are averaged by example count).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .client import ClientContext, ClientTask, local_sgd
from .client.data import local_data
from .client.fedmd import FedMD, FedMDServer, Foundation, PublicSet
from .client.wire import result_from_bytes, result_to_bytes, task_from_bytes, task_to_bytes
from .display import Display
from .errors import ConfigError
from .randomness import Randomness
from .runtime.state_store import ClientStateStore
from .simulation import Prepared, encode, prepare

MODES = ("transfer", "alone", "fedavg")


@dataclass
class Group:
    """One architecture: its config (the run's, with its model and adapter), its client ids, and once built its
    base, encoding, public set, held-out rows and the client algorithm on it."""

    cfg: Any
    clients: list[int]
    bundle: Any = None
    ctx: Any = None
    algo: Any = None
    held_out: Any = None  # LocalData of the server's held-out examples (eval sample), as this architecture reads them


def group_configs(cfg, num_clients: int) -> list[Group]:
    """``transfer.groups`` as (config, client ids): a count takes the next ids not listed by another group."""
    t = cfg.transfer
    if not t.groups:
        return [Group(cfg, list(range(num_clients)))]
    listed = {c for g in t.groups if isinstance(g.clients, list) for c in g.clients}
    free = iter([c for c in range(num_clients) if c not in listed])
    out = []
    for i, g in enumerate(t.groups):
        ids = list(g.clients) if isinstance(g.clients, list) else [next(free, -1) for _ in range(g.clients)]
        bad = [c for c in ids if c < 0 or c >= num_clients]
        if bad or (isinstance(g.clients, int) and -1 in ids):
            raise ConfigError(f"transfer.groups[{i}].clients: the data has {num_clients} clients; this group asks "
                              f"for clients it does not have")
        out.append(Group(cfg.model_copy(update={"model": g.model, "adapter": g.adapter or cfg.adapter}), ids))
    covered = sorted(c for g in out for c in g.clients)
    if covered != list(range(num_clients)):
        raise ConfigError(f"transfer.groups: the data has {num_clients} clients, and the groups give a model to "
                          f"{len(covered)} of them: every client needs exactly one group")
    return out


def server_config(cfg):
    t = cfg.transfer
    return cfg.model_copy(update={"model": t.server_model or cfg.model, "adapter": t.server_adapter or cfg.adapter})


def prepare_transfer(cfg) -> Prepared:
    """``simulation.prepare`` (data read, public set carved, partition), then each group's and the server model's
    references and adapter targets checked: all before any weights load."""
    from .models.adapters import check_target_modules
    from .models.loader import check_model_config

    if cfg.client.algorithm != "fedmd":
        raise ConfigError(f"client.algorithm {cfg.client.algorithm!r}: fedfm.hetero runs client.algorithm fedmd")
    prepared = prepare(cfg)
    for what, gcfg in [*((f"transfer.groups[{i}]", g.cfg) for i, g in
                         enumerate(group_configs(cfg, len(prepared.data.clients)))),
                       ("transfer.server_model", server_config(cfg))]:
        try:
            check_model_config(gcfg.model)
            check_target_modules(gcfg)
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from None
    if not len(prepared.data.public):
        raise ConfigError("transfer.public_fraction: the public set is empty (too few examples)")
    return prepared


def _key(gcfg) -> str:
    return json.dumps([gcfg.model.model_dump(mode="json"), gcfg.adapter.model_dump(mode="json")], sort_keys=True)


class HeteroSimulation:
    """Clients of several architectures and the server's foundation model, in one process (see the module doc)."""

    prepare = staticmethod(prepare_transfer)  # what `fedfm run` checks before any model loads

    def __init__(self, prepared: Prepared, display: Optional[Display] = None, mode: str = "transfer",
                 run_dir=None):
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        cfg, data = prepared.cfg, prepared.data
        self.cfg, self.data, self.mode, self.run_dir = cfg, data, mode, run_dir
        self.display = display or Display()
        self.random = Randomness.from_config(cfg)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.num_classes = data.examples.num_classes
        self.store = ClientStateStore(cfg.runtime.cache_clients, cfg.runtime.state_dir)
        self._bases: dict[str, tuple[Any, dict[str, torch.Tensor]]] = {}
        self.eval_rows = self._eval_sample()
        self.groups = group_configs(cfg, len(data.clients))
        self.group_of: dict[int, Group] = {}
        for g in self.groups:
            self._setup_group(g)
        self._setup_server(server_config(cfg))
        self.bases_loaded = len(self._bases)
        self.fedavg_state = {id(g): g.ctx.personal_init.clone() for g in self.groups}  # mode fedavg: each group's model

    # ------------------------------------------------------------------ setup
    def _base(self, gcfg):
        """The base of an architecture, loaded once per process, and the examples encoded by its tokenizer."""
        from .models import build_model

        key = _key(gcfg)
        if key not in self._bases:
            t0 = time.perf_counter()
            bundle = build_model(gcfg, self.data.examples, public_texts=self.data.public_texts())
            encoded, _ = encode(gcfg, bundle.task, self.data.examples)
            self._bases[key] = (bundle, encoded)
            self.display.message(f"fedmd: {gcfg.model.name_or_path or gcfg.model.from_config.get('model_type')} "
                                 f"+ {gcfg.adapter.method}: {bundle.spec.numel} trainable values, loaded in "
                                 f"{time.perf_counter() - t0:.1f} s")
        return self._bases[key]

    def _public(self, task, encoded) -> PublicSet:
        cut = local_data(task, encoded, self.data.public, np.zeros(0, dtype=np.int64))
        return PublicSet({k: v for k, v in cut.encoded.items() if k != "labels"}, cut.train)

    def _eval_sample(self) -> np.ndarray:
        test, k = np.asarray(self.data.test), self.cfg.eval.max_examples
        if k is None or k >= len(test):
            return test
        return np.sort(self.random.rng("eval_sample").choice(test, size=k, replace=False))

    def _setup_group(self, g: Group) -> None:
        from .compression import make_codec, make_downlink

        bundle, encoded = self._base(g.cfg)
        g.bundle = bundle
        local = {cid: local_data(bundle.task, encoded, self.data.clients[cid].train, self.data.clients[cid].test)
                 for cid in g.clients}
        g.held_out = local_data(bundle.task, encoded, self.eval_rows, np.zeros(0, dtype=np.int64))
        g.ctx = ClientContext(cfg=g.cfg, model=bundle.model, spec=bundle.spec, task=bundle.task, local=local,
                              codec=make_codec(g.cfg.codec), downlink=make_downlink(g.cfg.codec), store=self.store,
                              personal_init=bundle.spec.flat())  # each client starts from its group's initial state
        g.algo = FedMD(g.ctx, self._public(bundle.task, encoded), self.num_classes)
        for cid in g.clients:
            self.group_of[cid] = g

    def _setup_server(self, scfg) -> None:
        """The server's foundation model F (its own trainable state, even when its base is a group's) and the server
        half of fedmd. The server holds the public set and its held-out split, never a client's data."""
        from .compression import make_codec

        bundle, encoded = self._base(scfg)
        self.fm = Foundation(model=bundle.model, spec=bundle.spec, task=bundle.task,
                             public=self._public(bundle.task, encoded), state=bundle.spec.flat())
        self.fm_held_out = local_data(bundle.task, encoded, self.eval_rows, np.zeros(0, dtype=np.int64))
        self.server = FedMDServer(None, make_codec(self.cfg.codec), len(self.data.clients), self.cfg)
        self.server.attach(self.fm, self.num_classes)

    # ------------------------------------------------------------------ rounds
    def sample(self, rnd: int) -> list[int]:
        n, k = len(self.data.clients), self.cfg.federation.clients_per_round
        if k is None:
            k = max(1, int(round(self.cfg.federation.fraction * n)))
        if k >= n:
            return list(range(n))
        return sorted(self.random.rng("client_sample", rnd).choice(n, size=k, replace=False).tolist())

    def run(self, initial: bool = True) -> list[dict[str, Any]]:
        """The rounds, each a row; ``initial``: also evaluate the initial models, as round 0."""
        rows = [{"round": 0, **self.evaluate()}] if initial else []
        if rows:
            self._log(rows[0])
        for rnd in range(1, self.cfg.federation.rounds + 1):
            row = self.run_round(rnd)
            if rnd % self.cfg.eval.every == 0 or rnd == self.cfg.federation.rounds:
                row.update(self.evaluate())
            rows.append(row)
            self._log(row)
        return rows

    def _log(self, row: dict[str, Any]) -> None:
        """One row: into the run directory's metrics.jsonl (``fedfm run``), and to the display."""
        if self.run_dir is not None:
            self.run_dir.append_metrics(row)
        self.display.message(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}))

    def run_round(self, rnd: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        ids = self.sample(rnd)
        if self.mode != "transfer":
            return {"round": rnd, **self._baseline_round(rnd, ids), "seconds": time.perf_counter() - t0}
        up = down = 0
        results = []
        for cid in ids:
            task = ClientTask(client_id=cid, round=rnd, payload=self.server.payload(rnd, cid),
                              seed=self.random.seed("client_task", rnd, cid))
            wire = task_to_bytes(task)  # what crosses, down
            down += len(task.payload)
            result = result_to_bytes(self.group_of[cid].algo(task_from_bytes(wire)))  # and up
            received = result_from_bytes(result)
            up += len(received.update) + sum(len(b) for b in received.extras.values())
            results.append(received)
        accepted, measurements = self.server.complete(rnd, results)
        row: dict[str, Any] = {"round": rnd, "clients": ids, "bytes_up": up, "bytes_down": down, **measurements}
        for key in ("train_loss", "distill_loss"):
            vals = [r.metrics[key] for r in accepted if key in r.metrics and np.isfinite(r.metrics[key])]
            if vals:
                row[key] = float(np.mean(vals))
        row["seconds"] = time.perf_counter() - t0
        return row

    def _baseline_round(self, rnd: int, ids: list[int]) -> dict[str, Any]:
        """mode alone: each sampled client trains its own state; mode fedavg: from its group's model, which becomes
        the example-weighted mean of the trained states (bytes: the fp32 state down and up, per client)."""
        up = down = 0
        trained: dict[int, list[tuple[torch.Tensor, int]]] = {}
        losses = []
        for cid in ids:
            g = self.group_of[cid]
            ctx = g.ctx
            start = self.fedavg_state[id(g)] if self.mode == "fedavg" else None
            self._load_client(cid, start)
            seed = self.random.seed("client_task", rnd, cid)
            torch.manual_seed(seed)
            own = ctx.local[cid]
            loss, _ = local_sgd(ctx, own, own.train, torch.Generator().manual_seed(seed))
            losses.append(loss)
            flat = ctx.spec.flat()
            if self.mode == "fedavg":
                trained.setdefault(id(g), []).append((flat, own.train_rows(ctx.task)))
                up += 4 * flat.numel()
                down += 4 * flat.numel()
            else:
                self._save_client(cid, flat)
        for g in self.groups:
            if id(g) in trained:
                states, sizes = zip(*trained[id(g)])
                w = torch.tensor(sizes, dtype=torch.float32)
                self.fedavg_state[id(g)] = (torch.stack(states) * (w / w.sum())[:, None]).sum(0)
        return {"clients": ids, "bytes_up": up, "bytes_down": down, "train_loss": float(np.mean(losses))}

    def _load_client(self, cid: int, state: torch.Tensor | None = None) -> None:
        g = self.group_of[cid]
        if state is not None:
            g.ctx.spec.load_flat(state)
        else:
            g.algo.load(cid)

    def _save_client(self, cid: int, flat: torch.Tensor) -> None:
        stored = dict(self.store.get(cid) or {})
        stored[FedMD.KEY] = flat
        self.store.put(cid, stored)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Each client's accuracy on its own test split and on the server's held-out sample (with its own state, or
        in mode fedavg its group's model), and the foundation model's on the held-out sample."""
        bs = self.cfg.eval.batch_size
        own, glob = {}, {}
        for g in self.groups:
            task, model = g.ctx.task, g.ctx.model
            for cid in g.clients:
                self._load_client(cid, self.fedavg_state[id(g)] if self.mode == "fedavg" else None)
                mine = g.ctx.local[cid]
                if len(mine.test):
                    own[str(cid)] = task.evaluate(model, mine.encoded, mine.test, bs)["accuracy"]
                if len(g.held_out.train):
                    glob[str(cid)] = task.evaluate(model, g.held_out.encoded, g.held_out.train, bs)["accuracy"]
        out: dict[str, Any] = {"client_acc": own, "client_acc_global": glob}
        if own:
            out["client_acc_mean"] = float(np.mean(list(own.values())))
        if self.mode == "transfer" and len(self.fm_held_out.train):
            self.fm.load()
            out["fm_accuracy"] = self.fm.task.evaluate(self.fm.model, self.fm_held_out.encoded,
                                                       self.fm_held_out.train, bs)["accuracy"]
        return out
