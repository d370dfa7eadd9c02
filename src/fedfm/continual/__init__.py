"""Lifelong federations (``continual.stages``, docs/continual.md): the data arrive in stages and one federation keeps
training across them.

A stage names what arrives: ``classes`` (class-incremental: the clients' rows of these labels), ``domains``
(domain-incremental: their rows whose ``continual.domain_column`` has these values), ``join`` (clients that exist
from this stage on) and ``drift`` (clients whose own data at this stage are other classes or domains). At stage s a
client holds only its own rows of stage s (cut from its partition as they arrive, ``StagePlan``): it has never seen
a later stage's rows, and an earlier stage's only as far as a mitigation kept them (replay's bounded buffer, in its
own entry of the client state store). The global model, the server's state and the client state store carry over
from stage to stage.

After each stage the server scores the global model on its own held-out examples of every stage (those of the
stage's classes or domains), one row of the accuracy matrix R; ``continual.metrics`` gives average accuracy,
forgetting, backward and forward transfer from it; each stage's row goes to ``continual.jsonl`` and the matrix is
drawn to ``report/accuracy_matrix.png``.

``ContinualSimulation`` is a ``simulation.Simulation`` whose clients' rows change at each stage's first round;
``simulation.driver_of`` chooses it when ``continual.stages`` is given.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..client import CLIENT_ALGORITHMS, LocalTraining
from ..client.continual import ContinualClient
from ..client.data import local_data
from ..data.sources import load_examples
from ..display import Display
from ..errors import ConfigError, DataError
from ..randomness import Randomness
from ..simulation import Prepared, Simulation, prepare
from ..tasks import TASKS
from ..tracking.report import plot_matrix
from .metrics import stage_metrics

__all__ = ["ContinualSimulation", "StagePlan", "plan_stages", "prepare_continual", "stage_metrics"]

EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class StagePlan:
    """Which examples are where at each stage (global example indices): each present client's own training and test
    rows, and the server's held-out examples of the stage."""

    names: list[str]
    rounds: list[int]
    present: list[list[int]]  # per stage: the clients that exist (joined)
    train: list[dict[int, np.ndarray]]  # per stage: client id -> its training examples of the stage
    test: list[dict[int, np.ndarray]]  # per stage: client id -> its local test examples of the stage
    held_out: list[np.ndarray]  # per stage: the server's held-out examples of the stage (what R's column scores)
    notes: list[str] = field(default_factory=list)

    def stage_of(self, rnd: int) -> int:
        """The stage round ``rnd`` (from 1) belongs to."""
        return int(np.searchsorted(np.cumsum(self.rounds), rnd))

    def first_round(self, s: int) -> int:
        return int(sum(self.rounds[:s])) + 1

    def describe(self) -> list[dict[str, Any]]:
        return [{"stage": s, "name": self.names[s], "rounds": self.rounds[s], "clients": len(self.present[s]),
                 "training": int(sum(len(v) for v in self.train[s].values())),
                 "held_out": int(len(self.held_out[s]))} for s in range(len(self.names))]


def _values(cfg, data) -> tuple[Optional[np.ndarray], list[str], Optional[np.ndarray], list[str]]:
    """(label name per example, the label names; domain value per example, the domain values) of the data."""
    ex = data.examples
    labels = np.asarray(ex.label_names, dtype=object)[ex.labels] if ex.labels is not None else None
    c = cfg.continual
    wants_domains = any(s.domains is not None or any(d.domains for d in s.drift) for s in c.stages)
    if not wants_domains:
        return labels, list(ex.label_names or []), None, []
    column = c.domain_column or cfg.data.client_column
    if column == cfg.data.client_column and ex.groups is not None:
        domains = ex.groups
    else:  # the same rows read again, with the domain column beside them
        task_cls = TASKS.get(cfg.task.name)
        try:
            domains = load_examples(cfg.data.model_copy(update={"client_column": column}),
                                    needs_labels=task_cls.needs_labels, seed=cfg.federation.seed,
                                    chat=task_cls.reads_chat, images=task_cls.reads_images).groups
        except DataError as e:
            raise ConfigError(f"continual.domain_column: {str(e).removeprefix('data.client_column: ')}") from None
    return labels, list(ex.label_names or []), np.asarray(domains), sorted(set(domains.tolist()))


def _check_known(values: list[str], known: list[str], where: str, what: str) -> None:
    unknown = [v for v in values if v not in known]
    if unknown:
        plural = {"class": "classes"}.get(what, f"{what}s")
        raise ConfigError(f"{where}: {unknown[0]!r} is not a {what} of the data; its {plural} are: "
                          f"{', '.join(map(repr, known[:20]))}{' …' if len(known) > 20 else ''}")


