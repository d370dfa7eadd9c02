"""Secure aggregation as a stage of the aggregation chain: the sum, computed by SecAgg+ between the clients' parties.

The protocol is ``privacy/secagg.py`` (SecAgg+, Bonawitz et al. 2017 / Bell et al. 2020). This module puts it in the
round. Each sampled client gets its own ``SecAggClient`` party with fresh keys. Everything that needs one update
alone runs on the client's side, before masking: decoding its own codec bytes (so the codec's quantisation applies),
validation (the chain's ``UpdateCheck``), DP clipping and, optionally, its share of the DP noise. The server gets
masked vectors and unmasks their sum only; an outer stage (DP-FedAvg: ``privacy/dp.py``) then adds central noise and
divides, and the server optimizer steps.

What a client masks:
- plain FedAvg: (w_k Δ_k, w_k, clamped fraction) with w_k = n_k / n_max (n_max, the largest client, is public), so
  the unmasked sum gives Σ w_k Δ_k / Σ w_k, the example-weighted mean, the stage's result;
- under DP-FedAvg (the wrapper sets ``updates.clip``): Δ_k clipped to L2 norm C, unweighted, and nothing else; with
  ``secagg.dp_noise: distributed`` (``updates.noise_share``) plus N(0, z²C² / m) with m = ``federation.min_clients``,
  so any m or more survivors carry at least the noise the accountant assumes (a client refuses to help unmask
  fewer); the stage's result is the unmasked sum.

The graph's k and t are chosen per round from Bell et al. 2020's bounds for the roster's size and the stated
fractions of corrupt and dropping clients (``secagg.corrupt_fraction``, ``dropout_fraction``), and the graph itself
is drawn from fresh randomness once the roster is fixed.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch

from ..aggregation import Stage
from ..randomness import Randomness
from .dp import clip, noise_share_std
from .secagg import (GraphBounds, MaskedInput, RingCodec, SecAggAbort, SecAggClient, SecAggRound, UnmaskingRefused,
                     UnmaskingRequest, graph_bounds, harary_parameters)


class SecureClient:
    """Client k's side of a secure round: its protocol party (its own keys) and what it does with its own update
    before masking it: clip it to ``clip`` and add N(0, noise_share²) under DP-FedAvg."""

    def __init__(self, party: SecAggClient, codec: RingCodec, max_examples: int, min_survivors: int,
                 clip: Optional[float] = None, noise_share: Optional[float] = None):
        self.party, self.codec = party, codec
        self.max_examples, self.min_survivors = max_examples, min_survivors
        self.clip, self.noise_share = clip, noise_share

    def contribution(self, flat: torch.Tensor, num_examples: int, seed: int) -> np.ndarray:
        """The ring vector this client masks.

        Under DP-FedAvg: its update clipped to C (plus, with distributed noise, its noise share), and nothing else,
        so that everything the server unmasks is covered by the noise. Without DP: its weighted update w_k Δ_k, then
        two coordinates the server learns only summed: w_k, and the fraction of coordinates clamped to
        ±secagg.clip, both scaled by clip to stay in the ring's range."""
        if not torch.isfinite(flat).all():
            raise ValueError("the update has NaN or Inf values")
        if self.clip is not None:  # DP-FedAvg: the client clips itself; the server will never see Δ_k alone
            vec, _ = clip(flat, self.clip)
            if self.noise_share is not None:
                g = torch.Generator().manual_seed(seed)
                vec = vec + torch.randn(vec.numel(), generator=g, dtype=torch.float64) * self.noise_share
            return self.codec.encode(vec.numpy())
        a = num_examples / self.max_examples
        vec = flat.double().numpy() * a
        b = float((np.abs(vec) > self.codec.clip).mean())
        return self.codec.encode(np.concatenate([vec, [a * self.codec.clip, b * self.codec.clip]]))

    def unmasking(self, request: UnmaskingRequest):
        """Reveal shares only for a sum that carries enough noise: with distributed noise, at least
        ``federation.min_clients`` masked inputs, each with its share (else the server would unmask a sum with less
        noise than the accountant assumes)."""
        if self.noise_share is not None and len(request.survivors) < self.min_survivors:
            raise UnmaskingRefused(f"client {self.party.u} refuses Unmasking: only {len(request.survivors)} masked "
                                   f"inputs carry noise shares, fewer than federation.min_clients={self.min_survivors}")
        return self.party.unmasking(request)


def ring_clip(cfg, mechanism=None) -> float:
    """What each masked coordinate is clamped to: ``secagg.clip``; else under DP-FedAvg C (a clipped update's
    coordinates are within C), plus 6σ_s for a noise share of std σ_s (exceeded with probability ~2e-9); else 1."""
    sa = cfg.secagg
    if sa.clip is not None:
        return sa.clip
    if mechanism is None:
        return 1.0
    C = float(cfg.privacy.clip)
    share = noise_share_std(float(mechanism.noise_multiplier), C, cfg.federation.min_clients)
    return C + (6 * share if sa.dp_noise == "distributed" else 0.0)


