"""Federated data: the held-out test set, the clients' partition, and each client's local train/test split."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..randomness import Randomness
from .partition import PartitionSpec, label_counts, partition
from .sources import Examples, load_examples


@dataclass
class ClientData:
    id: int
    name: str
    train: np.ndarray  # global example indices
    test: np.ndarray
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # partition.validation_fraction
    synthetic: dict = field(default_factory=dict)  # data.synthetic: label name -> synthetic rows among train


@dataclass
class FederatedData:
    examples: Examples
    test: np.ndarray  # the global held-out test set
    clients: list[ClientData]
    method: str
    notes: list[str] = field(default_factory=list)  # how the data was read and the held-out set chosen, for the run to print
    public: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # transfer.public_fraction's
    # unlabelled slice, carved before partitioning: no client's own data, and its labels are never used

    def public_texts(self) -> list[str]:
        """The server's own text (the held-out split): what a tokenizer may be trained on without client data."""
        ex = self.examples
        return [ex.texts[i] for i in self.test] if ex.texts is not None else []

    def describe(self) -> dict:
        """What ``partition.json`` holds: per-client sizes and label counts."""
        ex = self.examples
        counts = None
        if ex.labels is not None:
            counts = label_counts([c.train for c in self.clients], ex.labels, ex.num_classes)
        return {
            "method": self.method,
            "num_clients": len(self.clients),
            "label_names": ex.label_names,
            "test_size": int(len(self.test)),
            "notes": list(self.notes),
            "clients": [
                {"id": c.id, "name": c.name, "n_train": int(len(c.train)), "n_test": int(len(c.test)),
                 **({"n_val": int(len(c.val))} if len(c.val) else {}),
                 "label_counts": counts[i] if counts else None, **({"synthetic": c.synthetic} if c.synthetic else {})}
                for i, c in enumerate(self.clients)
            ],
        }


def stratified_split(n: int, labels: np.ndarray | None, fraction: float, rng: np.random.Generator):
    """Split range(n) into (rest, held_out) with ``fraction`` of each class held out."""
    if labels is None:
        perm = rng.permutation(n)
        k = int(round(fraction * n))
        return np.sort(perm[k:]), np.sort(perm[:k])
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.append(idx[: int(round(fraction * len(idx)))])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n), held)
    return rest, held


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def prompt_groups(conversations: list[list[dict]]) -> np.ndarray:
    """One group id per conversation, such that conversations answering the same prompt share a group.

    The prompt of an assistant turn is the user turns before it (normalised: case-folded, single spaces). Two
    conversations that answer the same prompt anywhere, not only in their last turn, are joined (union-find), so a
    model trained on one has never seen an answer to a prompt of the other when they are split apart.
    """
    parent = list(range(len(conversations)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, ...], int] = {}  # prompt -> the first conversation that answers it
    for i, conv in enumerate(conversations):
        users: list[str] = []
        for m in conv:
            if m["role"] == "user":
                users.append(_normalise(m["content"]))
            elif m["role"] == "assistant":
                parent[root(i)] = root(first.setdefault(tuple(users), i))
    return np.unique([root(i) for i in range(len(conversations))], return_inverse=True)[1].reshape(-1)


def grouped_split(groups: np.ndarray, fraction: float, rng: np.random.Generator):
    """Split range(n) into (rest, held_out) holding out whole groups, about ``fraction`` of the examples.

    The groups are visited in random order; one joins the held-out set when that brings its size nearer to
    round(fraction·n), until the size is reached.
    """
    groups = np.asarray(groups)
    target = int(round(fraction * len(groups)))
    ids, sizes = np.unique(groups, return_counts=True)
    chosen, total = [], 0
    for g in rng.permutation(len(ids)):
        if total >= target:
            break
        if abs(total + sizes[g] - target) < target - total:
            chosen.append(ids[g])
            total += sizes[g]
    held = np.isin(groups, chosen)
    return np.flatnonzero(~held), np.flatnonzero(held)


