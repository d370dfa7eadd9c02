"""Simulation: the server side and many virtual clients put together in one process, with a runtime between them.

The clients share one base model (loaded once, never copied); each virtual client holds its own partition of the
data (``client.data.LocalData``) and its state in a store that spills to disk. The server side (``server.Server``)
gets none of it: it sees the clients' encoded results, their number and the example count each reports.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .client import CLIENT_ALGORITHMS, ClientContext, make_client
from .client.data import local_data
from .clock import SimClock
from .config import RunConfig
from .data import FederatedData, build_federated_data
from .data.sources import load_examples
from .display import Display
from .errors import ConfigError
from .evaluation import ServerModel
from .federation import Federation
from .models.adapters import check_target_modules
from .models.loader import check_model_config
from .randomness import Randomness
from .runtime import make_runtime
from .runtime.state_store import ClientStateStore
from .sampling import num_sampled
from .schedules import make_schedule
from .server import Server, worst_fraction_mean
from .tasks import TASKS
from .tracking import RunDir


@dataclass
class Prepared:
    """Everything built from the config before the model loads (so bad input fails fast)."""

    cfg: RunConfig
    data: FederatedData
    mechanism: Any = None  # client-level DP: sampling, noise multiplier and accountant (privacy.mode: client)
    attack: Any = None  # attack.kind: the malicious clients, their data already poisoned
    sample_dp: Any = None  # sample-level DP-SGD: each client's sampling rate and steps, the noise multiplier
    synthetic: Any = None  # data.synthetic: the generated pool and the rows each client got (data.synthetic)


def prepare(cfg: RunConfig) -> Prepared:
    """Check the model reference and load + partition the data; no model weights are touched."""
    check_model_config(cfg.model)
    algorithm = CLIENT_ALGORITHMS.get(cfg.client.algorithm)
    if getattr(algorithm, "holds_model", True):  # one whose clients hold no model (black-box tuning) adapts none
        check_target_modules(cfg)
    task_cls = TASKS.get(cfg.task.name)
    if task_cls.needs_labels and cfg.partition.method in ("dirichlet", "shards") and not cfg.data.label_column:
        raise ConfigError(f"partition.method {cfg.partition.method!r} needs data.label_column")
    if not task_cls.needs_labels and cfg.partition.method in ("dirichlet", "shards"):
        raise ConfigError(f"partition.method {cfg.partition.method!r} needs labels; task {cfg.task.name!r} has none "
                          "(use iid, quantity or by_column)")
    if cfg.partition.method == "by_column" and not cfg.data.client_column:
        raise ConfigError("partition.method 'by_column' needs data.client_column (the column naming each example's client)")
    check_peers = getattr(algorithm, "check_peers", None)
    if check_peers is not None:  # a service the algorithm calls (black-box tuning) answers, before anything loads
        check_peers(cfg)
    examples = load_examples(cfg.data, needs_labels=task_cls.needs_labels, seed=cfg.federation.seed,
                             chat=task_cls.reads_chat, images=task_cls.reads_images)
    data = build_federated_data(cfg, examples)
    if cfg.partition.validation_fraction and driver_of(cfg) is not None:
        raise ConfigError("partition.validation_fraction: the validation splits are scored in a simulation of one "
                          "shared model, not by this driver (continual.stages or a client algorithm of its own)")
    synthetic = _add_synthetic(cfg, data)  # each client's own choice of rows, before anything is tokenized
    n = len(data.clients)
    fed = cfg.federation
    if fed.clients_per_round is not None and fed.clients_per_round > n:
        raise ConfigError(f"federation.clients_per_round ({fed.clients_per_round}) is more than the {n} clients in the data")
    if fed.min_clients > n:
        raise ConfigError(f"federation.min_clients ({fed.min_clients}) is more than the {n} clients in the data")
    if cfg.clock.speeds is not None and len(cfg.clock.speeds) != n:
        raise ConfigError(f"clock.speeds has {len(cfg.clock.speeds)} entries, expected one per client ({n})")
    if isinstance(cfg.clock.availability, list) and len(cfg.clock.availability) != n:
        raise ConfigError(f"clock.availability has {len(cfg.clock.availability)} entries, expected one per client ({n})")
    rpc = cfg.adapter.rank_per_client
    if isinstance(rpc, list) and len(rpc) != n:
        raise ConfigError(f"adapter.rank_per_client lists {len(rpc)} ranks, expected one per client ({n})")
    from .attacks import make_attack

    attack = make_attack(cfg, n)
    attack.poison_data(data)  # data attacks change the malicious clients' examples before anything is tokenized
    mech = None
    if cfg.privacy.mode == "client":  # derive/check the noise multiplier now, before any model loads
        from .privacy.accountant import mechanism

        mech = mechanism(cfg, n)
    if cfg.secagg.enabled:  # an explicit SecAgg+ graph must be safe for the planned round size
        from .privacy.secure import check_graph

        check_graph(cfg, num_sampled(fed, n))
    sample_dp = None
    if cfg.privacy.mode == "sample":
        from .privacy.dpsgd import sample_level_dp

        sample_dp = sample_level_dp(cfg, np.array([len(c.train) for c in data.clients]))
    return Prepared(cfg=cfg, data=data, mechanism=mech, attack=attack, sample_dp=sample_dp, synthetic=synthetic)


def _add_synthetic(cfg: RunConfig, data: FederatedData):
    """data.synthetic: the pool from the generator (cached), and each client's rows chosen from its own labels."""
    if cfg.data.synthetic is None:
        return None
    from .data.synthetic import add_synthetic
    from .models.loader import cache_root

    try:
        check_model_config(cfg.data.synthetic.generator)
    except ConfigError as e:
        raise ConfigError(f"data.synthetic.generator: {str(e).removeprefix('model.')}") from None
    return add_synthetic(cfg, data, cache_root())


