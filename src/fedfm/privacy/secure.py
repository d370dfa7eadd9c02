"""Secure aggregation as a stage of the round: the "(secure) sum" of validate → clip → sum → noise → server optimizer.

The protocol is ``privacy/secagg.py`` (SecAgg+, Bonawitz et al. 2017 / Bell et al. 2020). This module puts it in the
round. Each sampled client gets its own ``SecAggClient`` party with fresh keys. Everything that needs one update
alone runs on the client's side, before masking: decoding its own codec bytes (so the codec's quantisation applies),
validation, DP clipping and, optionally, its share of the DP noise. The server gets masked vectors, sums them,
unmasks the sum and only then divides, adds central noise and steps the server optimizer.

What a client masks:
- plain FedAvg: (w_k Δ_k, w_k) with w_k = n_k / n_max (n_max, the largest client, is public), so the unmasked sum
  gives Σ w_k Δ_k / Σ w_k, the example-weighted mean;
- DP-FedAvg (``privacy.mode: client``): Δ_k clipped to L2 norm C, unweighted; with ``secagg.dp_noise:
  distributed`` plus N(0, z²C² / m) with m = ``federation.min_clients``, so any m or more survivors carry at least
  the noise the accountant assumes.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from . import mechanism_seed
from .secagg import MaskedInput, RingCodec, SecAggAbort, SecAggClient, SecAggRound, UnmaskingRefused, UnmaskingRequest


class SecureClient:
    """Client k's side of a secure round: its protocol party (its own keys) and what it does with its own update
    before masking it."""

    def __init__(self, u: int, rnd: SecAggRound, stage: "SecureAggregation"):
        self.party = SecAggClient(u, rnd.config)
        self.stage, self.codec = stage, rnd.codec

    def contribution(self, flat: torch.Tensor, num_examples: int, seed: int) -> np.ndarray:
        """The ring vector this client masks: its (clipped, noised or weighted) update, then two coordinates the
        server may learn only summed: a = w_k (FedAvg) or 1 if Δ_k was within C (DP), and b = the fraction of
        coordinates clamped to ±secagg.clip; both scaled by clip to stay in the ring's range."""
        st = self.stage
        if not torch.isfinite(flat).all():
            raise ValueError("the update has NaN or Inf values")
        if st.dp is not None:  # DP-FedAvg: the client clips itself; the server will never see Δ_k alone
            vec, a = st.dp.clip(flat)
            if st.distributed_noise:
                g = torch.Generator().manual_seed(seed)
                share = st.dp.z_delta * st.dp.C / st.min_survivors ** 0.5
                vec = vec + torch.randn(vec.numel(), generator=g, dtype=torch.float64) * share
            vec, a = vec.numpy(), float(a)
        else:
            a = num_examples / st.max_examples
            vec = flat.double().numpy() * a
        b = float((np.abs(vec) > self.codec.clip).mean())
        return self.codec.encode(np.concatenate([vec, [a * self.codec.clip, b * self.codec.clip]]))