def check_graph(cfg, per_round: int) -> None:
    """Refuse, before any model loads, a ``secagg.neighbours``/``secagg.threshold`` that Bell et al. 2020's bounds do
    not make safe for the planned round size and the stated ``secagg.corrupt_fraction``/``dropout_fraction``."""
    from ..errors import ConfigError

    sa = cfg.secagg
    if per_round < 2:
        return
    try:
        b = graph_for(sa, per_round)
    except ValueError as e:
        raise ConfigError(f"secagg.corrupt_fraction: {e}; sample more clients per round, or state a lower "
                          f"fraction") from None
    if sa.neighbours is None:
        return
    if b.security > 2.0 ** -sa.security_bits or b.correctness > 2.0 ** -sa.correctness_bits:
        raise ConfigError(
            f"secagg.neighbours={sa.neighbours}, secagg.threshold={b.t}: with {per_round} clients a round, "
            f"{b.corrupt} of them corrupt (secagg.corrupt_fraction={sa.corrupt_fraction:g}) and {b.dropouts} dropping "
            f"out (secagg.dropout_fraction={sa.dropout_fraction:g}), a round leaks more than the sum with probability "
            f"up to {b.security:.3g} (allowed 2^-{sa.security_bits}) and aborts with up to {b.correctness:.3g} "
            f"(allowed 2^-{sa.correctness_bits}); leave secagg.neighbours unset to have k and t chosen")


def graph_for(sa, n: int) -> GraphBounds:
    """This round's (k, t) and their failure bounds: the configured ones, or the sparsest safe ones."""
    if sa.neighbours is None:
        return harary_parameters(n, sa.corrupt_fraction, sa.dropout_fraction, sa.security_bits, sa.correctness_bits)
    k = min(int(sa.neighbours), n - 1)
    t = int(sa.threshold) if sa.threshold is not None else k // 2 + 1
    return graph_bounds(n, k, t, sa.corrupt_fraction, sa.dropout_fraction)


class LocalParties:
    """The sampled clients' protocol parties in this process (a simulation): each its own ``SecureClient`` with its
    own keys; what a client does before masking (its ``UpdateCheck``, clip, noise share) runs in its party. A
    deployment gives ``SecureSum.parties`` one whose parties are on the clients' machines (``deploy.flower``)."""

    def __init__(self, stage: "SecureSum", rnd: SecAggRound, u):
        self.stage, self.u = stage, u
        self.clients = {c: SecureClient(SecAggClient(c, rnd.config), rnd.codec, stage.max_examples,
                                        stage.min_survivors, u.clip, u.noise_share) for c in rnd.config.clients}

    def advertise_keys(self) -> list:
        return [c.party.advertise_keys() for c in self.clients.values()]

    def share_keys(self, requests: dict) -> list:
        return [self.clients[c].party.share_keys(req) for c, req in requests.items()]

    def masked_inputs(self, requests: dict, results) -> tuple[list[MaskedInput], list[dict]]:
        """Each client that trained masks its own checked contribution; one that failed, or whose own check rejects
        its update, is dropped before masking."""
        masked, dropped = [], []
        for r in results:
            if r.error is not None:  # crashed, refused or straggled after ShareKeys: dropped before masking
                dropped.append({"id": r.client_id, "error": r.error})
                continue
            try:
                flat, _ = self.stage.check(r)
                x = self.clients[r.client_id].contribution(flat, r.num_examples,
                                                           self.stage.random.seed("noise_share", self.u.rnd,
                                                                                  r.client_id))
            except Exception as e:  # the client's own validation: it does not send a masked input
                dropped.append({"id": r.client_id, "error": f"rejected by the client before masking: {e}"})
                continue
            masked.append(self.clients[r.client_id].party.masked_input_collection(requests[r.client_id], x))
        return masked, dropped

    def unmasking(self, requests: dict) -> tuple[list, list[dict]]:
        replies, dropped = [], []
        for c, req in requests.items():
            try:
                replies.append(self.clients[c].unmasking(req))
            except UnmaskingRefused as e:
                dropped.append({"id": c, "error": str(e)})
        return replies, dropped