def encode(cfg, task, examples) -> tuple[dict[str, torch.Tensor], bool]:
    """The examples encoded once, and whether from the tokenized cache (``data.tokenized_cache``: memory-mapped from
    ``$FEDFM_CACHE/tokenized`` on the next run)."""
    if not cfg.data.tokenized_cache:
        return task.encode(examples), False
    from .models.loader import cache_root
    from .tasks.cache import encode_cached

    return encode_cached(task, examples, cache_root())


class PartitionData(Mapping):
    """The clients' own data on a worker of a remote runtime: each client's ``LocalData`` cut from this machine's
    copy of the seeded partition when the client is first given to the worker (never shipped by the driver)."""

    def __init__(self, task, encoded: dict[str, torch.Tensor], data: FederatedData):
        self.task, self.encoded, self.clients = task, encoded, {c.id: c for c in data.clients}
        self.cut: dict[int, Any] = {}

    def __getitem__(self, cid: int):
        if cid not in self.cut:
            c = self.clients[cid]
            self.cut[cid] = local_data(self.task, self.encoded, c.train, c.test)
        return self.cut[cid]

    def __iter__(self):
        return iter(self.clients)

    def __len__(self) -> int:
        return len(self.clients)


def worker_clients(cfg: RunConfig):
    """The client side in a worker process of a remote runtime (``runtime.name: ray``), built from the config alone:
    the same seeded partition as the driver's (``prepare``), the base loaded once, the client algorithm; returns it
    (``ClientTask -> ClientResult``). Only what a client needs for itself: no server side, no held-out model."""
    from .compression import make_codec, make_downlink
    from .models import build_model
    from .models.ranks import client_ranks

    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    prepared = prepare(cfg)
    data = prepared.data
    bundle = build_model(cfg, data.examples, public_texts=data.public_texts())
    encoded, _ = encode(cfg, bundle.task, data.examples)
    ranks = client_ranks(cfg, len(data.clients))
    ctx = ClientContext(cfg=cfg, model=bundle.model, spec=bundle.spec, task=bundle.task,
                        local=PartitionData(bundle.task, encoded, data), codec=make_codec(cfg.codec),
                        downlink=make_downlink(cfg.codec), store=ClientStateStore(cfg.runtime.cache_clients, None), personal=bundle.personal,
                        personal_init=bundle.personal.flat(), ranks=ranks)
    return make_client(ctx)


