"""The forward-only inference service of black-box tuning (BBT, Sun et al. 2022; FedBPT, Sun et al. 2023): the owner
of a foundation model keeps its weights in its own process and answers one kind of call, the forward pass.

A call (``POST /forward``) carries token ids of the caller's own examples, their labels, an optional soft prompt
P ∈ R^{n×h} (n virtual tokens of the model's hidden size h) and a verbalizer (one label word per class). The service
runs the causal LM on [P; embed(x); embed(template)] under ``torch.inference_mode`` and answers, per example, the
logits of the label words at the last position and the cross-entropy on them: nothing else. No route returns a
parameter, a gradient or a hidden state; ``GET /describe`` says what a caller needs to shape a prompt (h, the
vocabulary size, the model type) and how many calls each caller made (``X-Fedfm-Caller``); every other route is
refused. Bodies are safetensors (reading them runs no code); the transport is the standard library's
``http.server`` and ``urllib.request``, every request with a timeout.

``start_service`` starts it as its own process on 127.0.0.1 with a free port (the run does so when
``blackbox.service`` is not given); ``python -m fedfm.ownership.blackbox --model '{json}'`` starts one by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load as st_load, save as st_save

from ..errors import ConfigError, FedfmError

MAX_BODY = 64 << 20  # bytes of one request
MAX_ROWS = 1024  # examples of one request


# ---------------------------------------------------------------------------------------------------- the owner's side
class Scorer:
    """The owner's model and tokenizer, and the one computation the service offers."""

    def __init__(self, model_cfg: dict[str, Any], threads: int | None = None):
        from ..models.loader import load_base, load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        cfg = SimpleNamespace(**{"revision": None, "tokenizer": None, "from_config": None, "train_tokenizer": None,
                                 "dropout": None, "quantization": None, "gguf_file": None, **model_cfg})
        self.tokenizer = load_tokenizer(cfg)
        if self.tokenizer is None:
            raise ConfigError("blackbox: the inference service reads label words and a template: give "
                              "model.tokenizer with a model built from model.from_config")
        kwargs = {"is_decoder": True} if (cfg.from_config or {}).get("model_type") == "bert" else {}
        if self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        torch.manual_seed(0)  # a model built from a config is the same in every service
        self.model = load_base(cfg, "AutoModelForCausalLM", **kwargs)
        self.model.eval()
        self.model.requires_grad_(False)
        self.hidden = int(self.model.get_input_embeddings().weight.shape[1])
        self.vocab = int(self.model.get_input_embeddings().weight.shape[0])
        self.model_type = str(getattr(self.model.config, "model_type", "unknown"))
        self._words: dict[tuple[str, ...], torch.Tensor] = {}

    def describe(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden, "vocab_size": self.vocab, "model_type": self.model_type}

    def label_ids(self, words: list[str]) -> torch.Tensor:
        """The first token of " word" for each label word; two words on one token are refused."""
        key = tuple(words)
        if key not in self._words:
            ids = []
            for w in words:
                toks = self.tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"]
                if not toks:
                    raise ValueError(f"verbalizer: label word {w!r} has no token")
                ids.append(toks[0])
            if len(set(ids)) != len(ids):
                raise ValueError(f"verbalizer: two label words start with the same token ({words})")
            self._words[key] = torch.tensor(ids, dtype=torch.long)
        return self._words[key]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                prompt: torch.Tensor | None, words: list[str], template: str) -> dict[str, torch.Tensor]:
        """Per example: logits of the label words after [P; x; template], and the cross-entropy on them."""
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape or len(input_ids) > MAX_ROWS:
            raise ValueError(f"input_ids and attention_mask: two [B, T] tensors of equal shape, B <= {MAX_ROWS}")
        if len(input_ids) == 0 or int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab:
            raise ValueError(f"input_ids: token ids in [0, {self.vocab}) expected")
        if prompt is not None and (prompt.ndim != 2 or prompt.shape[1] != self.hidden or len(prompt) > 512
                                   or not torch.isfinite(prompt).all()):
            raise ValueError(f"prompt: a finite [n, {self.hidden}] tensor (n <= 512) expected, got "
                             f"{tuple(prompt.shape)}")
        if labels is not None and (labels.shape != (len(input_ids),) or int(labels.min()) < 0
                                   or int(labels.max()) >= len(words)):
            raise ValueError(f"labels: one class index in [0, {len(words)}) per example expected")
        emb = self.model.get_input_embeddings()
        suffix = torch.tensor(self.tokenizer(template, add_special_tokens=False)["input_ids"], dtype=torch.long)
        lengths = attention_mask.sum(1)
        first = {self.tokenizer.bos_token_id, self.tokenizer.cls_token_id} - {None}
        rows = []
        for ids, n in zip(input_ids, lengths.tolist()):
            e = emb(torch.cat([ids[:n], suffix]))
            if prompt is not None:  # after a leading BOS/[CLS] (as BBT puts it after <s>), else in front
                k = 1 if n and int(ids[0]) in first else 0
                e = torch.cat([e[:k], prompt.to(e.dtype), e[k:]])
            rows.append(e)
        width = max(len(r) for r in rows)
        x = torch.zeros(len(rows), width, self.hidden, dtype=rows[0].dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :len(r)], mask[i, :len(r)] = r, 1
        last, at = torch.tensor([len(r) - 1 for r in rows]), torch.arange(len(rows))
        ids = self.label_ids(words)
        head = getattr(self.model, "lm_head", None)
        if isinstance(head, torch.nn.Linear):  # the label words' rows of the head, at the last position only
            h = self.model.base_model(inputs_embeds=x, attention_mask=mask).last_hidden_state[at, last]
            logits = torch.nn.functional.linear(h, head.weight[ids], None if head.bias is None else head.bias[ids])
        else:
            logits = self.model(inputs_embeds=x, attention_mask=mask).logits[at, last][:, ids]
        logits = logits.float()
        result = {"logits": logits.contiguous()}
        if labels is not None:
            result["losses"] = torch.nn.functional.cross_entropy(logits, labels, reduction="none").contiguous()
        return result