def plan_stages(cfg, data) -> StagePlan:
    """Each stage's rows, checked against the data: a class or domain no example has, a client the partition does not
    have, or a stage no present client has a row of, fails here (before any model loads), naming the key."""
    c = cfg.continual
    labels, label_names, domains, domain_values = _values(cfg, data)
    n = len(data.clients)

    def selector(where: str, classes, domains_wanted):
        if classes is not None:
            _check_known(classes, label_names, f"{where}.classes", "class")
            wanted = np.isin(labels, classes)
        elif domains_wanted is not None:
            _check_known(domains_wanted, domain_values, f"{where}.domains", "domain")
            wanted = np.isin(domains, domains_wanted)
        else:
            return lambda idx: np.asarray(idx, dtype=np.int64)
        return lambda idx: np.asarray(idx, dtype=np.int64)[wanted[np.asarray(idx, dtype=np.int64)]]

    later = {cid for s in c.stages for cid in s.join}
    present: set[int] = set(range(n)) - later
    plan = StagePlan([], [], [], [], [], [])
    random = Randomness(cfg.federation.seed)
    for i, st in enumerate(c.stages):
        where = f"continual.stages[{i}]"
        for cid in st.join:
            if not 0 <= cid < n:
                raise ConfigError(f"{where}.join: client {cid} does not exist (the data has {n} clients, 0 … {n - 1})")
        present |= set(st.join)
        own = selector(where, st.classes, st.domains)
        drifted: dict[int, Any] = {}
        for d_i, d in enumerate(st.drift):
            for cid in d.clients:
                if not 0 <= cid < n:
                    raise ConfigError(f"{where}.drift[{d_i}].clients: client {cid} does not exist (the data has {n} "
                                      f"clients, 0 … {n - 1})")
                if cid not in present:
                    raise ConfigError(f"{where}.drift[{d_i}].clients: client {cid} has not joined by this stage")
                drifted[cid] = selector(f"{where}.drift[{d_i}]", d.classes, d.domains)
        ids = sorted(present)
        train = {cid: drifted.get(cid, own)(data.clients[cid].train) for cid in ids}
        test = {cid: drifted.get(cid, own)(data.clients[cid].test) for cid in ids}
        with_rows = [cid for cid in ids if len(train[cid])]
        if len(with_rows) < max(cfg.federation.min_clients, 1):
            raise ConfigError(f"{where}: {len(with_rows)} of its {len(ids)} clients have training rows of it, fewer "
                              f"than federation.min_clients ({cfg.federation.min_clients})")
        if cfg.privacy.mode == "client" and len(with_rows) < n:
            raise ConfigError(f"{where}: privacy.mode client: {len(with_rows)} of the {n} clients can be sampled in "
                              f"this stage (the others have not joined or hold no row of it), so clients are sampled "
                              f"at a higher rate than the accountant assumes (of all {n})")
        held = own(data.test)
        if not len(held):
            raise ConfigError(f"{where}: the held-out set has no example of it (data.test_fraction "
                              f"{cfg.data.test_fraction:g}), so nothing could score it")
        k = c.eval_examples
        if k is not None and k < len(held):
            held = np.sort(random.rng("continual_eval", i).choice(held, size=k, replace=False))
        plan.names.append(st.name)
        plan.rounds.append(st.rounds)
        plan.present.append(ids)
        plan.train.append(train)
        plan.test.append(test)
        plan.held_out.append(held)
    return plan


@dataclass
class PreparedStages(Prepared):
    plan: Optional[StagePlan] = None


def prepare_continual(cfg) -> PreparedStages:
    """``simulation.prepare`` (data read and partitioned), then the stages planned and checked against the data:
    all before any model loads."""
    if not cfg.continual.stages:
        raise ConfigError("continual.stages: fedfm.continual runs a lifelong federation; no stage is given")
    algorithm = CLIENT_ALGORITHMS.get(cfg.client.algorithm)
    if not (isinstance(algorithm, type) and issubclass(algorithm, LocalTraining)
            and algorithm.__call__ is LocalTraining.__call__):
        raise ConfigError(f"continual.stages: client.algorithm {cfg.client.algorithm!r} trains in its own way, which "
                          "the stages' data and mitigations do not reach; use local, fedprox or scaffold")
    prepared = prepare(cfg)
    return PreparedStages(**vars(prepared), plan=plan_stages(cfg, prepared.data))