class SecureSum(Stage):
    """SecAgg+ (Bell et al. 2020), one instance per round over the sampled clients; its result is the unmasked
    weighted mean, or under DP-FedAvg (``updates.clip`` set) the unmasked clipped sum, for the wrapper to noise and
    divide."""

    def __init__(self, cfg, check, max_examples: int, seed: int, mechanism=None):
        self.cfg, self.check = cfg, check
        self.random = Randomness(seed, cfg.privacy.mode, cfg.privacy.randomness == "secret")
        self.max_examples = max(int(max_examples), 1)
        self.min_survivors = cfg.federation.min_clients
        self.clip = ring_clip(cfg, mechanism)
        self.parties = LocalParties  # (stage, round, updates) -> the round's parties: here, or on the clients' machines

    def __call__(self, state, u, weights):
        """``u.results``: the round's ClientResults (errors included: they completed ShareKeys and then dropped)."""
        result, info, dropped = self._sum(u)
        gone = {d["id"] for d in dropped}
        accepted = [(r, {}) for r in u.results if r.error is None and r.client_id not in gone]
        return state, result, {**info, "dropped": dropped, "accepted": accepted}

    def _sum(self, u) -> tuple[Optional[torch.Tensor], dict[str, Any], list[dict]]:
        sa, t0, results = self.cfg.secagg, time.perf_counter(), u.results
        roster = sorted(int(r.client_id) for r in results)
        dropped: list[dict] = []
        info: dict[str, Any] = {"secagg_clients": len(roster)}
        if len(roster) < 2:  # one client's "sum" is its update: nothing may be unmasked
            dropped = [{"id": r.client_id, "error": r.error or "alone in the round: secure aggregation needs 2 clients"}
                       for r in results]
            return None, self._nothing(info, "fewer than 2 sampled clients"), dropped
        # the sum of this round's len(roster) inputs, each coordinate within ±clip, must fit the ring
        codec = RingCodec.for_sum(self.clip, len(roster), sa.bits)
        # the graph: (k, t) for this roster, drawn from fresh randomness only now that the roster is fixed, so no
        # client can know in advance where it will sit (seeded only under privacy.randomness: seeded)
        try:
            g = graph_for(sa, len(roster))
        except ValueError as e:  # too few clients this round for any safe graph (a small Poisson sample): no sum
            dropped = [{"id": r.client_id, "error": r.error or f"not aggregated: {e}"} for r in results]
            return None, self._nothing(info, str(e)), dropped
        info.update(secagg_k=g.k, secagg_t=g.t, secagg_security_bound=g.security, secagg_abort_bound=g.correctness)
        # under DP only the clipped (noised) update is masked; without, + the two summed-only coordinates
        dim = u.spec.numel + (0 if u.clip is not None else 2)
        rnd_ = SecAggRound(roster, dim=dim, codec=codec, k=g.k, t=g.t,
                           graph_seed=self.random.seed("secagg_graph", u.rnd), session=b"fedfm round %d" % u.rnd)
        parties = self.parties(self, rnd_, u)
        try:
            keys = rnd_.advertise_keys(parties.advertise_keys())
            shares = rnd_.share_keys(parties.share_keys(keys))
            masked, gone = parties.masked_inputs(shares, results)
            dropped += gone
            asks = rnd_.masked_input_collection(masked)
            replies, refused = parties.unmasking({c: UnmaskingRequest(a.survivors, a.dropped) for c, a in asks.items()})
            dropped += refused
            total = torch.from_numpy(rnd_.unmasking(replies))
        except SecAggAbort as e:
            info.update(secagg_error=str(e), secagg_seconds=time.perf_counter() - t0)
            return None, self._nothing(info), dropped
        rep = rnd_.report
        info.update(secagg_included=len(rep.included), secagg_dropped=len(rep.dropped),
                    secagg_bytes_up=int(sum(sum(p.values()) for p in rep.bytes_sent.values())),
                    secagg_bytes_down=int(sum(sum(p.values()) for p in rep.bytes_received.values())),
                    secagg_step=codec.step, secagg_server_s=float(sum(rep.server_seconds.values())),
                    secagg_seconds=time.perf_counter() - t0)
        n = len(rep.included)
        if u.clip is not None:  # DP-FedAvg's clipped sum (with n noise shares under distributed noise)
            return total, {**info, "noise_shares": n}, dropped
        total, (sum_a, sum_b) = total[:-2], (total[-2:] / codec.clip).tolist()
        info["secagg_clamped_fraction"] = sum_b / max(n, 1)
        if n < self.cfg.federation.min_clients:
            return None, self._nothing(info, f"only {n} masked inputs (federation.min_clients="
                                             f"{self.cfg.federation.min_clients})"), dropped
        if sum_a <= 0:
            return None, self._nothing(info, "the summed weights are not positive"), dropped
        return (total / sum_a).float(), info, dropped

    @staticmethod
    def _nothing(info: dict[str, Any], error: Optional[str] = None) -> dict[str, Any]:
        """The measurements of a round that gives no sum, and why."""
        if error is not None:
            info["secagg_error"] = error
        return {**info, "unchanged": f"secure aggregation gave no update ({info.get('secagg_error')})"}
