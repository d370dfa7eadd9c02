"""The server loop: sample → broadcast → run clients → aggregate → evaluate → checkpoint → log."""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .aggregation import Updates
from .aggregation.chain import UpdateCheck, build_chain
from .client import ClientContext, ClientResult, make_client
from .clock import SimClock
from .compression import make_codec
from .config import RunConfig
from .data import FederatedData, build_federated_data
from .data.sources import load_examples
from .errors import ClientFailure, ConfigError, FedfmError
from .models.loader import check_model_config
from .models.ranks import assign_ranks, lora_rank
from .runtime import make_runtime
from .runtime.state_store import ClientStateStore
from .randomness import Randomness, derive_seed  # noqa: F401  (derive_seed: re-exported for callers of old)
from .sampling import make_sampler, num_sampled
from .schedules import make_schedule
from .tasks import TASKS
from .tracking import RunDir


class Display:
    """Callbacks the loop calls so a CLI can show progress; this base shows nothing."""

    def partition(self, desc: dict) -> None: ...
    def model(self, info: dict) -> None: ...
    def round_start(self, rnd: int, total: int, n_clients: int) -> None: ...
    def client_done(self, result: ClientResult) -> None: ...
    def round_end(self, row: dict) -> None: ...
    def message(self, text: str) -> None: ...


def _randomness(cfg) -> str:
    if cfg.privacy.randomness == "seeded":
        return ("noise from federation.seed (privacy.randomness: seeded): reproducible, and removable by anyone who "
                "holds the seed")
    return "noise seeded from the OS at each draw (privacy.randomness: secret)"


def sample_clients(fed, num_clients: int, rnd: int) -> np.ndarray:
    """Seeded uniform sampling without replacement (the ``uniform`` sampler with every client a candidate)."""
    from .sampling import Uniform

    rng = Randomness(fed.seed, secret=False).rng("client_sample", rnd)
    return Uniform()(rng, num_sampled(fed, num_clients), np.arange(num_clients), np.ones(num_clients))


def worst_fraction_mean(values: list[float], fraction: float = 0.1, higher_is_better: bool = True) -> float:
    """Mean of the worst ``fraction`` of values (at least one)."""
    k = max(1, int(math.ceil(fraction * len(values))))
    ordered = sorted(values, reverse=not higher_is_better)
    return float(np.mean(ordered[:k]))


@dataclass
class Prepared:
    """Everything built from the config before the model loads (so bad input fails fast)."""

    cfg: RunConfig
    data: FederatedData
    mechanism: Any = None  # client-level DP: sampling, noise multiplier and accountant (privacy.mode: client)
    attack: Any = None  # attack.kind: the malicious clients, their data already poisoned
    sample_dp: Any = None  # sample-level DP-SGD: each client's sampling rate and steps, the noise multiplier


def prepare(cfg: RunConfig) -> Prepared:
    """Check the model reference and load + partition the data; no model weights are touched."""
    check_model_config(cfg.model)
    task_cls = TASKS.get(cfg.task.name)
    if task_cls.needs_labels and cfg.partition.method in ("dirichlet", "shards") and not cfg.data.label_column:
        raise ConfigError(f"partition.method {cfg.partition.method!r} needs data.label_column")
    if not task_cls.needs_labels and cfg.partition.method in ("dirichlet", "shards"):
        raise ConfigError(f"partition.method {cfg.partition.method!r} needs labels; task {cfg.task.name!r} has none "
                          "(use iid, quantity or by_column)")
    if cfg.partition.method == "by_column" and not cfg.data.client_column:
        raise ConfigError("partition.method 'by_column' needs data.client_column (the column naming each example's client)")
    examples = load_examples(cfg.data, needs_labels=task_cls.needs_labels, seed=cfg.federation.seed,
                             chat=task_cls.reads_chat)
    data = build_federated_data(cfg, examples)
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
    return Prepared(cfg=cfg, data=data, mechanism=mech, attack=attack, sample_dp=sample_dp)


