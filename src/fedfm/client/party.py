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
    def from_config(cls, cfg, source: str | Path, client_id: int = 0,
                    state_dir: Optional[str | Path] = None) -> "Client":
        """Read ``source`` (a CSV/JSON/Parquet file, a saved dataset: any ``data.source``) as this client's own
        data, with the config's column mapping; build the base and the adapter; keep
        ``partition.local_test_fraction`` of the examples for local evaluation."""
        from ..data.sources import load_examples
        from ..models import build_model
        from ..tasks import TASKS

        if cfg.runtime.threads:
            import torch

            torch.set_num_threads(cfg.runtime.threads)
        data_cfg = cfg.data.model_copy(update={"source": str(source)})
        task_cls = TASKS.get(cfg.task.name)
        examples = load_examples(data_cfg, needs_labels=task_cls.needs_labels, seed=cfg.federation.seed,
                                 chat=task_cls.reads_chat)
        bundle = build_model(cfg, examples)
        encoded = bundle.task.encode(examples)
        rng = Randomness(cfg.federation.seed).rng("local_split", client_id)
        return cls(cfg, bundle, own_data(bundle.task, encoded, cfg.partition.local_test_fraction, rng),
                   client_id, state_dir)

    def __call__(self, task: ClientTask) -> ClientResult:
        if task.client_id != self.client_id:
            return ClientResult(client_id=task.client_id, error=f"this is client {self.client_id}, the task is for "
                                                                f"client {task.client_id}")
        return self.algorithm(task)

    def handle(self, message: bytes) -> bytes:
        """A task's bytes in, the result's bytes out."""
        return result_to_bytes(self(task_from_bytes(message)))