class Service:
    """The HTTP front of a ``Scorer``: ``POST /forward``, ``GET /describe``, nothing else; counts calls per caller."""

    def __init__(self, scorer: Scorer, host: str = "127.0.0.1", port: int = 0):
        from http.server import BaseHTTPRequestHandler, HTTPServer

        self.scorer = scorer
        self.calls: dict[str, dict[str, int]] = {}  # caller -> {"calls", "examples"}
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _refuse(self, code: int, why: str) -> None:
                self._reply(code, json.dumps({"error": why}).encode(), "application/json")

            def do_GET(self):
                if self.path != "/describe":
                    return self._refuse(404, f"no route GET {self.path}: this service answers POST /forward only")
                body = {**service.scorer.describe(), "calls": service.calls}
                self._reply(200, json.dumps(body).encode(), "application/json")

            def do_POST(self):
                if self.path != "/forward":
                    return self._refuse(404, f"no route POST {self.path}: this service answers POST /forward only")
                size = int(self.headers.get("Content-Length") or 0)
                if not 0 < size <= MAX_BODY:
                    return self._refuse(413, f"a body of 1..{MAX_BODY} bytes expected")
                try:
                    meta = json.loads(self.headers.get("X-Fedfm-Request") or "{}")
                    tensors = st_load(self.rfile.read(size))
                    out = service.scorer.forward(tensors["input_ids"].long(), tensors["attention_mask"].long(),
                                                 tensors["labels"].long() if "labels" in tensors else None,
                                                 tensors["prompt"].float() if "prompt" in tensors else None,
                                                 list(meta["verbalizer"]), str(meta.get("template", "")))
                except Exception as e:  # a body that is not what a forward call sends: refused, the service goes on
                    return self._refuse(400, f"{type(e).__name__}: {e}")
                caller = str(self.headers.get("X-Fedfm-Caller") or "anonymous")[:64]
                count = service.calls.setdefault(caller, {"calls": 0, "examples": 0})
                count["calls"] += 1
                count["examples"] += int(len(tensors["input_ids"]))
                self._reply(200, st_save(out), "application/octet-stream")

            do_PUT = do_DELETE = do_PATCH = lambda self: self._refuse(405, "only POST /forward and GET /describe")

        self.httpd = HTTPServer((host, port), Handler)
        self.address = f"http://{host}:{self.httpd.server_address[1]}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------------- the caller's side
