"""Which config field picks from which registry (used to validate a config before anything loads)."""
from __future__ import annotations


def fields_of(cfg):
    """(config field, registry, chosen name) for every field of a run config (a ``RunConfig``) that picks a
    registered entry."""
    from .aggregation import AGGREGATORS
    from .attacks import ATTACKS
    from .aggregation.server_opt import SERVER_OPTIMIZERS
    from .client import CLIENT_ALGORITHMS
    from .client.continual import MITIGATIONS
    from .compression import CODECS
    from .data.partition import PARTITIONERS
    from .data.synthetic import SYNTHESIZERS
    from .models.adapters import METHODS
    from .runtime import RUNTIMES
    from .sampling import SAMPLERS
    from .schedules import SCHEDULES
    from .tasks import TASKS
    from .tracking.sinks import SINKS

    return [
        ("adapter.method", METHODS, cfg.adapter.method),
        ("task.name", TASKS, cfg.task.name),
        ("partition.method", PARTITIONERS, cfg.partition.method),
        ("client.algorithm", CLIENT_ALGORITHMS, cfg.client.algorithm),
        ("server.aggregator", AGGREGATORS, cfg.server.aggregator),
        ("server.optimizer", SERVER_OPTIMIZERS, cfg.server.optimizer),
        ("codec.name", CODECS, cfg.codec.name),
        *([("codec.downlink", CODECS, cfg.codec.downlink)] if cfg.codec.downlink is not None else []),
        ("runtime.name", RUNTIMES, cfg.runtime.name),
        ("federation.sampling", SAMPLERS, cfg.federation.sampling),
        ("federation.schedule", SCHEDULES, cfg.federation.schedule),
        ("attack.kind", ATTACKS, cfg.attack.kind),
        *([("data.synthetic.strategy", SYNTHESIZERS, cfg.data.synthetic.strategy)] if cfg.data.synthetic else []),
        *((f"continual.mitigations[{i}]", MITIGATIONS, m) for i, m in enumerate(cfg.continual.mitigations)),
        *((f"tracking.sinks[{i}]", SINKS, s) for i, s in enumerate(cfg.tracking.sinks)),
    ]


def _registry_of(key: str):
    from .aggregation import AGGREGATORS
    from .attacks import ATTACKS
    from .client import CLIENT_ALGORITHMS
    from .compression import CODECS
    from .models.adapters import METHODS
    from .schedules import SCHEDULES

    return {"server.aggregator": AGGREGATORS, "federation.schedule": SCHEDULES, "client.algorithm": CLIENT_ALGORITHMS,
            "adapter.method": METHODS, "codec.name": CODECS, "attack.kind": ATTACKS}[key]


def capability(key: str, name: str, what: str, default=False, unknown=True):
    """What the registered entry ``name`` of the registry behind config key ``key`` declares about itself (an attribute
    of the entry: ``linear_sum`` for an aggregator, ``synchronous`` for a schedule, ``extra_names`` for a client
    algorithm, ``lora_ranks`` for an adaptation method, ``carries_state`` for a codec, ``tampers_updates`` for an
    attack); ``default`` when the entry does not declare it, ``unknown`` for a name nobody registered (reported
    apart, with "did you mean")."""
    reg = _registry_of(key)
    return getattr(reg.get(name), what, default) if name in reg else unknown


def having(key: str, what: str) -> list[str]:
    """The registered names under config key ``key`` that declare ``what`` (for the messages that suggest them)."""
    return [n for n in _registry_of(key) if capability(key, n, what)]
