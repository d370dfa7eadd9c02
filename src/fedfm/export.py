"""Export a finished run: the PEFT adapter as is, or merged into the base as a plain transformers model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from .errors import FedfmError


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False) -> Path:
    from .config import load_config
    from .models.loader import load_base, load_tokenizer
    from .tasks import TASKS

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").exists():
        raise FedfmError(f"export: {run_dir} is not a run directory (no config.yaml)")
    if out.exists() and any(out.iterdir()):
        raise FedfmError(f"export --out: {out} already exists and is not empty; choose a new directory")
    adapter, full = run_dir / "adapter", run_dir / "model"
    if not adapter.exists() and not full.exists():
        raise FedfmError(f"export: {run_dir} has no final adapter/ or model/ (did the run finish?)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if full.exists() or not merge:
        shutil.copytree(full if full.exists() else adapter, tmp)
    else:
        import torch
        from peft import PeftModel

        cfg = load_config(str(run_dir / "config.yaml"))
        task_cls = TASKS.get(cfg.task.name)
        names = json.loads((run_dir / "partition.json").read_text()).get("label_names")
        tokenizer = load_tokenizer(cfg.model)
        task = task_cls(cfg, tokenizer)
        kwargs = task.model_kwargs(SimpleNamespace(label_names=names)) if task_cls.needs_labels else {}
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        torch.manual_seed(cfg.federation.seed)  # as build_model: a base built from model.from_config is the trained one
        base = load_base(cfg.model, task.auto_class, **kwargs)
        model = PeftModel.from_pretrained(base, str(adapter))
        if not hasattr(model, "merge_and_unload") or cfg.adapter.method in ("prompt", "prefix"):
            raise FedfmError(f"export --merge: adapter.method {cfg.adapter.method!r} cannot be merged into the base; "
                             "export without --merge and load it with PeftModel.from_pretrained")
        merged = model.merge_and_unload()
        merged.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
