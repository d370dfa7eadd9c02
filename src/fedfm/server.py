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

from .aggregation import Updates
from .aggregation.chain import UpdateCheck, build_chain
from .budget import ByteCount
from .client import CLIENT_ALGORITHMS, ClientResult
from .compression import make_codec, make_downlink
from .display import Display
from .errors import FedfmError
from .models.ranks import client_ranks, view_of
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
        self.codec, self.downlink = make_codec(cfg.codec), make_downlink(cfg.codec)  # up, down
        self.sampler = make_sampler(cfg.federation.sampling)
        self.ranks = client_ranks(cfg, n)
        algorithm = CLIENT_ALGORITHMS.get(cfg.client.algorithm)
        self.extra_names = algorithm.extra_names
        self.algo_server = algorithm.server_side(layout, self.downlink, n, cfg)  # its server half (SCAFFOLD's c)
        self.algo_server.bind(cfg, model, lambda: self.global_flat)
        for note in self.algo_server.notes:
            self.display.message(note)
        self.evaluations: list[Evaluation] = []
        self.parts: dict[str, Stateful] = {}
        self._privacy(mechanism, sample_dp, n)
        # the chain checks each update as the algorithm's server half completed it: the client's whole rank view
        self.check = self.algo_server.update_check(UpdateCheck(
            self.codec, layout, lambda cid: view_of(self.spec, self.ranks, cid), cfg.server.max_update_norm,
            self.extra_names, cfg.client.algorithm))
        self.chain = build_chain(cfg, self.check, self.mechanism, int(self.client_sizes.max()), self.random.secret,
                                 step=self.algo_server.server_optimizer)
        self.chain_state = self.chain.init()  # one nested dict: the server optimizer's moments, DP's clip, …
        self.global_flat = initial.clone()
        self.global_version = 0  # server steps taken in this process (keys the payload cache)
        self._payload_cache: dict = {}
        self.start_round = 1
        self._all_crashed = False
        self.bytes = ByteCount(cfg.federation.byte_budget)  # bytes up + down so far, against federation.byte_budget
        self.last_round: Optional[int] = None  # a round known in advance to be the last (the byte budget's)

    def _privacy(self, mechanism, sample_dp, n: int) -> None:
        """What the run says of its privacy: client-level DP-FedAvg's accountant, sample-level DP-SGD (what each
        client reports of its own accountant), secure aggregation (the chain's stages do the work)."""
        cfg = self.cfg
        if mechanism is None and cfg.privacy.mode == "client":
            from .privacy.accountant import mechanism as make_mechanism

            mechanism = make_mechanism(cfg, n)
        self.mechanism = mechanism
        if self.mechanism is not None:
            m = self.mechanism
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
        if cfg.secagg.enabled:  # the sum is computed by SecAgg+ between the clients' own parties
            from .privacy.secure import ring_clip

            sa = cfg.secagg
            k = f"{sa.neighbours} neighbours" if sa.neighbours is not None else \
                f"neighbours chosen per round for ≤{sa.corrupt_fraction:g} corrupt and ≤{sa.dropout_fraction:g} dropping"
            self.display.message(f"secure aggregation: SecAgg+ over Z_2^{sa.bits}, {k} (a leak at most "
                                 f"2^-{sa.security_bits}, an abort at most 2^-{sa.correctness_bits} a round), "
                                 f"coordinates clamped to ±{ring_clip(cfg, self.mechanism):g}; the server sees masked "
                                 f"vectors and their sum (honest-but-curious server)")

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    # ------------------------------------------------------------------ state
    def _stateful_parts(self) -> dict[str, Any]:
        """Each checkpoint key and the part whose ``state_dict`` it holds (the aggregation chain's state, a nested
        dict already, is under "aggregation"): the keys are named here only."""
        return {"client_algorithm": self.algo_server, "bytes": self.bytes, **self.parts}

    def checkpoint_state(self, rnd: int) -> dict[str, Any]:
        return {"round": rnd, "names": self.spec.names, "global": self.global_flat.clone(),
                "shapes": {n: list(s) for n, s in self.spec.shapes.items()},
                "aggregation": self.chain_state,
                **{key: part.state_dict() for key, part in self._stateful_parts().items()},
                "sample_dp": {"eps": dict(self.sample_eps), "steps": dict(self.sample_steps)}}

    def load_checkpoint_state(self, ck: dict[str, Any]) -> None:
        self._check_layout(ck)
        self.global_flat = ck["global"].clone()
        self.chain_state = ck["aggregation"]
        for key, part in self._stateful_parts().items():
            part.load_state_dict(ck.get(key, {}))
        sdp = ck.get("sample_dp", {})
        self.sample_eps, self.sample_steps = dict(sdp.get("eps", {})), dict(sdp.get("steps", {}))
        self.start_round = ck["round"] + 1

    def _check_layout(self, ck: dict[str, Any]) -> None:
        """The checkpoint holds this config's trainable parameters: the same names, in order, with the same shapes
        (a checkpoint written before shapes were recorded is checked by its names and length)."""
        mine = {n: tuple(s) for n, s in self.spec.shapes.items()}
        theirs = {n: tuple(s) for n, s in ck["shapes"].items()} if "shapes" in ck else dict.fromkeys(ck["names"])

        def shape(of: dict, name: str) -> str:
            return f"of shape {of[name]}" if name in of else "absent"

        for name in dict.fromkeys([*mine, *theirs]):
            if name not in mine or name not in theirs or theirs[name] not in (None, mine[name]):
                raise FedfmError(f"checkpoint: trainable parameter {name} is {shape(theirs, name)} there but "
                                 f"{shape(mine, name)} in this config (were model.* or adapter.* changed?)")
        if list(theirs) != list(mine) or ck["global"].numel() != self.spec.numel:
            raise FedfmError(f"checkpoint: its {ck['global'].numel()} values are laid out otherwise than this "
                             f"config's {self.spec.numel} (were model.* or adapter.* changed?)")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, rnd: int = 0) -> dict[str, Any]:
        """The global state on the server's own held-out set (if it has one), then any further evaluations."""
        out: dict[str, Any] = {}
        if self.model is not None:
            metrics, records = self.model.evaluate(self.global_flat)
            out.update(metrics)
            if records and self.run_dir is not None:
                self.run_dir.write_generations(rnd, records)
        out.update(self.algo_server.evaluate(rnd))
        for evaluation in self.evaluations:
            out.update(evaluation(rnd))
        return out

    def evaluation_due(self, rnd: int) -> bool:
        """``eval.every`` rounds, and the last one (``federation.rounds``, or the last the byte budget leaves)."""
        every = self.cfg.eval.every
        return bool(every) and (rnd % every == 0 or rnd in (self.cfg.federation.rounds, self.last_round))

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
        """What client ``cid`` receives and sends (LoRA cut to its rank; split learning: its client-side part)."""
        return self.algo_server.view(view_of(self.spec, self.ranks, cid))

    def broadcast(self, rnd: int, cid: int) -> tuple[bytes, dict[str, bytes]]:
        """The encoded global state (cut to the client's LoRA rank) and the client algorithm's extras."""
        own = self.algo_server.payload(rnd, cid)  # an algorithm that sends something else (FedKSeed's pairs)
        if own is not None:
            return own, self.algo_server.extras(rnd)
        view = self.view(cid)
        key = (rnd, getattr(view, "rank", None), self.global_version)
        if key not in self._payload_cache:  # encode once per round, global version and rank
            if len(self._payload_cache) > 32:
                self._payload_cache.clear()
            state = view.restrict(self.spec.unflatten(self.global_flat))
            self._payload_cache[key] = (self.downlink.encode(state), self.algo_server.extras(rnd))
        return self._payload_cache[key]

    def aggregate_results(self, rnd: int, results: list[ClientResult],
                          weights: Optional[list[float]] = None) -> dict[str, Any]:
        """Aggregate the round's results by the chain (validate → sum → … → server optimizer), take the new global
        state, evaluate when due. ``weights`` (one per result) replace the example counts (FedBuff's staleness)."""
        sent = results  # as the clients sent them (what travelled up)
        results, completed = self.algo_server.complete(rnd, results)  # split learning adds the server-side delta
        updates = Updates(rnd=rnd, results=results, x=self.global_flat, spec=self.spec)
        self.chain_state, x, measurements = self.chain(self.chain_state, updates, weights)
        accepted, dropped = measurements.pop("accepted", []), measurements.pop("dropped", [])
        why_not = measurements.pop("unchanged", None)
        row: dict[str, Any] = {"round": rnd, **completed, **measurements}
        if x is not None:
            self.global_flat = x
            self.global_version += 1
            self.algo_server.absorb(accepted)
            told = [r for r, _ in accepted if "train_loss" in r.metrics]  # withheld under DP (privacy.SENT_METRICS)
            if told:
                n = sum(float(r.num_examples) for r in told)
                row["train_loss"] = float(sum(r.metrics["train_loss"] * r.num_examples for r in told) / n)
        else:
            self.display.message(f"round {rnd}: {why_not}; global model unchanged")
        row["aggregated"] = x is not None
        return self._finish_row(rnd, row, sent, dropped)

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
        row["bytes_up"] += int(row.get("split_bytes_up", 0))  # split learning: the activations (and labels) sent
        row["dropped"] = dropped
        # each returning client's part (the dashboard's client table): what it trained on and sent, its own ε under
        # sample-level DP; a schedule adds what it received (``bytes_down``)
        row["client_stats"] = [{"id": int(r.client_id), "examples": int(r.num_examples), "bytes_up": int(r.nbytes),
                                "seconds": r.metrics.get("seconds"), "epsilon": r.metrics.get("dp_epsilon")}
                               for r in results if r.error is None]
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
        model, flat = self.algo_server.exported(self.model, self.global_flat)  # offsite: the owner's full model
        with self.run_dir.writing(model.target(self.run_dir)):
            return model.save(self.run_dir, flat)
