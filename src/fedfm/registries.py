"""Which config field picks from which registry (used to validate a config before anything loads)."""
from __future__ import annotations


def fields_of(cfg):
    """(config field, registry, chosen name) for every field of a run config (a ``RunConfig``) that picks a
    registered entry."""
    from .aggregation import AGGREGATORS
    from .attacks import ATTACKS
    from .aggregation.server_opt import SERVER_OPTIMIZERS
    from .client import CLIENT_ALGORITHMS
    from .compression import CODECS
    from .data.partition import PARTITIONERS
    from .models.adapters import METHODS
    from .runtime import RUNTIMES
    from .sampling import SAMPLERS
    from .schedules import SCHEDULES
    from .tasks import TASKS

    return [
        ("adapter.method", METHODS, cfg.adapter.method),
        ("task.name", TASKS, cfg.task.name),
        ("partition.method", PARTITIONERS, cfg.partition.method),
        ("client.algorithm", CLIENT_ALGORITHMS, cfg.client.algorithm),
        ("server.aggregator", AGGREGATORS, cfg.server.aggregator),
        ("server.optimizer", SERVER_OPTIMIZERS, cfg.server.optimizer),
        ("codec.name", CODECS, cfg.codec.name),
        ("runtime.name", RUNTIMES, cfg.runtime.name),
        ("federation.sampling", SAMPLERS, cfg.federation.sampling),
        ("federation.schedule", SCHEDULES, cfg.federation.schedule),
        ("attack.kind", ATTACKS, cfg.attack.kind),
    ]
