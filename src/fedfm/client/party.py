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
from .data import LocalData, own_data
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
                             seed=cfg.federation.seed, chat=task_cls.reads_chat)

    examples = read(source)
    if test_source is None:
        return examples, None
    test = read(test_source)
    return concat_examples(examples, test), len(test)


class Client:
    """A client party: its own ``LocalData``, the base with the adapter, the task, its own state store."""

    def __init__(self, cfg, bundle, own: LocalData, client_id: int = 0, state_dir: Optional[str | Path] = None):
        from ..models.ranks import client_ranks
        from ..runtime.state_store import ClientStateStore

        if cfg.privacy.mode == "sample":
            raise ConfigError("privacy.mode 'sample' is simulated only for now: a client in its own process does not "
                              "yet keep its own DP-SGD accountant")
        self.cfg, self.bundle, self.client_id = cfg, bundle, client_id
        from ..compression import make_codec

        self.ctx = ClientContext(cfg=cfg, model=bundle.model, spec=bundle.spec, task=bundle.task,
                                 local={client_id: own}, codec=make_codec(cfg.codec.name),
                                 store=ClientStateStore(cfg.runtime.cache_clients, state_dir),
                                 personal=bundle.personal, personal_init=bundle.personal.flat(),
                                 ranks=client_ranks(cfg, cfg.partition.num_clients))  # the server's, seeded
        self.algorithm = make_client(self.ctx)

    @classmethod
    def from_config(cls, cfg, source: str | Path, client_id: int = 0, state_dir: Optional[str | Path] = None,
                    test_source: Optional[str | Path] = None) -> "Client":
        """Read ``source`` (a CSV/JSON/Parquet file, a saved dataset: any ``data.source``) as this client's own
        data, with the config's column mapping; build the base and the adapter. Its local test split is
        ``test_source`` when given (a file of its own), else ``partition.local_test_fraction`` of its examples."""
        from ..models import build_model

        if cfg.runtime.threads:
            import torch

            torch.set_num_threads(cfg.runtime.threads)
        examples, n_test = own_examples(cfg, source, test_source)
        bundle = build_model(cfg, examples)
        encoded = bundle.task.encode(examples)
        rng = Randomness(cfg.federation.seed).rng("local_split", client_id)
        own = own_data(bundle.task, encoded, cfg.partition.local_test_fraction, rng, test_examples=n_test)
        return cls(cfg, bundle, own, client_id, state_dir)

    def __call__(self, task: ClientTask) -> ClientResult:
        if task.client_id != self.client_id:
            return ClientResult(client_id=task.client_id, error=f"this is client {self.client_id}, the task is for "
                                                                f"client {task.client_id}")
        return self.algorithm(task)

    def handle(self, message: bytes) -> bytes:
        """A task's bytes in, the result's bytes out."""
        return result_to_bytes(self(task_from_bytes(message)))
