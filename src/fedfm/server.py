"""The server side: sample → broadcast bytes → collect results → aggregate → step → evaluate → checkpoint → log.

A ``Server`` holds the global trainable state (a layout of names and shapes, and one flat vector), the sampler, the
aggregation (validation, the sum — plain or secure —, DP-FedAvg, robust reducers), the server optimizer, the privacy
accountant, the checkpoint and the metrics log, and optionally a model of its own with its own held-out set to
evaluate and export the global state. It is built and stepped without any client data: what it knows of the clients
is their number and the example count each reports (what sampling and the accountant need).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch

from .aggregation import RoundInfo, make_aggregator
from .aggregation.server_opt import make_server_optimizer
from .client import CLIENT_ALGORITHMS, ClientResult
from .compression import make_codec
from .display import Display
from .errors import FedfmError, UpdateRejected
from .models.ranks import assign_ranks, lora_rank, view_of
from .randomness import Randomness
from .sampling import make_sampler, num_sampled
from .stateful import Stateful


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


LOWER_IS_BETTER = ("loss", "perplexity")


def federated_evaluation(results: list[ClientResult]) -> dict[str, Any]:
    """What the round's clients reported of the global model on their own test splits: ``fed_<metric>`` the mean
    weighted by each client's test examples, ``fed_<metric>_worst10`` the mean of the worst 10% of clients."""
    scored = [r for r in results if r.error is None and r.metrics.get("fed_examples")]
    if not scored:
        return {}
    n = np.array([float(r.metrics["fed_examples"]) for r in scored])
    out: dict[str, Any] = {"fed_clients": len(scored), "fed_examples": int(n.sum())}
    for key in sorted({k for r in scored for k in r.metrics if k.startswith("fed_") and k != "fed_examples"}):
        vals = [float(r.metrics[key]) for r in scored if key in r.metrics]
        if len(vals) != len(scored):
            continue
        out[key] = float(np.dot(n, vals) / n.sum())
        out[f"{key}_worst10"] = worst_fraction_mean(vals, 0.1, not key.endswith(LOWER_IS_BETTER))
    return out


Evaluation = Callable[[int], dict]  # round -> metrics (the global state is already in the evaluating model)