class SecureAggregation:
    """Runs one SecAgg+ instance per round over the sampled clients and returns the unmasked aggregate."""

    def __init__(self, cfg, spec, dp, max_examples: int, seed: int):
        sa = cfg.secagg
        self.cfg, self.spec, self.dp, self.seed = cfg, spec, dp, seed
        self.max_examples = max(int(max_examples), 1)
        self.distributed_noise = dp is not None and sa.dp_noise == "distributed"
        self.min_survivors = cfg.federation.min_clients
        if sa.clip is not None:
            self.clip = sa.clip
        elif dp is None:
            self.clip = 1.0
        else:  # a clipped update's coordinates are within C; a noise share of std σ_s within 6σ_s but for ~2e-9
            self.clip = dp.C + (6 * dp.z_delta * dp.C / self.min_survivors ** 0.5 if self.distributed_noise else 0.0)
        self.dim = spec.numel + 2  # + the two summed-only coordinates of SecureClient.contribution

    def aggregate(self, rnd: int, results: list, decode) -> tuple[torch.Tensor | None, dict[str, Any], list[dict]]:
        """``results``: the round's ClientResults (errors included: they completed ShareKeys and then dropped);
        ``decode(result)`` is the client's own decoding of its bytes. Returns (delta or None, info, dropped)."""
        from ..server import derive_seed

        sa, t0 = self.cfg.secagg, time.perf_counter()
        roster = sorted(int(r.client_id) for r in results)
        dropped: list[dict] = []
        info: dict[str, Any] = {"secagg_clients": len(roster)}
        if len(roster) < 2:  # one client's "sum" is its update: nothing may be unmasked
            dropped = [{"id": r.client_id, "error": r.error or "alone in the round: secure aggregation needs 2 clients"}
                       for r in results]
            info["secagg_error"] = "fewer than 2 sampled clients"
            if self.dp is not None and not self.distributed_noise:  # DP-FedAvg still releases noise every round
                delta, dp_info = self.dp.release(torch.zeros(self.spec.numel, dtype=torch.float64), 0.0, 0.0, rnd)
                return delta, {**info, **dp_info}, dropped
            return None, info, dropped
        # the sum of this round's len(roster) inputs, each coordinate within ±clip, must fit the ring
        codec = RingCodec.for_sum(self.clip, len(roster), sa.bits)
        rnd_ = SecAggRound(roster, dim=self.dim, codec=codec, k=sa.neighbours, t=sa.threshold,
                           graph_seed=derive_seed(self.seed, 13, rnd), session=b"fedfm round %d" % rnd)
        clients = {u: SecureClient(u, rnd_, self) for u in roster}  # each holds only its own keys
        masked: list[MaskedInput] = []
        try:
            keys = rnd_.advertise_keys(c.party.advertise_keys() for c in clients.values())
            shares = rnd_.share_keys(clients[u].party.share_keys(keys[u]) for u in keys)
            for r in results:
                if r.error is not None:  # crashed, refused or straggled after ShareKeys: dropped before masking
                    dropped.append({"id": r.client_id, "error": r.error})
                    continue
                try:
                    flat = decode(r)
                    x = clients[r.client_id].contribution(flat, r.num_examples,
                                                          mechanism_seed(self.cfg, 17, rnd, r.client_id))
                except Exception as e:  # the client's own validation: it does not send a masked input
                    dropped.append({"id": r.client_id, "error": f"rejected by the client before masking: {e}"})
                    continue
                masked.append(clients[r.client_id].party.masked_input_collection(shares[r.client_id], x))
            asks = rnd_.masked_input_collection(masked)
            replies = []
            for u, ask in asks.items():
                try:
                    replies.append(clients[u].party.unmasking(UnmaskingRequest(ask.survivors, ask.dropped)))
                except UnmaskingRefused as e:
                    dropped.append({"id": u, "error": str(e)})
            total = torch.from_numpy(rnd_.unmasking(replies))
            total, (sum_a, sum_b) = total[:-2], (total[-2:] / codec.clip).tolist()
        except SecAggAbort as e:
            info.update(secagg_error=str(e), secagg_seconds=time.perf_counter() - t0)
            return None, info, dropped
        rep = rnd_.report
        info.update(secagg_included=len(rep.included), secagg_dropped=len(rep.dropped),
                    secagg_bytes_up=int(sum(sum(p.values()) for p in rep.bytes_sent.values())),
                    secagg_bytes_down=int(sum(sum(p.values()) for p in rep.bytes_received.values())),
                    secagg_clamped_fraction=sum_b / max(len(rep.included), 1), secagg_step=codec.step,
                    secagg_server_s=float(sum(rep.server_seconds.values())), secagg_seconds=time.perf_counter() - t0)
        n = len(rep.included)
        if n < self.cfg.federation.min_clients and self.dp is None:
            info["secagg_error"] = f"only {n} masked inputs (federation.min_clients={self.cfg.federation.min_clients})"
            return None, info, dropped
        if self.dp is not None:
            if self.distributed_noise and n < self.min_survivors:  # too little noise in the sum: release nothing
                info["secagg_error"] = (f"only {n} masked inputs carry noise shares, fewer than federation.min_clients="
                                        f"{self.min_survivors}; the sum is not released")
                return None, info, dropped
            delta, dp_info = self.dp.release(total, sum_a, 1.0 - sum_a / n if n else 0.0, rnd,
                                             noise=not self.distributed_noise)
            if self.distributed_noise:
                dp_info["dp_noise_std"] = self.dp.z_delta * self.dp.C * (n / self.min_survivors) ** 0.5 / self.dp.denominator
            info.update(dp_info)
            return delta, info, dropped
        if sum_a <= 0:
            info["secagg_error"] = "the summed weights are not positive"
            return None, info, dropped
        return (total / sum_a).float(), info, dropped
