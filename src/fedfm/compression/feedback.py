"""Error feedback (Seide et al. 2014, 1-bit SGD; Stich et al. 2018, "Sparsified SGD with Memory"): a client sends
C(Δ + e) and keeps e ← Δ + e − C(Δ + e), the part it did not send, in its own state; over rounds the sum of what it
sent follows the sum of its true updates (it differs by the last residual e only).

The residual lives in the client state store (one flat vector per client, under ``RESIDUAL``), so it is spilled to
disk, checkpointed and restored with the client's other state.
"""
from __future__ import annotations

from . import flat_of, state_of

RESIDUAL = "codec.residual"


def encode_with_feedback(codec, delta, view, store, client_id: int, generator=None) -> bytes:
    """``codec.encode(delta + e)``, with the client's residual e read from and written back to ``store``."""
    flat = flat_of(delta)
    stored = store.get(client_id) or {}
    residual = stored.get(RESIDUAL)
    if residual is not None and residual.numel() == flat.numel():
        flat = flat + residual
    data = codec.encode(state_of(flat, view), generator)
    sent = flat_of(codec.decode(data, view))
    store.put(client_id, {**stored, RESIDUAL: (flat - sent).contiguous()})
    return data


def uses_feedback(ccfg, codec) -> bool:
    """``codec.error_feedback``: on by default for the sparse codecs (biased without it), off for the rest."""
    if codec.lossless:
        return False
    return ccfg.error_feedback if ccfg.error_feedback is not None else not codec.carries_state