def _held_out(cfg, examples: Examples, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(pool, held-out set, a note saying how it was chosen): the source's own split, else ``data.test_fraction`` of
    the examples drawn by prompt for conversations (a prompt never sits on both sides), stratified by label otherwise."""
    n, f = len(examples), cfg.data.test_fraction
    if examples.is_test is not None:  # load_examples said which of the source's splits
        return np.flatnonzero(~examples.is_test), np.flatnonzero(examples.is_test), []
    if examples.messages is not None:
        groups = prompt_groups(examples.messages)
        pool, test = grouped_split(groups, f, rng)
        return pool, test, [f"held-out set: {len(test)} of {n} conversations (data.test_fraction={f:g}), drawn by "
                            f"prompt ({len(np.unique(groups[test]))} of {groups.max() + 1} prompt groups): no prompt "
                            "is answered in both training and the held-out set"]
    pool, test = stratified_split(n, examples.labels, f, rng)
    how = "stratified by label" if examples.labels is not None else "at random"
    return pool, test, [f"held-out set: {len(test)} of {n} examples (data.test_fraction={f:g}, {how})"]


def validation_split(train: np.ndarray, fraction: float, examples: Examples, groups: np.ndarray | None,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): ``fraction`` of one client's training examples kept out of training to score settings on,
    stratified by label, or by prompt group for conversations (a prompt is never answered on both sides)."""
    if not fraction or len(train) < 2:
        return train, np.zeros(0, dtype=np.int64)
    if groups is not None:
        rest, held = grouped_split(groups[train], fraction, rng)
    else:
        rest, held = stratified_split(len(train), examples.labels[train] if examples.labels is not None else None,
                                      fraction, rng)
    if not len(rest):  # a client keeps something to train on
        return train, np.zeros(0, dtype=np.int64)
    return train[rest], train[held]


def _public(cfg, pool: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the pool left to partition, the public set): ``transfer.public_fraction`` of the n examples, drawn at random
    (not by label: its labels are never used) from the pool the held-out set left."""
    fraction = getattr(getattr(cfg, "transfer", None), "public_fraction", 0.0)
    k = min(int(round(fraction * n)), len(pool) - 1) if fraction else 0
    if k <= 0:
        return pool, np.zeros(0, dtype=np.int64)
    perm = Randomness(cfg.federation.seed).rng("transfer_public").permutation(len(pool))
    return np.sort(pool[perm[k:]]), np.sort(pool[perm[:k]])


def build_federated_data(cfg, examples: Examples) -> FederatedData:
    """Hold out the test set, partition the rest into clients, split each client train/test."""
    rng = Randomness(cfg.federation.seed).rng("data_split")
    pool, test, notes = _held_out(cfg, examples, rng)
    pool, public = _public(cfg, pool, len(examples))
    p = cfg.partition
    spec = PartitionSpec(num_clients=p.num_clients, alpha=p.alpha, shards_per_client=p.shards_per_client,
                         power=p.power, min_size=p.min_size)
    labels = examples.labels[pool] if examples.labels is not None else None
    groups = examples.groups[pool] if examples.groups is not None else None
    parts = partition(p.method, labels, groups, spec, seed=cfg.federation.seed, n=len(pool))
    names = (sorted(set(groups.tolist())) if p.method in ("by_column", "by_file") and groups is not None
             else [str(i) for i in range(len(parts))])
    clients = []
    prompts = prompt_groups(examples.messages) if p.validation_fraction and examples.messages is not None else None
    for cid, local in enumerate(parts):
        idx = pool[local]
        crng = Randomness(cfg.federation.seed).rng("local_split", cid)
        perm = crng.permutation(idx)
        k = int(np.floor(p.local_test_fraction * len(idx)))
        if len(idx) - k < 1:
            k = 0
        train, val = validation_split(np.sort(perm[k:]), p.validation_fraction, examples, prompts,
                                      Randomness(cfg.federation.seed).rng("validation_split", cid))
        clients.append(ClientData(id=cid, name=names[cid], train=train, test=np.sort(perm[:k]), val=val))
    if p.validation_fraction:
        notes.append(f"validation: {sum(len(c.val) for c in clients)} of the clients' training examples kept out "
                     f"of training (partition.validation_fraction={p.validation_fraction:g}), each on its own client")
    if len(public):
        notes.append(f"public set: {len(public)} of {len(examples)} examples (transfer.public_fraction="
                     f"{cfg.transfer.public_fraction:g}), carved before partitioning, labels unused")
    return FederatedData(examples=examples, test=test, clients=clients, method=p.method,
                         notes=examples.notes + notes, public=public)