class Server:
    """The server side of a run, built from the config, the layout of the shared state and its initial values.

    ``client_sizes``: the training example count each client reports (its length is the number of clients);
    ``model``: optionally the server's own model (``evaluation.ServerModel``), which evaluates the global state on
    the server's own held-out set and writes the final adapter; ``evaluations``: further metrics to log at an
    evaluation round (a simulation adds the clients' local test sets); ``parts``: further stateful parts whose state
    goes into the checkpoint (a simulation's schedule and client state store).
    """

    def __init__(self, cfg, layout, initial: torch.Tensor, client_sizes: np.ndarray, *, run_dir=None,
                 display: Optional[Display] = None, model=None, mechanism=None, sample_dp=None):
        self.cfg, self.spec = cfg, layout
        self.run_dir, self.display, self.model = run_dir, display or Display(), model
        self.client_sizes = np.asarray(client_sizes)
        n = len(self.client_sizes)
        self.random = Randomness.from_config(cfg)  # every draw of the server, by purpose
        self.codec = make_codec(cfg.codec.name)
        self.aggregator = make_aggregator(cfg)
        self.server_opt = make_server_optimizer(cfg)
        self.sampler = make_sampler(cfg.federation.sampling)
        self.ranks = None if cfg.adapter.rank_per_client is None else \
            assign_ranks(cfg.adapter.rank_per_client, n, cfg.federation.seed)
        self.lora_rank = lora_rank(layout)
        algorithm = CLIENT_ALGORITHMS.get(cfg.client.algorithm)
        self.extra_names = algorithm.extra_names
        self.algo_server = algorithm.server_side(layout, self.codec, n)  # the algorithm's server half (SCAFFOLD's c)
        self.evaluations: list[Evaluation] = []
        self.parts: dict[str, Stateful] = {}
        self._privacy(mechanism, sample_dp, n)
        self.global_flat = initial.clone()
        self.global_version = 0  # server steps taken in this process (keys the payload cache)
        self._payload_cache: dict = {}
        self.start_round = 1
        self._all_crashed = False

    def _privacy(self, mechanism, sample_dp, n: int) -> None:
        """Client-level DP-FedAvg (its accountant), sample-level DP-SGD (what each client reports of its own
        accountant), secure aggregation."""
        cfg = self.cfg
        if mechanism is None and cfg.privacy.mode == "client":
            from .privacy.accountant import mechanism as make_mechanism

            mechanism = make_mechanism(cfg, n)
        self.mechanism, self.dp = mechanism, None
        if self.mechanism is not None:
            from .privacy.dp import DPFedAvg

            m = self.mechanism
            self.dp = DPFedAvg(cfg.privacy, m.noise_multiplier, m.per_round, cfg.federation.seed,
                               secret=self.random.secret)
            self.display.message(
                f"privacy: client-level DP-FedAvg, {m.sampling} sampling q={m.q:.4g} ({m.per_round} of "
                f"{m.num_clients} clients), noise multiplier z={m.noise_multiplier:.4g}, clip C={cfg.privacy.clip:g}; "
                f"{m.accountant.upper()} accountant: ε={m.epsilon(cfg.federation.rounds, cfg.privacy.delta):.4g} "
                f"at δ={cfg.privacy.delta:g} after {cfg.federation.rounds} rounds; {_randomness(cfg)}")
        # sample-level DP: the mechanism, and what each client reported of its own accountant (ε, steps so far)
        self.sample_dp, self.sample_eps, self.sample_steps = sample_dp, {}, {}
        if self.sample_dp is not None:
            sd, p = self.sample_dp, cfg.privacy
            qs = [sd.rate(k) for k in range(len(sd.sizes))]
            self.display.message(
                f"privacy: sample-level DP-SGD in every client, Poisson batches q_k={min(qs):.3g}…{max(qs):.3g}, "
                f"noise multiplier z={sd.noise_multiplier:.4g}, per-example clip C={p.clip:g}; {p.accountant.upper()} "
                f"accountant: a client sampled in all {cfg.federation.rounds} rounds reaches at most "
                f"ε={sd.worst_epsilon(cfg.federation.rounds, p.delta):.4g} at δ={p.delta:g}; {_randomness(cfg)}")
        self.secure = None  # secagg.enabled: the sum is computed by SecAgg+ between the clients' own parties
        if cfg.secagg.enabled:
            from .privacy.secure import SecureAggregation

            self.secure = SecureAggregation(cfg, self.spec, self.dp, int(self.client_sizes.max()), cfg.federation.seed)
            sa = cfg.secagg
            k = f"{sa.neighbours} neighbours" if sa.neighbours is not None else \
                f"neighbours chosen per round for ≤{sa.corrupt_fraction:g} corrupt and ≤{sa.dropout_fraction:g} dropping"
            self.display.message(f"secure aggregation: SecAgg+ over Z_2^{sa.bits}, {k} (a leak at most "
                                 f"2^-{sa.security_bits}, an abort at most 2^-{sa.correctness_bits} a round), "
                                 f"coordinates clamped to ±{self.secure.clip:g}; the server sees masked vectors and "
                                 f"their sum (honest-but-curious server)")

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    # ------------------------------------------------------------------ state
    def _stateful_parts(self) -> dict[str, Any]:
        """Each checkpoint key and the part whose ``state_dict`` it holds: the keys are named here only."""
        return {"aggregator": self.aggregator, "server_opt": self.server_opt, "client_algorithm": self.algo_server,
                "privacy": self.dp if self.dp is not None else Stateful(), **self.parts}

    def checkpoint_state(self, rnd: int) -> dict[str, Any]:
        return {"round": rnd, "names": self.spec.names, "global": self.global_flat.clone(),
                **{key: part.state_dict() for key, part in self._stateful_parts().items()},
                "sample_dp": {"eps": dict(self.sample_eps), "steps": dict(self.sample_steps)}}

    def load_checkpoint_state(self, ck: dict[str, Any]) -> None:
        if ck["names"] != self.spec.names:
            raise FedfmError("checkpoint does not match this config's trainable parameters (was the config changed?)")
        self.global_flat = ck["global"].clone()
        for key, part in self._stateful_parts().items():
            part.load_state_dict(ck.get(key, {}))
        sdp = ck.get("sample_dp", {})
        self.sample_eps, self.sample_steps = dict(sdp.get("eps", {})), dict(sdp.get("steps", {}))
        self.start_round = ck["round"] + 1

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, rnd: int = 0) -> dict[str, Any]:
        """The global state on the server's own held-out set (if it has one), then any further evaluations."""
        out: dict[str, Any] = {}
        if self.model is not None:
            metrics, records = self.model.evaluate(self.global_flat)
            out.update(metrics)
            if records and self.run_dir is not None:
                self.run_dir.write_generations(rnd, records)
        for evaluation in self.evaluations:
            out.update(evaluation(rnd))
        return out

    def evaluation_due(self, rnd: int) -> bool:
        """``eval.every`` rounds, and the last one."""
        every = self.cfg.eval.every
        return bool(every) and (rnd % every == 0 or rnd == self.cfg.federation.rounds)

    def federated_due(self, rnd: int) -> bool:
        """Whether the round's clients also score the global model on their own test splits (eval.federated)."""
        return self.cfg.eval.federated and self.evaluation_due(rnd)

    # ------------------------------------------------------------------ one round
    def num_sampled(self) -> int:
        return num_sampled(self.cfg.federation, self.num_clients)

    def sample(self, rng: np.random.Generator, k: int, candidates: np.ndarray) -> np.ndarray:
        """``k`` of the ``candidates`` by ``federation.sampling``."""
        if len(candidates) == 0:
            return candidates
        return self.sampler(rng, k, candidates, self.client_sizes)

    def view(self, cid: int):
        """What client ``cid`` receives and sends (LoRA cut to its rank)."""
        return view_of(self.spec, self.ranks, cid)

    def broadcast(self, rnd: int, cid: int) -> tuple[bytes, dict[str, bytes]]:
        """The encoded global state (cut to the client's LoRA rank) and the client algorithm's extras."""
        view = self.view(cid)
        key = (rnd, getattr(view, "rank", None), self.global_version)
        if key not in self._payload_cache:  # encode once per round, global version and rank
            if len(self._payload_cache) > 32:
                self._payload_cache.clear()
            self._payload_cache[key] = (self.codec.encode(view.restrict(self.spec.unflatten(self.global_flat))),
                                        self.algo_server.extras(rnd))
        return self._payload_cache[key]

    def decode_result(self, res: ClientResult) -> tuple[torch.Tensor, dict]:
        """Validate and decode one result (raises UpdateRejected)."""
        view = self.view(res.client_id)
        delta = view.expand(self.codec.decode(res.update, view))
        if res.num_examples <= 0:
            raise UpdateRejected(f"num_examples must be positive, got {res.num_examples}")
        bound = self.cfg.server.max_update_norm
        if bound is not None:
            norm = float(torch.sqrt(sum(t.double().pow(2).sum() for t in delta.values())))
            if norm > bound:
                raise UpdateRejected(f"L2 norm {norm:.4g} above server.max_update_norm={bound:g}")
        decoded_extras = {}
        for name in self.extra_names:
            if name not in res.extras:
                raise UpdateRejected(f"missing {name!r} (client.algorithm {self.cfg.client.algorithm!r} sends it)")
            decoded_extras[name] = self.codec.decode(res.extras[name], self.spec)
        return self.spec.flatten(delta), decoded_extras

    def aggregate_results(self, rnd: int, results: list[ClientResult], weights: Optional[list[float]] = None,
                          fixed_denominator: Optional[int] = None) -> dict[str, Any]:
        """Validate the results, aggregate the usable ones, step the server optimizer, evaluate when due.

        ``weights`` (one per result) replace the example counts; with ``fixed_denominator`` K the aggregate is
        Σ w_k Δ_k / K instead of Σ w_k Δ_k / Σ w_k (FedBuff's staleness-scaled mean; an update rejected by validation
        counts as zero, it does not shrink K).
        """
        cfg = self.cfg
        if self.secure is not None:
            return self._aggregate_securely(rnd, results)
        accepted: list[tuple[ClientResult, torch.Tensor, float]] = []
        accepted_extras: list[tuple[ClientResult, dict]] = []
        dropped: list[dict[str, Any]] = []
        for i, res in enumerate(results):
            if res.error is not None:
                dropped.append({"id": res.client_id, "error": res.error})
                continue
            try:
                flat, decoded_extras = self.decode_result(res)
            except UpdateRejected as e:
                dropped.append({"id": res.client_id, "error": f"rejected: {e}"})
                continue
            accepted.append((res, flat, float(res.num_examples) if weights is None else float(weights[i])))
            accepted_extras.append((res, decoded_extras))

        row: dict[str, Any] = {"round": rnd}
        if self.dp is not None or len(accepted) >= cfg.federation.min_clients:
            if self.dp is not None:  # DP-FedAvg releases a noised update every round, however many clients answered
                updates = torch.stack([d for _, d, _ in accepted]) if accepted else torch.zeros(0, self.spec.numel)
                delta, info = self.dp(updates, self.spec.numel, rnd)
                row.update(info, epsilon=self.mechanism.epsilon(rnd, cfg.privacy.delta), delta=cfg.privacy.delta)
            else:
                updates = torch.stack([d for _, d, _ in accepted])
                w = torch.tensor([x for _, _, x in accepted], dtype=torch.float64)
                ranks = [int(self.ranks[r.client_id]) if self.ranks is not None else self.lora_rank
                         for r, _, _ in accepted]
                delta = self.aggregator(updates, w.float(), RoundInfo(x=self.global_flat, ranks=ranks, spec=self.spec))
                if fixed_denominator is not None:
                    delta = delta * float(w.sum() / fixed_denominator)
        else:
            delta = None
        return self._conclude(rnd, row, results, dropped, delta, accepted_extras, [r for r, _, _ in accepted],
                              f"only {len(accepted)} client(s) returned a usable update "
                              f"(federation.min_clients={cfg.federation.min_clients})")

    def _aggregate_securely(self, rnd: int, results: list[ClientResult]) -> dict[str, Any]:
        """The secure-sum stage: each client's party decodes, checks, clips (and noises) its own update and masks
        it; the server gets the unmasked aggregate only (privacy/secure.py)."""
        row: dict[str, Any] = {"round": rnd}
        delta, info, dropped = self.secure.aggregate(rnd, results, lambda res: self.decode_result(res)[0])
        row.update(info)
        if self.dp is not None:
            row.update(epsilon=self.mechanism.epsilon(rnd, self.cfg.privacy.delta), delta=self.cfg.privacy.delta)
        gone = {d["id"] for d in dropped}
        return self._conclude(rnd, row, results, dropped, delta, [],
                              [r for r in results if r.error is None and r.client_id not in gone],
                              f"secure aggregation gave no update ({info.get('secagg_error')})")

    def _conclude(self, rnd: int, row: dict[str, Any], results: list[ClientResult], dropped: list[dict[str, Any]],
                  delta: Optional[torch.Tensor], accepted_extras: list, accepted: list[ClientResult],
                  why_not: str) -> dict[str, Any]:
        """Step the server optimizer with ``delta`` (None: the round changes nothing, and says why)."""
        if delta is not None:
            self.global_flat = self.server_opt.step(self.global_flat, delta)
            self.global_version += 1
            self.algo_server.absorb(accepted_extras)
            told = [r for r in accepted if "train_loss" in r.metrics]  # withheld under DP (privacy.SENT_METRICS)
            if told:
                n = sum(float(r.num_examples) for r in told)
                row["train_loss"] = float(sum(r.metrics["train_loss"] * r.num_examples for r in told) / n)
        else:
            self.display.message(f"round {rnd}: {why_not}; global model unchanged")
        row["aggregated"] = delta is not None
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
        if self.evaluation_due(rnd):
            row.update(self.evaluate(rnd))
            row.update(federated_evaluation(results))
        # what travelled up: the codec's bytes, or under secagg every protocol message (masked vectors included)
        row["bytes_up"] = int(row.pop("secagg_bytes_up", None) or sum(r.nbytes for r in results))
        row["dropped"] = dropped
        self._all_crashed = bool(results) and all(r.crashed for r in results)
        return row

    # ------------------------------------------------------------------ the run's bookkeeping
    def end_round(self, rnd: int, row: dict[str, Any]) -> None:
        """Log the round's row and checkpoint the round atomically."""
        self.log(row)
        if self.run_dir is not None:
            self.run_dir.save_checkpoint(rnd, self.checkpoint_state(rnd), self.cfg.output.keep_checkpoints)

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

    def log(self, row: dict[str, Any]) -> None:
        if self.run_dir is not None:
            self.run_dir.append_metrics(row)
        self.display.round_end(row)

    def save_final(self):
        """The final global state as a standard PEFT adapter directory (or a full model dir for non-peft methods),
        written by the server's own model."""
        assert self.run_dir is not None and self.model is not None
        return self.model.save(self.run_dir, self.global_flat)