def normalize(address: str) -> str:
    """``host:port`` or ``http://host:port`` -> ``http://host:port`` (refused otherwise, naming blackbox.service)."""
    from urllib.parse import urlsplit

    url = address if "://" in address else f"http://{address}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(f"blackbox.service: {address!r} is not an address of the form host:port or "
                         f"http://host:port")
    return f"http://{parts.hostname}:{port}"


class ServiceClient:
    """A caller of the service: what it knows of the model is what ``/describe`` says; every request times out."""

    def __init__(self, address: str, timeout_s: float):
        self.address, self.timeout_s = normalize(address), float(timeout_s)

    def _open(self, request) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            try:
                why = json.loads(e.read()).get("error", "")
            except (ValueError, OSError):
                why = ""
            raise FedfmError(f"the inference service at {self.address} refused {request.get_method()} "
                             f"{request.selector} ({e.code}): {why}") from None
        except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out
            reason = getattr(e, "reason", e)
            raise FedfmError(f"no inference service answered at {self.address} within "
                             f"blackbox.timeout_s={self.timeout_s:g} s ({reason}); start one (python -m "
                             f"fedfm.ownership.blackbox) or leave blackbox.service empty to let the run start "
                             f"its own") from None

    def describe(self) -> dict[str, Any]:
        return json.loads(self._open(urllib.request.Request(self.address + "/describe")))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                prompt: torch.Tensor | None, verbalizer: list[str], template: str,
                caller: str) -> dict[str, torch.Tensor]:
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            tensors["labels"] = labels
        if prompt is not None:
            tensors["prompt"] = prompt.float()
        body = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        request = urllib.request.Request(self.address + "/forward", data=body, method="POST", headers={
            "Content-Type": "application/octet-stream", "X-Fedfm-Caller": caller,
            "X-Fedfm-Request": json.dumps({"verbalizer": list(verbalizer), "template": template})})
        return st_load(self._open(request))


class ServiceProcess:
    """An inference service this process started (``start_service``): its address, and ``close``."""

    def __init__(self, proc: subprocess.Popen, address: str, log: Path):
        self.proc, self.address, self.log = proc, address, log

    def close(self, keep_log: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not keep_log:
            self.log.unlink(missing_ok=True)


def start_service(model_cfg: dict[str, Any], start_timeout_s: float, threads: int | None = None) -> ServiceProcess:
    """The owner's service in its own process on 127.0.0.1 and a free port, once its model is loaded; it stops when
    ``close`` is called or when this process ends (it watches its parent)."""
    import atexit
    import tempfile

    import fedfm

    env = dict(os.environ)
    root = str(Path(fedfm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = Path(tempfile.mkstemp(prefix="fedfm-blackbox-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "fedfm.ownership.blackbox", "--model", json.dumps(model_cfg),
           "--parent", str(os.getpid())] + (["--threads", str(threads)] if threads else [])
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    handle = ServiceProcess(proc, "", log)
    atexit.register(handle.close)
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(start_timeout_s)
    if not line or not line[0].startswith(b"listening on "):
        if line and not line[0]:  # its output closed: it is ending
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        code = proc.poll()
        handle.close(keep_log=True)  # the error names it
        lines = log.read_text(errors="replace").strip().splitlines()
        why = (f"exited with code {code} before it listened" if code is not None else
               f"did not listen within blackbox.start_timeout_s={start_timeout_s:g} s")
        raise FedfmError(f"the inference service {why}: {lines[-1] if lines else 'no output'} (its log: {log})")
    handle.address = line[0].decode().split("listening on ", 1)[1].strip()
    return handle


def _watch_parent(parent: int, service: Service) -> None:
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent, 0)
        except OSError:
            service.shutdown()
            return
        if os.getppid() != parent:
            service.shutdown()
            return


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fedfm.ownership.blackbox",
                                 description="The forward-only inference service of black-box tuning.")
    ap.add_argument("--model", required=True, help="the model section as JSON, e.g. '{\"name_or_path\": \"smollm2\"}'")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parent", type=int, default=None, help="stop when this process ends")
    args = ap.parse_args(argv)
    service = Service(Scorer(json.loads(args.model), args.threads), args.host, args.port)
    if args.parent:
        threading.Thread(target=_watch_parent, args=(args.parent, service), daemon=True).start()
    print(f"listening on {service.address}", flush=True)
    try:
        service.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
