"""A client's own data: its encoded rows and which of its examples it trains and tests on. Nothing else."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class LocalData:
    """One client's data, encoded once: its own rows only (``encoded``), and the indices of its own examples in
    them that it trains on (``train``), keeps for local evaluation (``test``) and for scoring settings (``val``,
    ``partition.validation_fraction``)."""

    encoded: dict[str, torch.Tensor]
    train: np.ndarray
    test: np.ndarray
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def train_rows(self, task) -> int:
        """The example count a result is weighted by: the client's training rows."""
        return int(len(task.rows(self.encoded, self.train)))


def local_data(task, encoded: dict[str, torch.Tensor], train: np.ndarray, test: np.ndarray,
               val: np.ndarray | None = None) -> LocalData:
    """Cut one partition out of an encoding of many examples (simulation: the partitioner's split of one table),
    renumbered so the client holds its own rows and sees no other client's."""
    val = np.zeros(0, dtype=np.int64) if val is None else np.asarray(val, dtype=np.int64)
    mine = np.concatenate([np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64), val])
    rows = torch.as_tensor(task.rows(encoded, mine), dtype=torch.long)
    own = {k: v[rows] for k, v in encoded.items()}
    if "example" in own:  # rows that split one example (text chunks) keep pointing at it, in the client's numbering
        renumber = np.full(int(mine.max()) + 1 if len(mine) else 0, -1, dtype=np.int64)
        renumber[mine] = np.arange(len(mine))
        own["example"] = torch.as_tensor(renumber[own["example"].numpy()])
    n_fit = len(train) + len(test)
    return LocalData(encoded=own, train=np.arange(len(train), dtype=np.int64),
                     test=np.arange(len(train), n_fit, dtype=np.int64), val=np.arange(n_fit, len(mine), dtype=np.int64))


def own_split(examples: int, test_fraction: float = 0.0, rng: np.random.Generator | None = None,
              test_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of one client's own ``examples`` (a client in its own process, built from its own file):
    ``test_fraction`` of them kept for local evaluation; or, with ``test_examples``, the last that many examples (a
    test file of its own, read after the training file)."""
    if test_examples is not None:
        return (np.arange(examples - test_examples, dtype=np.int64),
                np.arange(examples - test_examples, examples, dtype=np.int64))
    order = rng.permutation(examples) if rng is not None else np.arange(examples)
    k = int(round(test_fraction * examples))
    return np.sort(order[k:]), np.sort(order[:k])