CONTINUAL_DRIVER = "fedfm.continual.ContinualSimulation"  # continual.stages: a lifelong federation


def driver_of(cfg):
    """The driver of a client algorithm whose clients do not share one model (fedmd: ``hetero.HeteroSimulation``), of
    a lifelong federation (``continual.stages``: ``continual.ContinualSimulation``), or None for a ``Simulation``.
    Drivers are named by dotted path (a driver imports the simulation, so the simulation does not import it)."""
    import importlib

    path = getattr(CLIENT_ALGORITHMS.get(cfg.client.algorithm), "driver", None)
    if path is None and cfg.continual.stages:
        path = CONTINUAL_DRIVER
    if path is None:
        return None
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class Simulation(Federation):
    """``fedfm run``: the data partitioned into virtual clients, one shared base, the client side, the server side,
    the runtime and the (simulated) clock."""

    def __init__(self, prepared: Prepared, run_dir: Optional[RunDir] = None, display: Optional[Display] = None):
        self.cfg, self.data, self.run_dir = prepared.cfg, prepared.data, run_dir
        driver = getattr(CLIENT_ALGORITHMS.get(self.cfg.client.algorithm), "driver", None)
        if driver is not None:  # clients that do not share one model (fedmd): refused before any model loads
            raise ConfigError(f"client.algorithm {self.cfg.client.algorithm!r} runs in {driver}, not in a simulation "
                              f"of one shared model")
        self.display = display or Display()
        self.random = Randomness.from_config(self.cfg)  # every draw of the run, by purpose
        self.owned = []
        encoded = self._setup_model(self.cfg)
        self._setup_attack(self.cfg, prepared.attack)
        # each virtual client's own data, cut out of the one encoding; the server side gets its held-out split only
        self.local = {c.id: local_data(self.task, encoded, c.train, c.test, c.val) for c in self.data.clients}
        self.encoded = encoded if self.cfg.eval.membership_audit else None  # the auditor sees both sides
        self._setup_server(self.cfg, prepared, encoded)
        self._setup_clients(self.cfg, prepared.sample_dp)
        self._setup_schedule(self.cfg)

    def _setup_model(self, cfg) -> dict[str, torch.Tensor]:
        """The one shared base with the adapter (model, adapter sections), and the data encoded once (task, data
        sections): the encoding is returned, to be cut into each party's own rows."""
        from .models import build_model

        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        t0 = time.perf_counter()
        # an algorithm whose clients hold another base than cfg.model builds it (offsite: the owner's emulator;
        # black-box tuning: no model at all, a prompt on the owner's inference service)
        client_model = getattr(CLIENT_ALGORITHMS.get(cfg.client.algorithm), "client_model", None)
        self.bundle = client_model(cfg, self.data) if client_model is not None else \
            build_model(cfg, self.data.examples, public_texts=self.data.public_texts())
        if hasattr(self.bundle.model, "close"):  # what it started for the run (an inference service)
            self.owned.append(self.bundle.model)
        self.model, self.spec, self.task = self.bundle.model, self.bundle.spec, self.bundle.task
        encoded, self.tokenized_from_cache = encode(cfg, self.task, self.data.examples)
        for note in [*self.data.notes, *getattr(self.task, "notes", [])]:  # how the data was read and split, too
            self.display.message(note)
        self.display.model({"trainable": self.spec.numel, "total": sum(p.numel() for p in self.model.parameters()),
                            "seconds": time.perf_counter() - t0, "method": cfg.adapter.method})
        return encoded

    def _setup_attack(self, cfg, attack) -> None:
        """The simulated malicious clients (attack section), their data already poisoned by ``prepare``."""
        from .attacks import Backdoor, make_attack

        self.attack = attack if attack is not None else make_attack(cfg, len(self.data.clients))
        self.backdoor_enc = None
        if isinstance(self.attack, Backdoor):
            self.backdoor_enc = self.task.encode(self.attack.triggered_test(self.data))
        if self.attack.malicious:
            self.display.message(f"attack: {cfg.attack.kind}, {len(self.attack.malicious)} malicious client(s): "
                                 f"{sorted(self.attack.malicious)[:10]}{' …' if len(self.attack.malicious) > 10 else ''}")

    def _setup_server(self, cfg, prepared: Prepared, encoded) -> None:
        """The server side (server, privacy, secagg, federation sections): the layout and initial state of the shared
        parameters, the example count each client reports, its own model and held-out split."""
        self.client_sizes = np.array([self.local[c.id].train_rows(self.task) for c in self.data.clients])
        self.server = Server(cfg, self.spec.layout(), self.spec.flat(), self.client_sizes, run_dir=self.run_dir,
                             display=self.display, model=self._server_model(encoded),
                             mechanism=prepared.mechanism, sample_dp=prepared.sample_dp)
        self.codec, self.downlink, self.ranks = self.server.codec, self.server.downlink, self.server.ranks

    def _setup_clients(self, cfg, sample_dp) -> None:
        """The client side for every virtual client (client, runtime sections): their state store, the client
        algorithm on the shared base, the runtime that carries tasks to it."""
        self.personal = self.bundle.personal
        state_dir = cfg.runtime.state_dir or (self.run_dir.path / "client_state" if self.run_dir is not None else None)
        self.store = ClientStateStore(cfg.runtime.cache_clients, state_dir, keep_manifests=cfg.output.keep_checkpoints)
        self.ctx = ClientContext(cfg=cfg, model=self.model, spec=self.spec, task=self.task, local=self.local,
                                 codec=self.codec, downlink=self.downlink, store=self.store, personal=self.personal,
                                 personal_init=self.personal.flat(), ranks=self.ranks, sample_dp=sample_dp,
                                 peer=self.server.algo_server)  # reached in bytes by an algorithm that talks to it
        self.client_algo = make_client(self.ctx)
        self.runtime = make_runtime(cfg, self.client_algo, worker_clients)
        for note in getattr(self.runtime, "notes", []):
            self.display.message(note)

    def _setup_schedule(self, cfg) -> None:
        """Simulated time (clock, federation sections), the schedule, and what the server checkpoints and evaluates
        of the simulation besides its own state."""
        self.clock = SimClock(cfg.clock, len(self.data.clients), cfg.federation.seed)
        self.schedule = make_schedule(self)
        self.server.parts.update(schedule=self.schedule, store=self.store)
        if self.backdoor_enc is not None:
            self.server.evaluations.append(self._backdoor)
        if cfg.eval.per_client:
            self.server.evaluations.append(self.evaluate_clients)
        if any(len(c.val) for c in self.data.clients):
            self.server.evaluations.append(self.evaluate_validation)

    def _server_model(self, encoded) -> ServerModel:
        """The server's model is the shared base, with the server's own held-out split of the data."""
        cfg, test = self.cfg, np.asarray(self.data.test)
        if not len(test) or not cfg.eval.held_out:  # data.test_fraction 0 or eval.held_out off: no held-out set
            # of its own is scored (eval.federated, the validation splits still score the model)
            return ServerModel(cfg, self.bundle, None, test, np.zeros(0, dtype=np.int64))
        held_out = local_data(self.task, encoded, test, np.zeros(0, dtype=np.int64))
        position = {int(g): k for k, g in enumerate(test)}
        chosen = self._fixed_sample(test, cfg.eval.max_examples, "eval_sample")
        n_gen = cfg.eval.generation.num_prompts if hasattr(self.task, "generate") else 0
        prompts = self._fixed_sample(test, n_gen, "prompt_sample") if n_gen else np.zeros(0, dtype=np.int64)
        return ServerModel(cfg, self.bundle, held_out.encoded, np.array([position[int(g)] for g in chosen],
                           dtype=np.int64), prompts, pool=test)

    def _fixed_sample(self, indices: np.ndarray, k: int | None, purpose: str) -> np.ndarray:
        """The same seeded subset of ``indices`` at every eval (all of them when ``k`` is None or large enough)."""
        if k is None or k >= len(indices):
            return indices
        rng = self.random.rng(purpose)
        return np.sort(rng.choice(indices, size=k, replace=False))

    # ------------------------------------------------------------------ evaluation
    def _backdoor(self, rnd: int) -> dict[str, Any]:
        """How often the trigger turns a held-out example into the target label."""
        n = len(next(iter(self.backdoor_enc.values())))
        if not n:
            return {}
        self._load_global()
        return {"backdoor_success": self.task.evaluate(self.model, self.backdoor_enc, np.arange(n),
                                                       self.cfg.eval.batch_size)["accuracy"]}

    def evaluate_clients(self, rnd: int) -> dict[str, Any]:
        """Each client's local test set under the global model; with personal parameters also under the client's
        personalized model; with ``eval.finetune_steps`` also after that many local steps from the global model
        (FedAvg + fine-tuning). Keys: client_<metric>[_personal|_finetuned] (+ _mean, _worst10)."""
        from .client import local_sgd

        cfg, task = self.cfg, self.task
        key, better_high = ("accuracy", True) if task.needs_labels else ("loss", False)
        short = "acc" if key == "accuracy" else key
        per: dict[str, dict[str, float]] = {"": {}}
        if self.personal.names:
            per["_personal"] = {}
        if cfg.eval.finetune_steps:
            per["_finetuned"] = {}

        def score(c) -> float:
            own = self.local[c.id]  # each client scores on its own test split
            return task.evaluate(self.model, own.encoded, own.test, cfg.eval.batch_size)[key]

        self._load_global()  # and again after each personalized or fine-tuned score
        for i, c in enumerate(self.data.clients):
            if not len(c.test):
                continue
            per[""][str(c.id)] = score(c)
            if "_personal" in per:
                self.ctx.load_personal(i)
                per["_personal"][str(c.id)] = score(c)
                self._load_global()
            if "_finetuned" in per and len(c.train):
                gen = self.random.torch("eval_finetune", rnd, i)
                torch.manual_seed(self.random.seed("eval_finetune", rnd, i))
                local_sgd(self.ctx, self.local[c.id], self.local[c.id].train, gen, num_steps=cfg.eval.finetune_steps)
                per["_finetuned"][str(c.id)] = score(c)
                self._load_global()
        out: dict[str, Any] = {}
        for suffix, vals in per.items():
            if vals:
                out[f"client_{short}{suffix}"] = vals
                out[f"client_{short}{suffix}_mean"] = float(np.mean(list(vals.values())))
                out[f"client_{short}{suffix}_worst10"] = worst_fraction_mean(list(vals.values()), 0.1, better_high)
        return out

    def evaluate_validation(self, rnd: int) -> dict[str, Any]:
        """``val_<metric>``: the model each client would use on its own validation split (partition.
        validation_fraction), as the clients would score it on their own and report: the global model, or with
        personal parameters (FedSA-LoRA's lora_B, adapter.personal) the client's personalized model; pooled, each
        client weighted by its validation examples (``val_perplexity`` from the pooled loss). What a sweep scores its
        settings on: never the test split."""
        self._load_global()
        personal = bool(self.personal.names)
        sums: dict[str, float] = {}
        n = 0
        for i, c in enumerate(self.data.clients):
            own = self.local[c.id]
            if not len(own.val):
                continue
            if personal:
                self.ctx.load_personal(i)
            for k, v in self.task.evaluate(self.model, own.encoded, own.val, self.cfg.eval.batch_size).items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(own.val)
            n += len(own.val)
        if personal:
            self._load_global()
        out = {f"val_{k}": v / n for k, v in sums.items()}
        if "val_perplexity" in out and "val_loss" in out:
            out["val_perplexity"] = float(np.exp(min(out["val_loss"], 50.0)))
        out["val_examples"] = n
        return out

    def _after_rounds(self, rows: list[dict[str, Any]]) -> None:
        """The membership audit (eval.membership_audit): the auditor sees both sides, as only a simulation can."""
        cfg = self.cfg
        if cfg.eval.membership_audit and rows:
            from .privacy.audit import membership_audit

            audit = {"round": rows[-1]["round"], **membership_audit(self)}
            self.audit = audit
            self.display.message(f"membership inference (loss threshold): AUC {audit['mia_auc']:.3f} on "
                                 f"{audit['mia_members']} training vs {audit['mia_nonmembers']} held-out examples")
            if self.run_dir is not None:
                self.run_dir.write_json("privacy_audit.json", audit)