class Server:
    """Holds the one shared base and runs the rounds."""

    def __init__(self, prepared: Prepared, run_dir: Optional[RunDir] = None, display: Optional[Display] = None):
        from .models import build_model

        self.cfg = cfg = prepared.cfg
        self.data = prepared.data
        self.run_dir = run_dir
        self.display = display or Display()
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        t0 = time.perf_counter()
        self.bundle = build_model(cfg, self.data.examples, public_texts=self.data.public_texts())
        self.model, self.spec, self.task = self.bundle.model, self.bundle.spec, self.bundle.task
        if cfg.data.tokenized_cache:  # tokenized once, memory-mapped from the cache on the next run
            from .models.loader import cache_root
            from .tasks.cache import encode_cached

            self.encoded, self.tokenized_from_cache = encode_cached(self.task, self.data.examples, cache_root())
        else:
            self.encoded, self.tokenized_from_cache = self.task.encode(self.data.examples), False
        for note in [*self.data.notes, *getattr(self.task, "notes", [])]:  # how the data was read and split, too
            self.display.message(note)
        self.random = Randomness.from_config(cfg)  # every draw of the run, by purpose
        self.eval_indices = self._fixed_sample(self.data.test, cfg.eval.max_examples, "eval_sample")
        n_gen = cfg.eval.generation.num_prompts if hasattr(self.task, "generate") else 0
        self.prompt_indices = self._fixed_sample(self.data.test, n_gen, "prompt_sample") if n_gen else np.zeros(0, dtype=np.int64)
        self.display.model({"trainable": self.spec.numel, "total": sum(p.numel() for p in self.model.parameters()),
                            "seconds": time.perf_counter() - t0, "method": cfg.adapter.method})
        self.codec = make_codec(cfg.codec.name)
        from .attacks import Backdoor, make_attack

        self.attack = prepared.attack if prepared.attack is not None else make_attack(cfg, len(self.data.clients))
        self.backdoor_enc = None
        if isinstance(self.attack, Backdoor):
            self.backdoor_enc = self.task.encode(self.attack.triggered_test(self.data))
        if self.attack.malicious:
            self.display.message(f"attack: {cfg.attack.kind}, {len(self.attack.malicious)} malicious client(s): "
                                 f"{sorted(self.attack.malicious)[:10]}{' …' if len(self.attack.malicious) > 10 else ''}")
        self.mechanism = prepared.mechanism
        if self.mechanism is not None:
            m = self.mechanism
            self.display.message(
                f"privacy: client-level DP-FedAvg, {m.sampling} sampling q={m.q:.4g} ({m.per_round} of "
                f"{m.num_clients} clients), noise multiplier z={m.noise_multiplier:.4g}, clip C={cfg.privacy.clip:g}; "
                f"{m.accountant.upper()} accountant: ε={m.epsilon(cfg.federation.rounds, cfg.privacy.delta):.4g} "
                f"at δ={cfg.privacy.delta:g} after {cfg.federation.rounds} rounds; {_randomness(cfg)}")
        # sample-level DP: the mechanism, and what each client reported of its own accountant (ε, steps so far)
        self.sample_dp, self.sample_eps, self.sample_steps = prepared.sample_dp, {}, {}
        if self.sample_dp is not None:
            sd, p = self.sample_dp, cfg.privacy
            qs = [sd.rate(k) for k in range(len(sd.sizes))]
            self.display.message(
                f"privacy: sample-level DP-SGD in every client, Poisson batches q_k={min(qs):.3g}…{max(qs):.3g}, "
                f"noise multiplier z={sd.noise_multiplier:.4g}, per-example clip C={p.clip:g}; {p.accountant.upper()} "
                f"accountant: a client sampled in all {cfg.federation.rounds} rounds reaches at most "
                f"ε={sd.worst_epsilon(cfg.federation.rounds, p.delta):.4g} at δ={p.delta:g}; {_randomness(cfg)}")
        state_dir = cfg.runtime.state_dir or (run_dir.path / "client_state" if run_dir is not None else None)
        self.store = ClientStateStore(cfg.runtime.cache_clients, state_dir, keep_manifests=cfg.output.keep_checkpoints)
        self.personal = self.bundle.personal
        self.ranks = None if cfg.adapter.rank_per_client is None else \
            assign_ranks(cfg.adapter.rank_per_client, len(self.data.clients), cfg.federation.seed)
        self.ctx = ClientContext(cfg=cfg, model=self.model, spec=self.spec, task=self.task, encoded=self.encoded,
                                 data=self.data, codec=self.codec, store=self.store, personal=self.personal,
                                 personal_init=self.personal.flat(), ranks=self.ranks, sample_dp=self.sample_dp)
        self.client_algo = make_client(self.ctx)
        self.algo_server = type(self.client_algo).server_side(self.ctx)  # the algorithm's server half (SCAFFOLD's c)
        self.runtime = make_runtime(cfg, self.client_algo)
        for note in getattr(self.runtime, "notes", []):
            self.display.message(note)
        self.global_flat = self.spec.flat()
        self.global_version = 0  # server steps taken in this process (keys the payload cache)
        self._payload_cache: dict = {}
        self.lora_rank = lora_rank(self.spec)
        self.client_sizes = np.array([len(self.task.rows(self.encoded, c.train)) for c in self.data.clients])
        self.check = UpdateCheck(self.codec, self.spec, self.ctx.view, cfg.server.max_update_norm,
                                 self.client_algo.extra_names, cfg.client.algorithm)
        self.chain = build_chain(cfg, self.check, self.mechanism, int(self.client_sizes.max()), self.random.secret)
        self.chain_state = self.chain.init()  # one nested dict: the server optimizer's moments, DP's clip, …
        if cfg.secagg.enabled:  # the sum is computed by SecAgg+ between the clients' own parties
            from .privacy.secure import ring_clip

            sa = cfg.secagg
            k = f"{sa.neighbours} neighbours" if sa.neighbours is not None else \
                f"neighbours chosen per round for ≤{sa.corrupt_fraction:g} corrupt and ≤{sa.dropout_fraction:g} dropping"
            self.display.message(f"secure aggregation: SecAgg+ over Z_2^{sa.bits}, {k} (a leak at most "
                                 f"2^-{sa.security_bits}, an abort at most 2^-{sa.correctness_bits} a round), "
                                 f"coordinates clamped to ±{ring_clip(cfg, self.mechanism):g}; the server sees masked "
                                 f"vectors and their sum (honest-but-curious server)")
        self.clock = SimClock(cfg.clock, len(self.data.clients), cfg.federation.seed)
        self.sampler = make_sampler(cfg.federation.sampling)
        self.schedule = make_schedule(self)
        self.start_round = 1

    # ------------------------------------------------------------------ state
    def _stateful_parts(self) -> dict[str, Any]:
        """Each checkpoint key and the part whose ``state_dict`` it holds (the aggregation chain's state, a nested
        dict already, is under "aggregation")."""
        return {"client_algorithm": self.algo_server, "schedule": self.schedule, "store": self.store}

    def checkpoint_state(self, rnd: int) -> dict[str, Any]:
        return {"round": rnd, "names": self.spec.names, "global": self.global_flat.clone(),
                "aggregation": self.chain_state,
                **{key: part.state_dict() for key, part in self._stateful_parts().items()},
                "sample_dp": {"eps": dict(self.sample_eps), "steps": dict(self.sample_steps)}}

    def load_checkpoint_state(self, ck: dict[str, Any]) -> None:
        if ck["names"] != self.spec.names:
            raise FedfmError("checkpoint does not match this config's trainable parameters (was the config changed?)")
        self.global_flat = ck["global"].clone()
        self.spec.load_flat(self.global_flat)
        self.chain_state = ck["aggregation"]
        for key, part in self._stateful_parts().items():
            part.load_state_dict(ck.get(key, {}))
        sdp = ck.get("sample_dp", {})
        self.sample_eps, self.sample_steps = dict(sdp.get("eps", {})), dict(sdp.get("steps", {}))
        self.start_round = ck["round"] + 1

    # ------------------------------------------------------------------ evaluation
    def _fixed_sample(self, indices: np.ndarray, k: int | None, purpose: str) -> np.ndarray:
        """The same seeded subset of ``indices`` at every eval (all of them when ``k`` is None or large enough)."""
        if k is None or k >= len(indices):
            return indices
        rng = self.random.rng(purpose)
        return np.sort(rng.choice(indices, size=k, replace=False))

    def evaluate(self, rnd: int = 0) -> dict[str, Any]:
        cfg, task, enc = self.cfg, self.task, self.encoded
        self._load_global()
        out: dict[str, Any] = {}
        for k, v in task.evaluate(self.model, enc, self.eval_indices, cfg.eval.batch_size).items():
            out[f"eval_{k}"] = v
        if len(self.prompt_indices):
            metrics, records = task.generate(self.model, self.prompt_indices, pool=self.data.test)
            out.update({f"eval_{k}": v for k, v in metrics.items()})
            if self.run_dir is not None:
                self.run_dir.write_generations(rnd, records)
        if self.backdoor_enc is not None:  # how often the trigger turns a held-out example into the target label
            n = len(next(iter(self.backdoor_enc.values())))
            if n:
                out["backdoor_success"] = task.evaluate(self.model, self.backdoor_enc, np.arange(n),
                                                        cfg.eval.batch_size)["accuracy"]
        if cfg.eval.per_client:
            out.update(self.evaluate_clients(rnd))
        return out

    def evaluate_clients(self, rnd: int) -> dict[str, Any]:
        """Each client's local test set under the global model; with personal parameters also under the client's
        personalized model; with ``eval.finetune_steps`` also after that many local steps from the global model
        (FedAvg + fine-tuning). Keys: client_<metric>[_personal|_finetuned] (+ _mean, _worst10)."""
        from .client import local_sgd

        cfg, task, enc = self.cfg, self.task, self.encoded
        key, better_high = ("accuracy", True) if task.needs_labels else ("loss", False)
        short = "acc" if key == "accuracy" else key
        per: dict[str, dict[str, float]] = {"": {}}
        if self.personal.names:
            per["_personal"] = {}
        if cfg.eval.finetune_steps:
            per["_finetuned"] = {}

        def score(c) -> float:
            return task.evaluate(self.model, enc, c.test, cfg.eval.batch_size)[key]

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
                local_sgd(self.ctx, c.train, gen, num_steps=cfg.eval.finetune_steps)
                per["_finetuned"][str(c.id)] = score(c)
                self._load_global()
        out: dict[str, Any] = {}
        for suffix, vals in per.items():
            if vals:
                out[f"client_{short}{suffix}"] = vals
                out[f"client_{short}{suffix}_mean"] = float(np.mean(list(vals.values())))
                out[f"client_{short}{suffix}_worst10"] = worst_fraction_mean(list(vals.values()), 0.1, better_high)
        return out

    def _load_global(self) -> None:
        """The global model: the shared global state, personal parameters at their initial values."""
        self.spec.load_flat(self.global_flat)
        if self.personal.names:
            self.personal.load_flat(self.ctx.personal_init)

    # ------------------------------------------------------------------ one round
    def derive_seed(self, *parts: int) -> int:
        return derive_seed(self.cfg.federation.seed, *parts)

    def num_sampled(self) -> int:
        return num_sampled(self.cfg.federation, len(self.data.clients))

    def planned_steps(self, cid: int) -> int:
        """Optimizer steps client ``cid`` will take (for the simulated clock)."""
        ccfg = self.cfg.client
        if ccfg.steps is not None:
            return ccfg.steps
        batches = math.ceil(self.client_sizes[cid] / ccfg.batch_size) * ccfg.epochs
        return max(1, math.ceil(batches / ccfg.grad_accum))  # as local_sgd counts: one last partial accumulation

    def sample(self, rng: np.random.Generator, k: int, t: float, exclude=(), online_only: bool = False) -> np.ndarray:
        """``k`` clients by ``federation.sampling``; online ones only for availability-aware sampling."""
        if online_only or self.sampler.online_only:
            candidates = self.clock.online_clients(t)
        else:
            candidates = np.arange(len(self.data.clients))
        if exclude:
            candidates = np.setdiff1d(candidates, np.fromiter(exclude, dtype=np.int64))
        if len(candidates) == 0:
            return candidates
        return self.sampler(rng, k, candidates, self.client_sizes)

    def wait_for_clients(self, t: float) -> float:
        """With availability-aware sampling, advance simulated time until enough clients are online."""
        if not self.sampler.online_only:
            return t
        need = min(self.cfg.federation.min_clients, len(self.data.clients))
        for _ in range(10_000):
            if len(self.clock.online_clients(t)) >= need:
                return t
            t = self.clock.next_period(t)
        raise FedfmError(f"fewer than federation.min_clients={need} clients were ever online "
                         f"(clock.availability={self.cfg.clock.availability})")

    def broadcast(self, rnd: int, cid: int) -> tuple[bytes, dict[str, bytes]]:
        """The encoded global state (cut to the client's LoRA rank) and the client algorithm's extras."""
        view = self.ctx.view(cid)
        key = (rnd, getattr(view, "rank", None), self.global_version)
        if key not in self._payload_cache:  # encode once per round, global version and rank
            if len(self._payload_cache) > 32:
                self._payload_cache.clear()
            self._payload_cache[key] = (self.codec.encode(view.restrict(self.spec.unflatten(self.global_flat))),
                                        self.algo_server.extras(rnd))
        return self._payload_cache[key]

    def aggregate_results(self, rnd: int, results: list[ClientResult],
                          weights: Optional[list[float]] = None) -> dict[str, Any]:
        """Aggregate the round's results by the chain (validate → sum → … → server optimizer), load the new global
        state, evaluate when due. ``weights`` (one per result) replace the example counts (FedBuff's staleness)."""
        updates = Updates(rnd=rnd, results=results, x=self.global_flat, spec=self.spec)
        self.chain_state, x, measurements = self.chain(self.chain_state, updates, weights)
        accepted, dropped = measurements.pop("accepted", []), measurements.pop("dropped", [])
        why_not = measurements.pop("unchanged", None)
        row: dict[str, Any] = {"round": rnd, **measurements}
        if x is not None:
            self.global_flat = x
            self.global_version += 1
            self.spec.load_flat(self.global_flat)
            self.algo_server.absorb(accepted)
            told = [r for r, _ in accepted if "train_loss" in r.metrics]  # withheld under DP (privacy.SENT_METRICS)
            if told:
                n = sum(float(r.num_examples) for r in told)
                row["train_loss"] = float(sum(r.metrics["train_loss"] * r.num_examples for r in told) / n)
        else:
            self.display.message(f"round {rnd}: {why_not}; global model unchanged")
        row["aggregated"] = x is not None
        return self._finish_row(rnd, row, results, dropped)

    def _finish_row(self, rnd: int, row: dict[str, Any], results: list[ClientResult],
                    dropped: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        if self.sample_dp is not None:  # each client's own accountant; the run's guarantee is the worst client's
            for res in results:
                if "dp_epsilon" in res.metrics:
                    self.sample_eps[res.client_id] = float(res.metrics["dp_epsilon"])
                    self.sample_steps[res.client_id] = int(res.metrics["dp_steps"])
            eps = list(self.sample_eps.values()) or [0.0]
            row.update(epsilon=max(eps), epsilon_median=float(np.median(eps)), epsilon_clients=len(self.sample_eps),
                       delta=cfg.privacy.delta, dp_noise_multiplier=self.sample_dp.noise_multiplier)
        every = cfg.eval.every
        if every and (rnd % every == 0 or rnd == cfg.federation.rounds):
            row.update(self.evaluate(rnd))
        # what travelled up: the codec's bytes, or under secagg every protocol message (masked vectors included)
        row["bytes_up"] = int(row.pop("secagg_bytes_up", None) or sum(r.nbytes for r in results))
        row["dropped"] = dropped
        self._all_crashed = bool(results) and all(r.crashed for r in results)
        return row

    def run_round(self, rnd: int) -> dict[str, Any]:
        return self.schedule.run_round(rnd)

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        rows = []
        if self.start_round == 1 and cfg.eval.initial and cfg.eval.every:
            t0 = time.perf_counter()
            row = {"round": 0, **self.evaluate(0), "wall_s": time.perf_counter() - t0}
            self._log(row)
            rows.append(row)
        for rnd in range(self.start_round, cfg.federation.rounds + 1):
            if self.privacy_spent(rnd):
                break
            self._all_crashed = False
            row = self.run_round(rnd)
            self._log(row)
            if self._all_crashed and self.global_version == 0 and self.start_round == 1:
                first = row["dropped"][0]["error"] if row.get("dropped") else "unknown error"
                raise ClientFailure(f"round {rnd}: every sampled client raised an error before any update was "
                                    f"aggregated, e.g. {first}; stopping (metrics.jsonl lists each client's error)")
            if self.run_dir is not None:
                self.run_dir.save_checkpoint(rnd, self.checkpoint_state(rnd), cfg.output.keep_checkpoints)
            rows.append(row)
        if cfg.eval.membership_audit and rows:
            from .privacy.audit import membership_audit

            audit = {"round": rows[-1]["round"], **membership_audit(self)}
            self.audit = audit
            self.display.message(f"membership inference (loss threshold): AUC {audit['mia_auc']:.3f} on "
                                 f"{audit['mia_members']} training vs {audit['mia_nonmembers']} held-out examples")
            if self.run_dir is not None:
                self.run_dir.write_json("privacy_audit.json", audit)
        if self.run_dir is not None:
            self.save_final()
        self.runtime.close()
        return rows

    def privacy_spent(self, rnd: int) -> bool:
        """With both privacy.noise_multiplier and privacy.target_epsilon: stop before the round that would spend
        more than the target."""
        p = self.cfg.privacy
        if p.target_epsilon is None or p.noise_multiplier is None:
            return False
        if self.sample_dp is not None:  # each client refuses once spent; stop when none has a round left
            sd = self.sample_dp
            if any(sd.epsilon(k, self.sample_steps.get(k, 0) + int(sd.steps[k]), p.delta) <= p.target_epsilon
                   for k in range(len(sd.sizes))):
                return False
            self.display.message(f"privacy budget spent: no client can train another round within "
                                 f"privacy.target_epsilon={p.target_epsilon:g} at δ={p.delta:g}; stopping after "
                                 f"round {rnd - 1}")
            return True
        if self.mechanism is None:
            return False
        eps = self.mechanism.epsilon(rnd, p.delta)
        if eps <= p.target_epsilon:
            return False
        self.display.message(f"privacy budget spent: round {rnd} would reach ε={eps:.4g} > privacy.target_epsilon="
                             f"{p.target_epsilon:g} at δ={p.delta:g}; stopping after round {rnd - 1}")
        return True

    def _log(self, row: dict[str, Any]) -> None:
        if self.run_dir is not None:
            self.run_dir.append_metrics(row)
        self.display.round_end(row)

    def save_final(self) -> Path:
        """The final global state as a standard PEFT adapter directory (or a full model dir for non-peft methods)."""
        from .models.adapters import is_peft

        assert self.run_dir is not None
        self._load_global()
        target = self.run_dir.adapter if is_peft(self.model) else self.run_dir.path / "model"
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        if self.bundle.tokenizer is not None:
            self.bundle.tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target