class ContinualSimulation(Simulation):
    """A simulation across ``continual.stages`` (see the module doc)."""

    prepare = staticmethod(prepare_continual)  # what `fedfm run` checks before any model loads

    def __init__(self, prepared: PreparedStages, display: Optional[Display] = None, run_dir=None):
        self.plan = prepared.plan if getattr(prepared, "plan", None) is not None else \
            plan_stages(prepared.cfg, prepared.data)
        super().__init__(prepared, run_dir, display)
        self.ctx.continual = ContinualClient(self.ctx, self.cfg.continual.mitigations)
        self.higher_is_better = bool(self.task.needs_labels)
        self.metric = "accuracy" if self.higher_is_better else "loss"
        # the server's own held-out examples of each stage, cut from the one encoding
        self.held = [local_data(self.task, self._encoded, idx, EMPTY) for idx in self.plan.held_out]
        self.stage: Optional[int] = None  # the stage being trained
        self.R: list[list[float]] = []
        self.baseline: Optional[list[float]] = None
        self.stage_rows: list[dict[str, Any]] = []
        self._arrive(0)

    def _setup_model(self, cfg):
        self._encoded = super()._setup_model(cfg)  # every example encoded once; each stage's rows are cut from it
        return self._encoded

    # ------------------------------------------------------------------ the stages
    def _arrive(self, s: int) -> None:
        """Stage ``s``'s data: each client holds its own rows of the stage (none before it joins)."""
        plan, task = self.plan, self.task
        for c in self.data.clients:
            self.local[c.id] = local_data(task, self._encoded, plan.train[s].get(c.id, EMPTY),
                                          plan.test[s].get(c.id, EMPTY))
        self.server.client_sizes = np.array([self.local[c.id].train_rows(task) for c in self.data.clients])

    def reachable(self) -> np.ndarray:
        """The clients a round may sample: those that have joined and have rows of the stage."""
        s = self.stage if self.stage is not None else 0
        return np.array([cid for cid in self.plan.present[s] if len(self.plan.train[s][cid])], dtype=np.int64)

    def run_round(self, rnd: int) -> dict[str, Any]:
        s = self.plan.stage_of(rnd)
        if self.stage is None:  # before any training: b_j, forward transfer's reference
            self._load_global()
            self.baseline = self.score_stages()
        if s != self.stage:
            if self.stage is not None:
                self._end_stage(self.stage)
            self._begin_stage(s)
        row = super().run_round(rnd)
        row.update(stage=s, stage_name=self.plan.names[s])
        return row

    def _begin_stage(self, s: int) -> None:
        if s > 0:
            self.ctx.continual.begin_stage(s)  # on the shared base: O-LoRA's new LoRA
            self.global_flat = self.spec.flat()
        self._arrive(s)
        self.stage = s
        info = self.plan.describe()[s]
        self.display.message(f"stage {s} ({info['name']}): {info['rounds']} rounds, {info['clients']} clients, "
                             f"{info['training']} training rows, {info['held_out']} held-out examples")

    def _end_stage(self, s: int) -> None:
        """Score every stage's held-out examples (R's row s), then each client of the stage ends it on its own data
        with the stage-end global model (replay's buffer, EWC's Fisher)."""
        self._load_global()
        self.R.append(self.score_stages())
        for cid in self.plan.present[s]:
            own = self.local[cid]
            if len(own.train):
                self._load_global()
                self.ctx.load_personal(cid)
                self.ctx.continual.end_stage(cid, own, s)
        self._load_global()
        row = {"stage": s, "name": self.plan.names[s], "round": self.plan.first_round(s) + self.plan.rounds[s] - 1,
               "metric": self.metric, "scores": dict(zip(self.plan.names, self.R[-1])), "R": [list(r) for r in self.R],
               **stage_metrics(self.R, self.higher_is_better, self.baseline)}
        if s == 0:
            row["baseline"] = dict(zip(self.plan.names, self.baseline or []))
        self.stage_rows.append(row)
        self.display.message(f"after stage {s} ({self.plan.names[s]}): {self.metric} "
                             + ", ".join(f"{n} {v:.3f}" for n, v in zip(self.plan.names, self.R[-1]))
                             + f"; average {row['average']:.3f}"
                             + (f", forgetting {row['forgetting']:.3f}, BWT {row['bwt']:.3f}" if s else ""))
        if self.run_dir is not None:
            from ..tracking import atomic_write_text

            atomic_write_text(self.run_dir.path / "continual.jsonl",
                              "".join(json.dumps(r) + "\n" for r in self.stage_rows))

    def score_stages(self) -> list[float]:
        """The global model (loaded) on the server's held-out examples of each stage."""
        bs = self.cfg.eval.batch_size
        return [float(self.task.evaluate(self.model, h.encoded, h.train, bs)[self.metric]) for h in self.held]

    def _after_rounds(self, rows: list[dict[str, Any]]) -> None:
        if self.stage is not None:
            self._end_stage(self.stage)
            if self.run_dir is not None:
                plot_matrix(self.R, self.plan.names, self.metric, self.run_dir.path / "report" / "accuracy_matrix.png")
        super()._after_rounds(rows)

    def _run(self) -> list[dict[str, Any]]:
        rows = super()._run()
        from ..client.continual import OLoRA

        olora = self.ctx.continual.get(OLoRA)
        if olora is not None and self.run_dir is not None and self.run_dir.adapter.is_dir():
            olora.write_adapter(self.run_dir.adapter)  # every stage's LoRA, not the last one alone
        return rows

    def run(self, initial: Optional[bool] = None) -> list[dict[str, Any]]:
        """The stages' rounds. ``initial`` is what ``fedfm run`` passes a driver; the round-0 evaluation follows
        ``eval.initial``, as in any simulation."""
        return super().run()
