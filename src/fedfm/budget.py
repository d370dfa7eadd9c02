"""``federation.byte_budget``: a run's communication budget in bytes, up and down summed, as the rows count them.

The rows' ``bytes_up`` and ``bytes_down`` are what travelled (the codec's output, an algorithm's extras, SecAgg's
protocol messages, split learning's activations), so the budget counts what they count. ``ByteCount`` keeps the
total and the largest round so far, and is checkpointed with the server's state, so a resumed run goes on from the
same total. Before a round it says whether the round, estimated as the largest round so far, still fits; after it,
whether the next one would (then the round just run is the last, and is evaluated). Rounds of equal size (a fixed
codec and number of clients) are estimated exactly; a round larger than every one before it (more clients sampled
than ever, a heterogeneous LoRA rank, a first-time download) can go over the estimate, and then over the budget: the
run stops there and says by how much.
"""
from __future__ import annotations

from typing import Any, Optional

from .errors import ConfigError
from .stateful import Stateful


def round_bytes(row: dict[str, Any]) -> int:
    """What a round's row says travelled, up and down."""
    return int(row.get("bytes_up", 0) or 0) + int(row.get("bytes_down", 0) or 0)


class ByteCount(Stateful):
    def __init__(self, budget: Optional[int]):
        self.budget = budget
        self.total = 0  # bytes up + down over the run so far
        self.largest = 0  # the largest round so far: the estimate of the next
        self.known = True  # False once loaded from a checkpoint written before the count was kept

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "largest": self.largest, "known": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.largest = int(state.get("total", 0)), int(state.get("largest", 0))
        self.known = bool(state.get("known", False))  # False: a checkpoint written before the count was kept

    def from_rows(self, rows: list[dict[str, Any]]) -> None:
        """The count from a run's rows (resuming from a checkpoint that does not hold it)."""
        sizes = [round_bytes(r) for r in rows if r.get("round", 0) >= 1]
        self.total, self.largest = sum(sizes), max(sizes, default=0)

    # ------------------------------------------------------------------ the rule
    def fits(self, rounds: int = 1) -> bool:
        """Whether ``rounds`` more rounds of the largest size so far stay within the budget (always, without one)."""
        return self.budget is None or self.total + rounds * self.largest <= self.budget

    def count(self, rnd: int, row: dict[str, Any], first: bool) -> None:
        """Add the round's bytes; its row gets ``bytes_total``. ``first``: no round was counted before this one, so
        a round that alone exceeds the budget means the budget cannot hold any round: refused."""
        size = round_bytes(row)
        if first and self.budget is not None and size > self.budget:
            raise ConfigError(f"federation.byte_budget={self.budget:,} bytes is smaller than one round: round {rnd} "
                              f"sent {size:,} bytes ({int(row.get('bytes_up', 0)):,} up, "
                              f"{int(row.get('bytes_down', 0)):,} down); give at least {size:,} or send less per round "
                              f"(codec.name, the adapter, federation.clients_per_round)")
        self.total += size
        self.largest = max(self.largest, size)
        row["bytes_total"] = self.total

    def why_stop(self, rnd: int, rounds: int) -> Optional[str]:
        """After round ``rnd``: why the next round does not run within the budget (None: it fits, or ``rnd`` is the
        last of ``federation.rounds`` anyway)."""
        if self.budget is None or rnd >= rounds or self.fits():
            return None
        if self.total > self.budget:
            return (f"byte budget exceeded: round {rnd} took the total to {self.total:,} bytes, "
                    f"{self.total - self.budget:,} over federation.byte_budget={self.budget:,} (it was larger than "
                    f"any round before it); stopping after round {rnd} of {rounds}")
        return (f"byte budget reached: round {rnd + 1} (estimated at {self.largest:,} bytes, the largest round so far) "
                f"would take the total from {self.total:,} to {self.total + self.largest:,} bytes, over "
                f"federation.byte_budget={self.budget:,}; stopping after round {rnd} of {rounds}")
