"""`RunConfig`: one validated description of a run, loaded from YAML and overridden by ``key.sub=value``."""
from __future__ import annotations

import difflib
import math
import os
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError


class Section(BaseModel):
    # allow_inf_nan=False: every float field refuses inf and nan (``client.lr=inf`` would train on nothing)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as 1 and 0: a number field
        (or a list of numbers) refuses them; an int is still a float."""
        if _has_bool(value) and _wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got a boolean ({value!r}; YAML reads yes/no/on/off as booleans)")
        return value


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_bool(v) for v in value)
    if isinstance(value, dict):
        return any(_has_bool(k) or _has_bool(v) for k, v in value.items())
    return False


def _wants_number(annotation: Any) -> bool:
    """Whether a field's type holds ints or floats and no bool (nor Any, nor a section, which checks its own)."""
    kinds = _types_in(annotation)
    sections = any(isinstance(k, type) and issubclass(k, BaseModel) for k in kinds)
    return bool(kinds & {int, float}) and not kinds & {bool, Any} and not sections


def _types_in(t: Any) -> set[Any]:
    """``t`` and every type argument inside it: Optional[list[int]] -> {Optional[list[int]], list[int], int, None}."""
    return {t}.union(*(_types_in(a) for a in typing.get_args(t)))


class TokenizerTrainConfig(Section):
    vocab_size: int = Field(4096, ge=300)
    min_frequency: int = Field(2, ge=1)


