"""Export a finished run: the PEFT adapter as is, or merged into the base as a plain transformers model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from .errors import FedfmError


def _final_dir(run_dir: Path) -> Path:
    if not (run_dir / "config.yaml").exists():
        raise FedfmError(f"{run_dir} is not a run directory (no config.yaml)")
    for name in ("adapter", "model"):
        if (run_dir / name).exists():
            return run_dir / name
    raise FedfmError(f"{run_dir} has no final adapter/ or model/ (did the run finish?)")


def load_trained(run_dir: str | Path):
    """(config, model, tokenizer) of a finished run: the base with the federated adapter, or the trained full model.

    The tokenizer is the one the run saved next to its adapter (so a tokenizer trained during the run is reused).
    """
    from transformers import AutoTokenizer

    from .config import load_config
    from .models import build_base
    from .models.loader import quiet_transformers
    from .tasks import TASKS

    run_dir = Path(run_dir)
    final = _final_dir(run_dir)
    cfg = load_config(str(run_dir / "config.yaml"))
    quiet_transformers()
    tokenizer = None
    if (final / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(final))
    if final.name == "model":
        import transformers

        model = getattr(transformers, TASKS.get(cfg.task.name).auto_class).from_pretrained(str(final))
    else:
        from peft import PeftModel

        names = json.loads((run_dir / "partition.json").read_text()).get("label_names")
        _, base = build_base(cfg, tokenizer, SimpleNamespace(label_names=names))  # the base the run trained on
        model = PeftModel.from_pretrained(base, str(final))
    model.eval()
    return cfg, model, tokenizer


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False) -> Path:
    from .config import check_writable_dir

    run_dir, out = Path(run_dir), Path(out)
    final = _final_dir(run_dir)
    check_writable_dir(out, "export --out")
    check_writable_dir(out.parent, "export --out")  # the copy is written beside it, then renamed into place
    if out.exists() and any(out.iterdir()):
        raise FedfmError(f"export --out: {out} already exists and is not empty; choose a new directory")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if final.name == "model" or not merge:
        shutil.copytree(final, tmp)
    else:
        cfg, model, tokenizer = load_trained(run_dir)
        if not hasattr(model, "merge_and_unload") or cfg.adapter.method in ("prompt", "prefix"):
            raise FedfmError(f"export --merge: adapter.method {cfg.adapter.method!r} cannot be merged into the base; "
                             "export without --merge and load it with PeftModel.from_pretrained")
        merged = model.merge_and_unload()
        merged.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if (final / "preprocessor_config.json").exists():  # an image model's processor, saved by the run
            shutil.copy2(final / "preprocessor_config.json", tmp / "preprocessor_config.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def check_generates(run_dir: str | Path) -> None:
    """``fedfm generate`` needs a run whose task writes text: said from the run's config, before any weights load."""
    from .config import load_config

    run_dir = Path(run_dir)
    _final_dir(run_dir)
    task = load_config(str(run_dir / "config.yaml")).task.name
    if task not in ("instruction", "lm"):
        raise FedfmError(f"generate: {run_dir} is a run of task.name {task!r}, which does not generate text "
                         "(use a run of task instruction or lm)")


def answer(run_dir: str | Path, question: str, max_new_tokens: int = 64) -> str:
    """The run's model answering one question: chat template (or the task's prompt layout) applied, greedy."""
    from .tasks.instruction import InstructionTuning, generate_text

    check_generates(run_dir)
    cfg, model, tokenizer = load_trained(run_dir)
    if tokenizer is None:
        raise FedfmError(f"generate: {run_dir} saved no tokenizer, so text cannot be read or written")
    if getattr(model.config, "is_encoder_decoder", False):
        raise FedfmError(f"generate: the model of {run_dir} is an encoder-decoder; use a run of a causal LM")
    if cfg.task.name == "instruction":
        prompt = InstructionTuning(cfg, tokenizer).prompt_for(question)
    else:
        prompt = question
    return generate_text(model, tokenizer, [prompt], max_new_tokens)[0]
