"""The one protocol every stateful part of a run offers its checkpoint (the client algorithm's server half, the
schedule, the client state store): ``state_dict()`` returns tensors and builtins only (checkpoints load with
``torch.load(weights_only=True)``), ``load_state_dict`` takes them back. This base holds no state; a part with state
overrides both. (The aggregation chain's stages, the server optimizer and DP-FedAvg's clip among them, pass their
state explicitly instead: ``fedfm.aggregation``.)"""
from __future__ import annotations

from typing import Any


class Stateful:
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