class ModelConfig(Section):
    name_or_path: Optional[str] = "minilm"
    from_config: Optional[dict[str, Any]] = None
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    gguf_file: Optional[str] = None  # a GGUF file in name_or_path: dequantized once to fp32 safetensors in the cache
    quantization: Optional[Literal["4bit", "8bit"]] = None  # QLoRA base via bitsandbytes (CUDA only)
    gradient_checkpointing: bool = False
    autocast: Optional[Literal["bf16", "fp16"]] = None  # mixed-precision forward/backward; trainable weights stay fp32
    dropout: Optional[float] = Field(None, ge=0, lt=1)  # every dropout rate of the base (default: the model's own)
    device: Optional[str] = None  # default: cuda when available, else cpu
    train_tokenizer: Optional["TokenizerTrainConfig"] = None  # a byte-level BPE trained on the public (held-out) text
    # image tasks: an image processor built from these settings ({image_processor_type: ViTImageProcessor, size: ...})
    # instead of the model directory's preprocessor_config.json (a model built from model.from_config has none)
    image_processor: Optional[dict[str, Any]] = None

    @field_validator("from_config")
    @classmethod
    def _finite(cls, conf: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """Its values are untyped (a transformers config), so allow_inf_nan does not reach them."""
        for key, value in (conf or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{key} is {value}; expected a finite number")
        return conf


class AdapterConfig(Section):
    method: str = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Optional[list[str]] = None
    num_virtual_tokens: int = Field(10, ge=1)  # prompt/prefix: soft tokens; coop: M, the context vectors
    # coop: a phrase whose token embeddings are the initial context ("a photo of a" with num_virtual_tokens 4: round 0
    # is zero-shot CLIP); None: N(0, 0.02)
    context_init: Optional[str] = None
    personal: list[str] = []  # parameter-name parts that stay on each client (e.g. classifier, lora_B)
    rank_per_client: Optional[list[int] | dict[int, float]] = None  # heterogeneous LoRA ranks: a list, or tiers
    # such as {4: 0.3, 8: 0.4, 16: 0.3} (fractions of clients); adapter.r must be the largest rank

    @model_validator(mode="after")
    def _ranks(self) -> "AdapterConfig":
        rpc = self.rank_per_client
        if rpc is None:
            return self
        ranks = list(rpc) if isinstance(rpc, list) else list(rpc.keys())
        if not ranks or min(ranks) < 1:
            raise ValueError("adapter.rank_per_client: ranks must be >= 1")
        if max(ranks) != self.r:
            raise ValueError(f"adapter.rank_per_client: the largest rank ({max(ranks)}) must equal adapter.r ({self.r})")
        if isinstance(rpc, dict) and abs(sum(rpc.values()) - 1.0) > 1e-6:
            raise ValueError(f"adapter.rank_per_client: tier fractions must sum to 1, got {sum(rpc.values()):.4g}")
        from .registries import capability, having

        if not capability("adapter.method", self.method, "lora_ranks"):
            lora = ", ".join(having("adapter.method", "lora_ranks"))
            raise ValueError(f"adapter.rank_per_client needs a LoRA method ({lora}), got {self.method!r}")
        return self


class TaskConfig(Section):
    name: str = "classification"
    max_length: int = Field(64, ge=2)
    packing: bool = False  # instruction: concatenate training examples into full max_length rows
    system_prompt: Optional[str] = None  # instruction: a system message put before every conversation
    # image tasks: the side of the square images the model sees (the processor's resize and crop scaled to it);
    # None: the image processor's own size
    image_size: Optional[int] = Field(None, ge=1)


class GenerationConfig(Section):
    num_prompts: int = Field(8, ge=0)  # a fixed sample of held-out prompts, answered at every eval (0: none)
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)


# data.synthetic's default prompt: public (the label name and this text, never a client's), for news topics of any name
SYNTHETIC_PROMPT = ("Write the headline and the first sentence of a news article about {label}. "
                    "Reply with the headline and the sentence only.")


class SyntheticConfig(Section):
    """data.synthetic: a generative model writes labelled rows for the classes a client lacks, from public prompts
    (GPT-FL, Zhang et al. 2023: a generative pre-trained model's synthetic data against non-IID clients)."""

    generator: Optional[ModelConfig] = ModelConfig(name_or_path="smollm2-135m-instruct")  # a causal LM: alias, id,
    # directory, or a model section (from_config + tokenizer in tests)
    strategy: str = "fill-missing"  # which pool rows a client gets (data.synthetic.SYNTHESIZERS)
    prompt: str = SYNTHETIC_PROMPT  # {label} is replaced by each class's name
    per_class: int = Field(40, ge=1)  # the pool: rows generated per class (shared by all clients)
    ratio: float = Field(0.5, gt=0)  # a client gets round(ratio x its real training rows) synthetic rows in all,
    # shared evenly by its lacking classes (each at most per_class)
    threshold: float = Field(0.1, gt=0, le=1)  # a class is lacking (missing or few) when its share of the client's
    # real training rows is below this
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(16, ge=1)  # prompts sampled at once
    seed: Optional[int] = None  # the generation's seed; None: federation.seed

    @field_validator("generator", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        """A plain string is the generator's name_or_path (``data.synthetic.generator=smollm2``)."""
        return {"name_or_path": value} if isinstance(value, str) else value


class DataConfig(Section):
    source: str = "bbc-news"
    text_column: str = "text"
    image_column: str = "image"  # image tasks: the column of images (arrays, encoded bytes, file paths)
    bad_images: Literal["refuse", "skip"] = "refuse"  # an image that cannot be decoded: stop naming it, or leave it out
    format: Literal["auto", "alpaca", "chat", "prompt_completion"] = "auto"  # instruction data: how a row is laid out
    label_column: Optional[str] = "label"
    # the classes, in order (label ids index this list); unset: the sorted labels found in the data. A deployment sets
    # it from what the sites report, so that every party numbers the classes alike
    label_names: Optional[list[str]] = None
    client_column: Optional[str] = None
    test_fraction: float = Field(0.2, ge=0, lt=1)  # the server's own held-out set (0: none; see eval.federated)
    max_examples: Optional[int] = Field(None, ge=2)
    tokenized_cache: bool = True  # keep the tokenized rows in $FEDFM_CACHE/tokenized, memory-mapped next run
    synthetic: Optional[SyntheticConfig] = None  # rows from a generative model for what a client lacks (docs/ownership.md)


class PartitionConfig(Section):
    method: str = "dirichlet"
    num_clients: int = Field(10, ge=1)
    alpha: float = 0.5
    shards_per_client: int = Field(2, ge=1)
    power: float = 1.5
    min_size: int = Field(2, ge=1)
    local_test_fraction: float = Field(0.2, ge=0, lt=1)
    # each client keeps this fraction of its training examples out of training, to score settings on (fedfm sweep);
    # the rows then carry val_<metric>: the model each client would use (global or personalized) on its own validation split, pooled
    validation_fraction: float = Field(0.0, ge=0, lt=1)


class FederationConfig(Section):
    rounds: int = Field(10, ge=1)
    clients_per_round: Optional[int] = Field(5, ge=1)
    fraction: Optional[float] = None
    min_clients: int = Field(1, ge=1)
    seed: int = 0
    sampling: str = "uniform"  # uniform | size (proportional to data size) | available (online clients only)
    schedule: str = "sync"  # sync rounds | fedbuff (buffered asynchronous aggregation)
    buffer_size: int = Field(5, ge=1)  # fedbuff: K results per server step
    concurrency: int = Field(10, ge=1)  # fedbuff: clients training at once
    staleness_exponent: float = Field(0.5, ge=0)  # fedbuff: weight (1 + τ)^(−a); 0 ignores staleness
    byte_budget: Optional[int] = Field(None, ge=1)  # bytes up + down over the run: stop before a round would exceed it

    @model_validator(mode="after")
    def _fraction(self) -> "FederationConfig":
        if self.fraction is not None and not (0.0 < self.fraction <= 1.0):
            raise ValueError(f"federation.fraction must be in (0, 1], got {self.fraction}")
        return self


class ClockConfig(Section):
    """Simulated time for heterogeneous clients (see fedfm/clock.py); the defaults are identical, always-on clients."""

    step_seconds: float = Field(1.0, gt=0)  # simulated seconds per local optimizer step of a speed-1 client
    speeds: Optional[list[float]] = None  # per-client step-time multipliers (2.0 = twice as slow); overrides the draw
    speed_distribution: Literal["constant", "lognormal"] = "constant"
    speed_sigma: float = Field(0.5, ge=0)  # lognormal: sigma of log(multiplier)
    availability: float | list[float] = 1.0  # probability a client is online in a period (one value, or per client)
    period_s: float = Field(600.0, gt=0)  # availability is drawn afresh every period
    dropout: float = Field(0.0, ge=0, lt=1)  # probability a client that starts never returns
    deadline_s: Optional[float] = Field(None, gt=0)  # sync: clients needing longer are stragglers and dropped

    @model_validator(mode="after")
    def _speeds(self) -> "ClockConfig":
        if self.speeds is not None and any(v <= 0 for v in self.speeds):
            raise ValueError("clock.speeds: every multiplier must be > 0")
        avail = self.availability if isinstance(self.availability, list) else [self.availability]
        if not avail or any(not (0 < a <= 1) for a in avail):
            raise ValueError("clock.availability: each probability must be in (0, 1]")
        return self


class ClientConfig(Section):
    algorithm: str = "local"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    epochs: Optional[int] = Field(1, ge=1)
    steps: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    mu: float = Field(0.01, ge=0)  # fedprox: weight of the proximal term μ/2 ‖w − w^t‖²


class ServerConfig(Section):
    aggregator: str = "fedavg"
    optimizer: str = "fedavg"  # fedavg | fedavgm | nesterov | fedadam | fedyogi | fedadagrad
    lr: Optional[float] = Field(None, gt=0)  # server learning rate η; default per optimizer (see SERVER_LR_DEFAULTS)
    momentum: Optional[float] = Field(None, ge=0, lt=1)  # fedavgm β, nesterov μ; default per optimizer (below)
    beta1: float = Field(0.9, ge=0, lt=1)  # fedadam / fedyogi / fedadagrad
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # adaptivity ε of Reddi et al. 2021
    hetlora_weighting: Literal["sparsity", "examples"] = "sparsity"  # hetlora: p_k ∝ ‖B_k A_k‖_F, or ∝ n_k
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)  # trimmed-mean: β, the fraction cut from each end per coordinate
    byzantine_fraction: float = Field(0.2, ge=0, lt=0.5)  # krum / multi-krum: f = floor(fraction x K)
    geomed_iters: int = Field(4, ge=1)  # geometric-median: smoothed Weiszfeld iterations
    norm_bound: Optional[float] = Field(None, gt=0)  # norm-bound: each update scaled to at most this L2 norm
    max_update_norm: Optional[float] = Field(None, gt=0)  # validation: reject any update with a larger L2 norm

    @model_validator(mode="after")
    def _lr_default(self) -> "ServerConfig":
        if self.momentum is None:
            self.momentum = SERVER_MOMENTUM_DEFAULTS.get(self.optimizer, 0.9)
        if self.lr is None and self.optimizer in SERVER_MOMENTUM_DEFAULTS:  # η = 1 − β: the step η/(1 − β) of averaging
            self.lr = round(1.0 - self.momentum, 12)
        if self.lr is None:
            self.lr = SERVER_LR_DEFAULTS.get(self.optimizer, 1.0)
        if self.aggregator == "norm-bound" and self.norm_bound is None:
            raise ValueError("server.aggregator 'norm-bound' needs server.norm_bound (the largest L2 norm an update keeps)")
        return self


# η when server.lr is not given: plain averaging for fedavg; 1 − β for the momentum optimizers (fedavgm, nesterov),
# whose steady step η/(1 − β) is then averaging's; for the adaptive ones the server lr the algorithm sweeps chose for
# LoRA on MiniLM + BBC News (docs/algorithms.md; tune it on your own validation data: fedfm sweep).
# (Dirichlet(0.1), seed 0, of 0.003 / 0.01 / 0.03: fedadam and fedyogi 0.01, both at chance at 0.03; fedadagrad
# 0.03: at 0.01 its validation accuracy ended at 0.36 against 0.90, as its ever-growing v shrinks the step)
# nesterov at μ 0.9: η 0.1 reached 0.948 validation accuracy, 0.03 0.468, 0.3 0.910, DiLoCo's 0.7 (for hundreds of
# local steps; these rounds have 5) 0.423
SERVER_LR_DEFAULTS = {"fedavg": 1.0, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.03}
# β / μ when server.momentum is not given: fedavgm 0.5 (measured: β 0.9 at η 1, the old default, fell to chance on
# BBC News Dirichlet(0.1); docs/algorithms.md), nesterov DiLoCo's 0.9
SERVER_MOMENTUM_DEFAULTS = {"fedavgm": 0.5, "nesterov": 0.9}


class CodecConfig(Section):
    name: str = "fp32"  # what a client sends: fp32 | fp16 | bf16 | int8 | int4 | topk | randk (docs/communication.md)
    downlink: Optional[str] = None  # what the server broadcasts; None: codec.name when it can carry a state, else fp32
    block_size: int = Field(64, ge=1)  # int8/int4 (and their use as codec.values): values per scale
    stochastic: bool = False  # int8/int4 updates: stochastic rounding, so the decoded update is unbiased
    fraction: Optional[float] = Field(None, gt=0, le=1)  # topk/randk: the fraction of values kept (default 0.1)
    count: Optional[int] = Field(None, ge=1)  # topk/randk: the number of values kept (instead of a fraction)
    values: Literal["fp32", "fp16", "bf16", "int8", "int4"] = "fp32"  # topk/randk: the codec of the kept values
    error_feedback: Optional[bool] = None  # keep what was not sent and add it next round; None: on for topk/randk

    @model_validator(mode="after")
    def _sparse(self) -> "CodecConfig":
        if self.fraction is not None and self.count is not None:
            raise ValueError("codec: give codec.fraction or codec.count, not both")
        return self


def _home(v: Optional[str]) -> Optional[str]:
    """A path from YAML or an override: ``~`` means the home directory, as a shell would read it."""
    return str(Path(v).expanduser()) if isinstance(v, str) and v.startswith("~") else v


class RuntimeConfig(Section):
    name: str = "local"
    state_dir: Optional[str] = None
    _state_dir_home = field_validator("state_dir")(_home)
    cache_clients: int = Field(1000, ge=1)
    threads: Optional[int] = Field(None, ge=1)
    max_clients_per_batch: Optional[int] = Field(None, ge=1)  # batched runtime: clients per stacked batch (memory cap)
    # ray runtime (docs/scaling.md): a pool of actors, each loading the base once; address joins a running cluster
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # fractional: several workers share one GPU
    address: Optional[str] = None  # e.g. "ray://head:10001" or "auto"; None: start a local Ray on this machine
    worker_timeout_s: float = Field(3600.0, gt=0)  # a worker silent this long in a round: its clients drop, it is replaced
    # flower deployment (docs/deployment.md): how long the server side waits for partition.num_clients SuperNodes
    connect_timeout_s: float = Field(300.0, gt=0)


class EvalConfig(Section):
    every: int = Field(1, ge=0)
    batch_size: int = Field(64, ge=1)
    held_out: bool = True  # score the server's held-out (test) set; a sweep's tuning runs turn it off
    per_client: bool = True  # simulation: every client's local test set under the global model, at each evaluation
    federated: bool = False  # each sampled client scores the global model on its own test split and sends the metrics
    initial: bool = False
    max_examples: Optional[int] = Field(None, ge=1)  # evaluate on a fixed sample of the held-out set
    finetune_steps: int = Field(0, ge=0)  # per client: also score the global model after this many local steps
    membership_audit: bool = False  # after the last round: loss-threshold MIA AUC, clients' examples vs held-out
    generation: GenerationConfig = GenerationConfig()


class OutputConfig(Section):
    dir: Optional[str] = None
    _dir_home = field_validator("dir")(_home)
    keep_checkpoints: int = Field(2, ge=1)


class TrackingConfig(Section):
    """Where a run's metrics go besides metrics.jsonl (docs/tracking.md): any of the registered sinks."""
    sinks: list[str] = []  # any of fedfm.tracking.sinks.SINKS: tensorboard, mlflow
    tensorboard_dir: Optional[str] = None  # default <output.dir>/tensorboard
    _tensorboard_dir_home = field_validator("tensorboard_dir")(_home)
    mlflow_uri: Optional[str] = None  # default $MLFLOW_TRACKING_URI, else sqlite:///<working directory>/mlflow.db
    mlflow_experiment: Optional[str] = None  # default the config's name

    @field_validator("sinks")
    @classmethod
    def _once_each(cls, sinks: list[str]) -> list[str]:
        twice = sorted({s for s in sinks if sinks.count(s) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} given more than once; name each sink once")
        return sinks


class PrivacyConfig(Section):
    # client: DP-FedAvg (McMahan et al. 2018); sample: DP-SGD in each client (Abadi et al. 2016); dp-accounting accountant
    mode: Literal["none", "client", "sample"] = "none"
    clip: float = Field(1.0, gt=0)  # C: each client update (client) / per-example gradient (sample) cut to L2 norm <= C
    noise_multiplier: Optional[float] = Field(None, ge=0)  # z: noise std z·C on the clipped sum
    delta: float = Field(1e-5, gt=0, lt=1)
    target_epsilon: Optional[float] = Field(None, gt=0)  # no z: derive z for the planned rounds; with z: stop when spent
    sampling: Literal["poisson", "fixed"] = "poisson"  # client sampling the accountant assumes (and the run uses)
    accountant: Literal["rdp", "pld"] = "rdp"
    target_quantile: Optional[float] = Field(None, gt=0, lt=1)  # adaptive clipping (Andrew et al. 2021): γ
    clip_lr: float = Field(0.2, gt=0)  # adaptive clipping: η_C, C ← C·exp(−η_C (b̄ − γ))
    count_noise: Optional[float] = Field(None, gt=0)  # adaptive clipping: σ_b (default: expected clients / 20)
    # where the mechanism's random draws (client sample under client DP, DP noise, DP-SGD's Poisson batches) come
    # from: the OS's CSPRNG (secret), or federation.seed (seeded: reproducible, and removable by whoever has the seed)
    randomness: Literal["secret", "seeded"] = "secret"


class SecureAggregationConfig(Section):
    enabled: bool = False  # SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020): the server sees only masked vectors
    # k of the SecAgg+ graph (even) and t; None: the sparsest (k, t) that Bell et al. 2020's bounds make safe for the
    # round's roster with the fractions below (the complete graph of Bonawitz when no sparser one is)
    neighbours: Optional[int] = Field(None, ge=2)
    threshold: Optional[int] = Field(None, ge=1)  # t shares rebuild a secret; None: chosen with k (or ⌊k/2⌋ + 1)
    corrupt_fraction: float = Field(0.05, ge=0, lt=1)  # γ: clients that may collude with the server
    dropout_fraction: float = Field(0.05, ge=0, lt=1)  # δ: clients that may drop out mid-round
    security_bits: int = Field(40, ge=1, le=128)  # a round leaks more than the sum with probability ≤ 2^−σ
    correctness_bits: int = Field(20, ge=1, le=128)  # a round aborts with probability ≤ 2^−η
    bits: int = Field(32, ge=8, le=48)  # the ring Z_{2^bits} of the fixed-point encoding
    clip: Optional[float] = Field(None, gt=0)  # each coordinate clamped to ±clip before encoding; None: privacy.clip
    # (privacy.mode client) or 1.0
    dp_noise: Literal["central", "distributed"] = "central"  # privacy.mode client: noise added by the server after
    # unmasking, or by each client before masking (N(0, z²C²/federation.min_clients) each)


class FedKSeedConfig(Section):
    """client.algorithm fedkseed (Qin et al. 2024): steps per round are client.steps (or client.epochs), η is
    client.lr (zeroth-order full-parameter tuning wants a small one: the paper's 3e-7 on billion-sized models)."""

    num_seeds: int = Field(4096, ge=1)  # K, the candidate seeds shared by every party
    eps: float = Field(5e-4, gt=0)  # ε, the scale of the perturbation w ± εz
    pro: bool = False  # FedKSeed-Pro: seeds drawn with probability from the amplitude of their past scalars


class AttackConfig(Section):
    kind: str = "none"  # none | sign-flip | scale | gaussian | label-flip | backdoor
    fraction: float = Field(0.0, ge=0, le=1)  # of the clients, malicious for the whole run (seeded)
    scale: float = Field(10.0, gt=0)  # sign-flip sends −scale·Δ (use 1 for a plain flip); scale sends scale·Δ
    noise_std: float = Field(1.0, gt=0)  # gaussian: σ of the noise sent instead of the update
    trigger: str = "cf mn bb"  # backdoor: the phrase put in front of poisoned texts
    target_label: Optional[str] = None  # backdoor: the label the trigger should produce (default: the first label)
    poison_fraction: float = Field(0.5, gt=0, le=1)  # backdoor: of each malicious client's training examples


class SplitConfig(Section):
    """client.algorithm: split (SplitFed, Thapa et al. 2022): where the model is cut and what the client adds."""

    layer: int = Field(1, ge=1)  # L: the client runs the embeddings and blocks 0..L-1, the server blocks L.. and the head
    noise_std: float = Field(0.0, ge=0)  # σ: N(0, σ²) added by the client to every activation it sends (0: none)


class BlackBoxConfig(Section):
    """client.algorithm fedbpt (BBT, Sun et al. 2022; FedBPT, Sun et al. 2023): the forward-only inference service and
    the derivative-free search of the soft prompt P = A z (n = adapter.num_virtual_tokens tokens, z ∈ R^d)."""

    service: Optional[str] = None  # host:port of a running service; None: the run starts one on 127.0.0.1
    intrinsic_dim: int = Field(50, ge=1)  # d, the dimension of z
    projection_std: float = Field(0.1, gt=0)  # A_ij ~ N(0, projection_std²/d): P's entries have std ≈ this·‖z‖/√d
    # (SmolLM2-135M's input embeddings have std 0.136)
    popsize: int = Field(8, ge=2)  # λ, CMA-ES's candidates per iteration (one forward call each)
    iterations: int = Field(4, ge=1)  # CMA-ES iterations per client per round (one mini-batch of client.batch_size each)
    sigma: float = Field(1.0, gt=0)  # CMA-ES's initial step size around the global z
    template: str = "\nTopic:"  # put after each text; the label word follows it
    verbalizer: Optional[list[str]] = None  # one label word per class (default: the label names)
    timeout_s: float = Field(60.0, gt=0)  # of every request to the service, and of the reachability check
    start_timeout_s: float = Field(600.0, gt=0)  # for the service the run starts to load its model


class OffsiteConfig(Section):
    """client.algorithm: offsite (Offsite-Tuning, Xiao et al. 2023): the emulator the owner sends the clients."""

    adapter_layers: int = Field(2, ge=1)  # k: the first k and the last k blocks are the adapter (trained, shared)
    drop_ratio: float = Field(0.5, ge=0, lt=1)  # of the middle blocks, dropped; the kept ones uniformly spaced
    distill_steps: int = Field(0, ge=0)  # the owner's distillation of the emulator on its public (held-out) text
    distill_lr: float = Field(1e-4, gt=0)  # its AdamW learning rate
    distill_batch_size: int = Field(8, ge=1)


class TransferGroup(Section):
    """One architecture of client.algorithm fedmd: the model its clients run, their adapter, and which clients."""

    model: ModelConfig
    adapter: Optional[AdapterConfig] = None  # default: the run's adapter section
    clients: int | list[int]  # how many (the next client ids, in the order of the groups) or which ids


class ContinualDrift(Section):
    """One drift of a stage: these clients' own data change to the rows of other classes or domains."""

    clients: list[int] = Field(min_length=1)  # client ids
    classes: Optional[list[str]] = Field(None, min_length=1)  # label names the drifting clients' rows now have
    domains: Optional[list[str]] = Field(None, min_length=1)  # or values of continual.domain_column

    @model_validator(mode="after")
    def _one_kind(self) -> "ContinualDrift":
        if (self.classes is None) == (self.domains is None):
            raise ValueError("a drift gives the clients' new data as classes or as domains (exactly one of them)")
        return self


class ContinualStage(Section):
    """One stage of a lifelong federation: its rounds, and what arrives (docs/continual.md)."""

    name: Optional[str] = None  # default: stage<i>
    rounds: int = Field(ge=1)
    classes: Optional[list[str]] = Field(None, min_length=1)  # class-incremental: the label names of this stage
    domains: Optional[list[str]] = Field(None, min_length=1)  # domain-incremental: values of continual.domain_column
    join: list[int] = []  # clients that join at this stage (before it they are never sampled)
    drift: list[ContinualDrift] = []  # clients whose data differ from the stage's at this stage

    @model_validator(mode="after")
    def _what_arrives(self) -> "ContinualStage":
        if self.classes is not None and self.domains is not None:
            raise ValueError("a stage gives its data as classes or as domains, not both")
        return self


class ReplayConfig(Section):
    """continual.mitigations replay: each client's bounded buffer of its own earlier rows (reservoir sampling)."""

    size: int = Field(32, ge=1)  # rows a client keeps at most


class EWCConfig(Section):
    """continual.mitigations ewc (Kirkpatrick et al. 2017): the local loss adds λ/2 Σ_s Σ_i F_s,i (θ_i − θ*_s,i)²."""

    lam: float = Field(100.0, ge=0)  # λ
    fisher_examples: int = Field(32, ge=1)  # a client's own examples its diagonal Fisher is estimated on, per stage


class OLoRAConfig(Section):
    """continual.mitigations olora (O-LoRA, Wang et al. 2023): a new LoRA per stage, orthogonal to the earlier ones."""

    lam: float = Field(0.5, ge=0)  # λ1 of the orthogonality loss λ1 Σ_{s<t} ‖A_s A_tᵀ‖²


class ContinualConfig(Section):
    """A lifelong federation (docs/continual.md): the data arrive in stages and the federation trains across them."""

    stages: list[ContinualStage] = []  # none: an ordinary run
    mitigations: list[str] = []  # composable: replay, ewc, olora (client.continual.MITIGATIONS)
    domain_column: Optional[str] = None  # the column the stages' domains are values of
    eval_examples: Optional[int] = Field(None, ge=1)  # held-out examples per stage scored after each stage (None: all)
    replay: ReplayConfig = ReplayConfig()
    ewc: EWCConfig = EWCConfig()
    olora: OLoRAConfig = OLoRAConfig()

    @model_validator(mode="after")
    def _stages(self) -> "ContinualConfig":
        if self.mitigations and not self.stages:
            raise ValueError("continual.mitigations: there are no continual.stages to mitigate forgetting across")
        for m in self.mitigations:
            if self.mitigations.count(m) > 1:
                raise ValueError(f"continual.mitigations: {m!r} is listed twice")
        names = [s.name or f"stage{i}" for i, s in enumerate(self.stages)]
        for i, s in enumerate(self.stages):
            if names.count(names[i]) > 1:
                raise ValueError(f"continual.stages[{i}].name: {names[i]!r} names two stages")
            if i > 0 and s.classes is None and s.domains is None and not s.join and not s.drift:
                raise ValueError(f"continual.stages[{i}]: nothing arrives (give classes, domains, join or drift)")
            if s.name is None:
                s.name = names[i]
        joined = [c for s in self.stages for c in s.join]
        twice = sorted({c for c in joined if joined.count(c) > 1})
        if twice:
            raise ValueError(f"continual.stages[].join: client(s) {twice} join more than once")
        if self.stages and self.stages[0].join:
            raise ValueError("continual.stages[0].join: every client not joining later is there from the first stage")
        kinds = {k for s in self.stages for k in ("classes", "domains") if getattr(s, k) is not None}
        if len(kinds) > 1:
            raise ValueError("continual.stages: some stages give classes and others domains; use one kind per run")
        return self


class TransferConfig(Section):
    """client.algorithm fedmd (FedMD, Li & Wang 2019; FedDF, Lin et al. 2020): clients running different models
    exchange only their logits on a public set; the server distils their consensus into its foundation model and
    sends its logits back."""

    public_fraction: float = Field(0.0, ge=0, lt=1)  # of the examples, carved before partitioning; labels unused
    groups: list[TransferGroup] = []  # which model each client runs (none: every client runs the model section)
    server_model: Optional[ModelConfig] = None  # the server's foundation model (default: the model section)
    server_adapter: Optional[AdapterConfig] = None  # what of it the server tunes (default: the adapter section)
    temperature: float = Field(1.0, gt=0)  # T of the distillation loss, on both sides
    client_distill_steps: int = Field(5, ge=0)  # each client's steps toward what the server sends, each round
    server_distill_steps: int = Field(10, ge=0)  # the server's steps toward the clients' consensus, each round
    server_lr: float = Field(1e-3, gt=0)  # the server's distillation learning rate (AdamW)
    send: Literal["foundation", "consensus"] = "foundation"  # what goes back: the FM's logits, or the consensus


class RunConfig(Section):
    name: str = "run"
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    federation: FederationConfig = FederationConfig()
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()
    codec: CodecConfig = CodecConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    clock: ClockConfig = ClockConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    tracking: TrackingConfig = TrackingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    attack: AttackConfig = AttackConfig()
    secagg: SecureAggregationConfig = SecureAggregationConfig()
    split: SplitConfig = SplitConfig()
    fedkseed: FedKSeedConfig = FedKSeedConfig()
    blackbox: BlackBoxConfig = BlackBoxConfig()
    offsite: OffsiteConfig = OffsiteConfig()
    transfer: TransferConfig = TransferConfig()
    continual: ContinualConfig = ContinualConfig()

    def _codec_checks(self, sends_state: bool) -> None:
        """What a codec can carry (docs/communication.md): a sparse codec sends a change, not a state, and its kept
        coordinates differ per client, so it is neither a downlink nor a secure sum's input."""
        from .registries import capability

        c = self.codec
        sparse = not capability("codec.name", c.name, "carries_state", default=True)
        if c.downlink is not None and not capability("codec.name", c.downlink, "carries_state", default=True):
            raise ValueError(f"codec.downlink {c.downlink!r} sends a sparse change, not the whole state the server "
                             f"broadcasts; use fp32, fp16, bf16, int8 or int4")
        if not sparse and (c.fraction is not None or c.count is not None):
            raise ValueError(f"codec.fraction and codec.count choose the kept values of topk or randk; codec.name "
                             f"{c.name!r} keeps every value")
        quantizes = c.name in ("int8", "int4") or (sparse and c.values in ("int8", "int4"))
        if c.stochastic and not quantizes:
            raise ValueError(f"codec.stochastic rounds int8/int4 values; codec.name {c.name!r} (codec.values "
                             f"{c.values!r}) has none to round")
        if sparse and self.secagg.enabled:
            raise ValueError(f"codec.name {c.name!r} with secagg.enabled: each client keeps different coordinates, so "
                             f"the masked vectors could not be summed coordinate by coordinate (and the indices would "
                             f"travel in the clear); use a dense codec (fp32, fp16, bf16, int8, int4) under secagg")
        if sparse and sends_state:
            raise ValueError(f"codec.name {c.name!r} with client.algorithm {self.client.algorithm!r}: its state besides "
                             f"the update would be sparsified without error feedback; use a dense codec")

    def _continual_checks(self) -> None:
        """continual.stages: the run's rounds are the stages' rounds; what a lifelong federation runs with."""
        c = self.continual
        self.federation.rounds = sum(s.rounds for s in c.stages)
        if self.runtime.name != "local":
            raise ValueError(f"continual.stages: each client's data change between stages in this process; runtime.name "
                             f"{self.runtime.name!r} is not covered: use runtime.name local")
        if self.federation.schedule != "sync":
            raise ValueError("continual.stages: a stage is a run of synchronous rounds; use federation.schedule: sync")
        if self.privacy.mode == "sample":
            raise ValueError("continual.stages with privacy.mode 'sample': DP-SGD's sampling rates are set from the "
                             "whole partition, not from each stage's rows; use privacy.mode none or client")
        if any(s.domains is not None or any(d.domains for d in s.drift) for s in c.stages) and \
                not (c.domain_column or self.data.client_column):
            raise ValueError("continual.stages[].domains: give continual.domain_column (the column whose values the "
                             "domains are)")
        if any(s.classes is not None or any(d.classes for d in s.drift) for s in c.stages) and \
                not self.data.label_column:
            raise ValueError("continual.stages[].classes: the data need a data.label_column")
        if "ewc" in c.mitigations and "olora" in c.mitigations:
            raise ValueError("continual.mitigations: ewc anchors the LoRA that olora restarts at every stage; use one "
                             "of them (each composes with replay)")

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        from .registries import capability

        linear_sum = capability("server.aggregator", self.server.aggregator, "linear_sum")
        synchronous = capability("federation.schedule", self.federation.schedule, "synchronous")
        sends_state = bool(capability("client.algorithm", self.client.algorithm, "extra_names", default=(),
                                      unknown=()))
        if self.privacy.mode == "client":
            if not linear_sum:
                raise ValueError(f"privacy.mode 'client': DP-FedAvg's noise is calibrated to the clipped sum, which "
                                 f"one client moves by at most C; server.aggregator {self.server.aggregator!r} has no "
                                 f"such bound (one client can move a median by up to 2C per coordinate), so the "
                                 f"accounted ε would not hold. Use fedavg (norm-bound is DP-FedAvg's clip), or "
                                 f"privacy.mode=sample, which composes with every aggregator")
            if not synchronous:
                raise ValueError("privacy.mode 'client' is accounted per synchronous round: use federation.schedule: sync")
            if self.privacy.noise_multiplier is None and self.privacy.target_epsilon is None:
                raise ValueError("privacy.mode 'client' needs privacy.noise_multiplier or privacy.target_epsilon")
            # the run samples clients the way the accountant assumes
            self.federation.sampling = "poisson" if self.privacy.sampling == "poisson" else "uniform"
        if self.privacy.mode == "sample":
            if self.privacy.noise_multiplier is None and self.privacy.target_epsilon is None:
                raise ValueError("privacy.mode 'sample' needs privacy.noise_multiplier or privacy.target_epsilon")
            if self.task.name == "lm":
                raise ValueError("privacy.mode 'sample' protects one training example per per-example gradient; "
                                 "task 'lm' cuts documents into several rows: use task 'instruction' or 'classification'")
            if self.task.packing:
                raise ValueError("privacy.mode 'sample' needs one example per row: set task.packing=false")
            if self.client.grad_accum != 1:
                raise ValueError("privacy.mode 'sample': each DP-SGD step is one Poisson batch; set client.grad_accum=1 "
                                 "(client.batch_size is the expected batch size)")
            if self.privacy.target_quantile is not None:
                raise ValueError("privacy.target_quantile (adaptive clipping) is for privacy.mode 'client'")
        if capability("attack.kind", self.attack.kind, "tampers_updates", unknown=False) and \
                not capability("client.algorithm", self.client.algorithm, "tensor_updates", default=True):
            raise ValueError(f"attack.kind {self.attack.kind!r} changes a client's update tensor; client.algorithm "
                             f"{self.client.algorithm!r} sends none (use a data attack: label-flip or backdoor)")
        if self.secagg.enabled:
            if not linear_sum:
                raise ValueError(f"secagg.enabled: the server sees only the sum of masked updates, so "
                                 f"server.aggregator {self.server.aggregator!r} (which needs each update) cannot run; "
                                 f"use fedavg")
            if not synchronous:
                raise ValueError("secagg.enabled: one secure-aggregation instance per synchronous round; use "
                                 "federation.schedule: sync")
            if sends_state:
                raise ValueError(f"secagg.enabled: client.algorithm {self.client.algorithm!r} sends state besides the "
                                 f"update, which would travel unmasked; use local or fedprox")
            if self.privacy.target_quantile is not None:
                raise ValueError("secagg.enabled: adaptive clipping (privacy.target_quantile) counts unclipped updates "
                                 "in the clear; use a fixed privacy.clip")
            if self.secagg.neighbours is not None and self.secagg.neighbours % 2:
                raise ValueError(f"secagg.neighbours must be even (k/2 on each side of the SecAgg+ ring), got "
                                 f"{self.secagg.neighbours}")
            if self.server.max_update_norm is not None:
                raise ValueError("server.max_update_norm: under secagg the server never sees one update; bound "
                                 "updates with privacy.mode=client (each client clips to privacy.clip)")
        self._codec_checks(sends_state)
        if self.partition.alpha <= 0:
            raise ValueError(f"partition.alpha must be > 0, got {self.partition.alpha}")
        if self.partition.power <= 0:
            raise ValueError(f"partition.power must be > 0, got {self.partition.power}")
        if self.model.name_or_path is None and self.model.from_config is None:
            raise ValueError("model: give model.name_or_path or model.from_config")
        fed = self.federation
        if fed.fraction is not None:
            fed.clients_per_round = None
        if fed.clients_per_round is None and fed.fraction is None:
            raise ValueError("federation: give federation.clients_per_round or federation.fraction")
        if self.partition.method == "by_file":  # one client per source file: by_column on the 'file' column
            if self.data.client_column is None:
                self.data.client_column = "file"
            elif self.data.client_column != "file":
                raise ValueError(f"partition.method 'by_file' groups by the 'file' column, but data.client_column is "
                                 f"{self.data.client_column!r} (set it to null, or use partition.method by_column)")
        if self.partition.method not in ("by_column", "by_file"):
            n = self.partition.num_clients
            if fed.clients_per_round is not None and fed.clients_per_round > n:
                raise ValueError(
                    f"federation.clients_per_round ({fed.clients_per_round}) is more than "
                    f"partition.num_clients ({n})"
                )
            if fed.min_clients > n:
                raise ValueError(f"federation.min_clients ({fed.min_clients}) is more than partition.num_clients ({n})")
        if self.client.epochs is None and self.client.steps is None:
            raise ValueError("client: give client.epochs or client.steps")
        if self.federation.schedule == "fedbuff" and self.federation.buffer_size < fed.min_clients:
            raise ValueError(f"federation.buffer_size ({self.federation.buffer_size}) is less than "
                             f"federation.min_clients ({fed.min_clients}): no server step could ever happen")
        if self.continual.stages:
            self._continual_checks()
        _check_registered(self)
        return self

    def output_dir(self, cwd: Path | None = None) -> Path:
        base = Path(cwd) if cwd else Path.cwd()
        return Path(self.output.dir) if self.output.dir else base / "runs" / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def check_writable_dir(path: str | Path, field: str) -> None:
    """``path`` is a directory, or can be made one, that this process can write into; checked without creating
    anything (on the nearest part of the path that exists), so a refused run leaves nothing behind."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: {path} is a file; expected a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{field}: {existing} is a file, so {path} cannot be a directory")
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only filesystem" if read_only else "is not writable"
        raise ConfigError(f"{field}: {existing} {why}, so {path} cannot be written")


def _check_registered(cfg: RunConfig) -> None:
    """Names that pick a registered algorithm must exist (checked here, before anything loads)."""
    from . import registries

    fields = registries.fields_of(cfg)
    for field, reg, value in fields:
        if value not in reg:
            raise ValueError(f"{field}: {reg.unknown_message(value)}")
    for _, reg, value in fields:  # what a chosen entry needs of the rest of the run (e.g. prefix: past_key_values)
        check = getattr(reg.get(value), "check_config", None)
        if check is not None:
            check(cfg)


# ---------------------------------------------------------------- loading

CONFIG_PACKAGE = "fedfm.configs"


def builtin_configs() -> dict[str, Path]:
    root = resources.files(CONFIG_PACKAGE)
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping with the same key twice is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by the keys beside it
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first
            except TypeError:  # an unhashable key: the safe loader says so below
                continue
            if seen:
                raise yaml.MarkedYAMLError(context="first", context_mark=first[key], problem=f"duplicate key {key!r}",
                                           problem_mark=key_node.start_mark)
            first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    if isinstance(err, yaml.reader.ReaderError):
        return f"unacceptable character {chr(err.character)!r} at offset {err.position}"
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if problem is None or mark is None:
        return " ".join(str(err).split())
    text = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1})"
    return text


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; expected a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "expected a YAML file") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    return _sections(data, f"config file {path}")


def _sections(data: Any, what: str) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a mapping of sections at the top level")
    return data


def config_from_text(text: str, what: str) -> RunConfig:
    """A config given as YAML text (``what`` names where it came from), read as a config file is (duplicate keys
    refused) and validated."""
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(e)}") from None
    return validate_config(_sections(data, what))


def resolve_config_source(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        return p
    builtins = builtin_configs()
    if name_or_path in builtins:
        return builtins[name_or_path]
    msg = f"no built-in config or file named {name_or_path!r}; built-in configs: {', '.join(sorted(builtins))}"
    close = difflib.get_close_matches(name_or_path, list(builtins), n=1)
    if close:
        msg += f" (did you mean {close[0]!r}?)"
    raise ConfigError(msg)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        parts = [k for k in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part")
        try:
            value = yaml.load(raw, Loader=UniqueKeyLoader) if raw != "" else None
        except yaml.MarkedYAMLError as e:
            if e.problem and e.problem.startswith("duplicate key"):
                raise ConfigError(f"override {key}: {e.problem}") from None
            value = raw
        except yaml.YAMLError:
            value = raw
        out.append((parts, value))
    return out


def set_key(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """``data[parts[0]][parts[1]]… = value``, making the sections on the way."""
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    parsed = parse_overrides(overrides)
    before = optimizer_of(data)
    for parts, value in parsed:
        set_key(data, parts, value)
    return follow_optimizer(data, before, {".".join(parts) for parts, _ in parsed})


# server.lr and server.momentum are the step and momentum of one server optimizer: set in a config (or resolved to
# its defaults), they do not carry over to another. An override that picks another optimizer and leaves them unset
# takes the new optimizer's defaults (SERVER_LR_DEFAULTS): FedAdam does not run at FedAvgM's η 0.7.
_OPTIMIZER_KEYS = ("lr", "momentum")


def optimizer_of(data: dict[str, Any]) -> Any:
    server = data.get("server")
    return server.get("optimizer", ServerConfig.model_fields["optimizer"].default) if isinstance(server, dict) \
        else ServerConfig.model_fields["optimizer"].default


def follow_optimizer(data: dict[str, Any], before: Any, set_keys: set[str]) -> dict[str, Any]:
    """After overrides: if they changed server.optimizer, drop the server.lr / server.momentum they did not set."""
    server = data.get("server")
    if isinstance(server, dict) and "server.optimizer" in set_keys and server.get("optimizer") != before:
        for key in _OPTIMIZER_KEYS:
            if f"server.{key}" not in set_keys:
                server.pop(key, None)
    return data


def _known_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, f in model.model_fields.items():
        names.append(prefix + name)
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names.extend(_known_fields(ann, prefix + name + "."))
    return names


def format_validation_error(err: ValidationError) -> str:
    known = _known_fields(RunConfig)
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {loc!r}"
            close = difflib.get_close_matches(loc, known, n=1, cutoff=0.6)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
            lines.append(msg)
        elif e["type"] in ("value_error", "assertion_error"):
            text = str(e.get("ctx", {}).get("error", e["msg"]))
            lines.append(f"{loc}: {text}" if loc else text)
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f", got {got!r}"
            lines.append(f"{loc}: {e['msg'].lower()}{got_s}")
    return "invalid config: " + "; ".join(lines)


def load_config(name_or_path: str = "bbc-lora", overrides: list[str] | None = None) -> RunConfig:
    """Read a built-in config or a YAML file, apply ``key.sub=value`` overrides, validate."""
    path = resolve_config_source(name_or_path)
    data = _read_yaml(path)
    data = apply_overrides(data, overrides or [])
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
