"""One client in its own process: built from its own data only, the base model and the task.

It is the same client code a simulation runs for each of its virtual clients (``ClientContext`` + the client
algorithm), with one entry of data instead of many: it takes a ``ClientTask`` (the payload bytes and the round's
settings) and returns a ``ClientResult`` of bytes.

    client = Client.from_config(cfg, "my_site.csv", client_id=3)
    result_bytes = client.handle(task_bytes)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..randomness import Randomness
from . import ClientContext, ClientResult, ClientTask, make_client
from .data import LocalData, own_split
from .wire import result_to_bytes, task_from_bytes


def own_examples(cfg, source: str | Path, test_source: Optional[str | Path] = None):
    """A client's own examples read with the config's column mapping: ``source``, then ``test_source`` (if any)
    after it; and how many of them came from ``test_source`` (None without one). Labels are numbered by
    ``data.label_names`` when set, else by the labels found in both files together."""
    from ..data.sources import concat_examples, load_examples
    from ..tasks import TASKS

    task_cls = TASKS.get(cfg.task.name)

    def read(path):
        return load_examples(cfg.data.model_copy(update={"source": str(path)}), needs_labels=task_cls.needs_labels,
                             seed=cfg.federation.seed, chat=task_cls.reads_chat, images=task_cls.reads_images)

    examples = read(source)
    if test_source is None:
        return examples, None
    test = read(test_source)
    return concat_examples(examples, test), len(test)


class Client:
    """A client party: its own ``LocalData``, the base with the adapter, the task, its own state store."""

    def __init__(self, cfg, bundle, own: LocalData, client_id: int = 0, state_dir: Optional[str | Path] = None,
                 noise_multiplier: Optional[float] = None):
        from ..compression import make_codec, make_downlink
        from ..models.ranks import client_ranks
        from ..runtime.state_store import ClientStateStore

        self.cfg, self.bundle, self.client_id = cfg, bundle, client_id
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.ctx = ClientContext(cfg=cfg, model=bundle.model, spec=bundle.spec, task=bundle.task,
                                 local={client_id: own}, codec=make_codec(cfg.codec), downlink=make_downlink(cfg.codec),
                                 store=ClientStateStore(cfg.runtime.cache_clients, state_dir),
                                 personal=bundle.personal, personal_init=bundle.personal.flat(),
                                 ranks=client_ranks(cfg, cfg.partition.num_clients),  # the server's, seeded
                                 sample_dp=self._sample_dp(cfg, bundle, own, noise_multiplier))
        self.algorithm = make_client(self.ctx)

    def _sample_dp(self, cfg, bundle, own: LocalData, noise_multiplier: Optional[float]):
        """privacy.mode sample: this client's own DP-SGD mechanism (its rate B/n_k, its steps per round) with the
        run's noise multiplier (``privacy.noise_multiplier``, or the one the server derived from the target ε for
        every client); its steps so far live in its state store, so its accountant goes on across rounds."""
        if cfg.privacy.mode != "sample":
            return None
        import numpy as np

        from ..privacy.dpsgd import SampleLevelDP, steps_per_round

        z = noise_multiplier if noise_multiplier is not None else cfg.privacy.noise_multiplier
        if z is None:
            raise ConfigError("privacy.mode 'sample' in a client of its own: the noise multiplier must be given "
                              "(privacy.noise_multiplier, or the one the server derived from privacy.target_epsilon)")
        if self.state_dir is None:
            raise ConfigError("privacy.mode 'sample' in a client of its own needs a state directory, where its "
                              "accountant keeps the DP-SGD steps it has taken")
        n = len(own.train)
        sizes = np.full(max(cfg.partition.num_clients, self.client_id + 1), n, dtype=np.int64)  # only its own is read
        return SampleLevelDP(float(z), cfg.privacy.clip, cfg.client.batch_size, sizes,
                             np.full(len(sizes), steps_per_round(cfg.client, n)), cfg.privacy.accountant)

    @classmethod
    def from_config(cls, cfg, source: str | Path, client_id: int = 0, state_dir: Optional[str | Path] = None,
                    test_source: Optional[str | Path] = None, noise_multiplier: Optional[float] = None) -> "Client":
        """Read ``source`` (a CSV/JSON/Parquet file, a saved dataset: any ``data.source``) as this client's own
        data, with the config's column mapping; build the base and the adapter. Its local test split is
        ``test_source`` when given (a file of its own), else ``partition.local_test_fraction`` of its examples."""
        from ..models import build_model

        if cfg.runtime.threads:
            import torch

            torch.set_num_threads(cfg.runtime.threads)
        examples, n_test = own_examples(cfg, source, test_source)
        rng = Randomness(cfg.federation.seed).rng("local_split", client_id)
        train, test = own_split(len(examples), cfg.partition.local_test_fraction, rng, test_examples=n_test)
        if cfg.data.synthetic is not None:  # the client itself picks what it lacks, from its own labels
            from ..data.synthetic import add_own_synthetic
            from ..models.loader import cache_root

            train, _ = add_own_synthetic(cfg, examples, train, client_id, cache_root())
        bundle = build_model(cfg, examples)
        encoded = bundle.task.encode(examples)
        return cls(cfg, bundle, LocalData(encoded=encoded, train=train, test=test), client_id, state_dir,
                   noise_multiplier)

    def __call__(self, task: ClientTask) -> ClientResult:
        if task.client_id != self.client_id:
            return ClientResult(client_id=task.client_id, error=f"this is client {self.client_id}, the task is for "
                                                                f"client {task.client_id}")
        return self.algorithm(task)

    def handle(self, message: bytes) -> bytes:
        """A task's bytes in, the result's bytes out. With a state directory, the client's state (SCAFFOLD's c_i,
        personal parameters, its DP-SGD steps) is read as it was after its last round before this one, and written
        after this one: a client whose process ends after every task (a Flower ClientApp) keeps it across rounds,
        and a server that resumes from an earlier checkpoint finds it as it was then."""
        task = task_from_bytes(message)
        if self.state_dir is not None:
            restore_state(self.ctx.store, self.state_dir, task.round)
        result = self(task)
        if self.state_dir is not None and result.error is None:
            persist_state(self.ctx.store, self.state_dir, task.round)
        return result_to_bytes(result)


KEEP_ROUNDS = 2  # manifests kept (the store keeps the files of the one it loaded and the one it wrote): a server
# that resumed may ask for the round it lost again


def _manifests(state_dir: Path) -> dict[int, Path]:
    import re

    found = {}
    for p in state_dir.glob("manifest.r*.json") if state_dir.exists() else ():
        m = re.fullmatch(r"manifest\.r(\d+)\.json", p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def restore_state(store, state_dir: Path, rnd: int) -> None:
    """Load into ``store`` the client's state as its last round before ``rnd`` left it (nothing if none)."""
    import json

    earlier = {r: p for r, p in _manifests(state_dir).items() if r < rnd}
    if earlier:
        store.load_state_dict(json.loads(earlier[max(earlier)].read_text()))


def persist_state(store, state_dir: Path, rnd: int) -> None:
    """Write the client's state after round ``rnd`` (its files, then a manifest naming them, atomically); keep the
    manifests of the last ``KEEP_ROUNDS`` rounds."""
    import json
    import os

    manifest = store.state_dict()  # flushes every changed state to its own file
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"manifest.r{rnd:06d}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, path)
    for r, p in sorted(_manifests(state_dir).items())[:-KEEP_ROUNDS]:
        p.unlink(missing_ok=True)
