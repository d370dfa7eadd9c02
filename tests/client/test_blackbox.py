"""Black-box tuning (client.algorithm fedbpt): the owner's forward-only service, a client side that holds no model,
CMA-ES on z, and what is refused before anything loads."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from fedfm.config import load_config
from fedfm.errors import FedfmError
from fedfm.ownership.blackbox import Service, ServiceClient, start_service
from tests.conftest import TINY_BERT, make_rows, tiny_overrides, write_csv

WORDS = ["money", "music", "sport", "tech"]  # the tiny data's labels, sorted


def fedbpt(**extra) -> dict:
    return {"client.algorithm": "fedbpt", "adapter.method": "prompt", "adapter.num_virtual_tokens": 3,
            "blackbox.intrinsic_dim": 6, "blackbox.popsize": 4, "blackbox.iterations": 2, "blackbox.timeout_s": 20,
            "partition.num_clients": 3, "federation.clients_per_round": 2, "eval.per_client": False, **extra}


@pytest.fixture(scope="module")
def service():
    """The owner's service on a tiny model built from a config, in its own process."""
    proc = start_service({"from_config": TINY_BERT, "tokenizer": "minilm", "name_or_path": None}, 300, threads=1)
    yield proc
    proc.close()


@pytest.fixture
def csv(tmp_path):
    return write_csv(tmp_path / "tiny.csv", make_rows(120))


def _post(address: str, path: str, body: bytes = b"x", method: str = "POST", headers=None):
    req = urllib.request.Request(address + path, data=body if method in ("POST", "PUT") else None, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_service_answers_forward_calls_only(service):
    client = ServiceClient(service.address, 20)
    info = client.describe()
    assert info["hidden_size"] == TINY_BERT["hidden_size"] and "calls" in info
    ids = torch.tensor([[101, 2300, 2154, 102], [101, 4248, 102, 0]])
    mask = (ids > 0).long()
    labels = torch.tensor([0, 3])
    plain = client.forward(ids, mask, labels, None, WORDS, " topic:", "test")
    assert set(plain) == {"logits", "losses"}  # no parameter, gradient or hidden state comes back
    assert plain["logits"].shape == (2, len(WORDS)) and plain["losses"].shape == (2,)
    reference = torch.nn.functional.cross_entropy(plain["logits"], labels, reduction="none")
    assert torch.allclose(plain["losses"], reference, atol=1e-5)
    prompted = client.forward(ids, mask, labels, torch.randn(3, TINY_BERT["hidden_size"]), WORDS, " topic:", "test")
    assert not torch.allclose(prompted["logits"], plain["logits"])  # the soft prompt reaches the model
    assert client.describe()["calls"]["test"] == {"calls": 2, "examples": 4}
    body = st_save({"input_ids": ids, "attention_mask": mask})
    for method, path in [("GET", "/parameters"), ("GET", "/state_dict"), ("POST", "/gradients"),
                         ("POST", "/hidden_states"), ("POST", "/describe"), ("GET", "/forward"),
                         ("PUT", "/forward"), ("DELETE", "/forward"), ("POST", "/forward/../parameters")]:
        code, _ = _post(service.address, path, body, method)
        assert code in (404, 405), (method, path, code)
    # a prompt of the wrong width, ids outside the vocabulary: refused with the reason, the service goes on
    code, reply = _post(service.address, "/forward", st_save({"input_ids": ids, "attention_mask": mask,
                                                              "prompt": torch.zeros(3, 7)}),
                        headers={"X-Fedfm-Request": json.dumps({"verbalizer": WORDS})})
    assert code == 400 and b"prompt" in reply
    with pytest.raises(FedfmError, match="input_ids"):
        client.forward(ids + 10 ** 6, mask, labels, None, WORDS, "", "test")
    assert client.describe()["hidden_size"] == TINY_BERT["hidden_size"]


CLIENT_SIDE = r"""
import gc, json, sys
import torch
from fedfm.config import load_config
from fedfm.simulation import Simulation, prepare
sys.path.insert(0, {root!r})
from tests.conftest import tiny_overrides
cfg = load_config("bbc-lora", tiny_overrides({csv!r}, __import__("pathlib").Path({tmp!r}), **json.loads({extra!r})))
sim = Simulation(prepare(cfg))
rows = sim.run()
import transformers
models = [o for o in gc.get_objects() if isinstance(o, transformers.PreTrainedModel)]
params = [o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)]
grads = [p for p in params if p.grad is not None]
print(json.dumps({{"rows": rows, "models": len(models), "params": [list(p.shape) for p in params],
                  "grads": len(grads),
                  "modeling": sorted(m for m in sys.modules
                                     if m.startswith("transformers.models.") and ".modeling_" in m),
                  "z": sim.server.global_flat.tolist()}}, default=str))
"""


def test_a_fedbpt_run_holds_no_model_parameter_and_reports_its_calls(service, csv, tmp_path):
    """The whole run (client side and server side) in a fresh process that never loads the model: no model object,
    no parameter but z, no gradient; the service counted λ × iterations calls per client and round; z moved."""
    extra = fedbpt(**{"blackbox.service": service.address, "eval.federated": True})
    code = CLIENT_SIDE.format(root=str(Path(__file__).resolve().parents[2]), csv=str(csv), tmp=str(tmp_path),
                              extra=json.dumps(extra))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["models"] == 0 and got["grads"] == 0
    assert got["params"] == [[6]]  # z ∈ R^d is the only parameter in the process
    assert not got["modeling"], got["modeling"]  # no model architecture was even imported
    rows = [r for r in got["rows"] if r["round"] > 0]
    assert len(rows) == 2 and all(r["aggregated"] for r in rows)
    for r in rows:
        assert len(r["api_calls"]) == 2
        # λ·iterations candidates scored, and one call for the federated evaluation of the received prompt
        assert all(c == 4 * 2 + 1 for c in r["api_calls"].values()), r["api_calls"]
        assert r["bytes_up"] < 2 * (6 * 4 + 200)  # Δz: d fp32 values and the codec's header
        assert "eval_accuracy" in r and "eval_zero_prompt_accuracy" in r
    assert any(abs(v) > 0 for v in got["z"])


class Quadratic:
    """A stand-in owner whose loss is ‖P − P*‖² (no model): CMA-ES and FedAvg on z must bring P towards P*."""

    def __init__(self, target: torch.Tensor):
        self.target, self.hidden = target, target.shape[1]

    def describe(self):
        return {"hidden_size": self.hidden, "vocab_size": 30522, "model_type": "quadratic"}

    def forward(self, input_ids, attention_mask, labels, prompt, words, template):
        d = float(((prompt - self.target) ** 2).sum()) if prompt is not None else float((self.target ** 2).sum())
        return {"logits": torch.zeros(len(input_ids), len(words)), "losses": torch.full((len(input_ids),), d)}


def test_cma_es_clients_and_fedavg_on_z_descend_a_known_loss(csv, tmp_path):
    from fedfm.client.blackbox import projection
    from fedfm.simulation import Simulation, prepare

    ov = fedbpt(**{"blackbox.iterations": 6, "blackbox.popsize": 6, "blackbox.sigma": 0.5, "federation.rounds": 3,
                   "blackbox.projection_std": 1.0, "eval.every": 0})
    cfg = load_config("bbc-lora", tiny_overrides(csv, tmp_path, **ov))
    A = projection(cfg, 8)
    z_star = torch.linspace(-1, 1, 6)
    service = Service(Quadratic((z_star @ A).view(3, 8)))
    threading.Thread(target=service.serve_forever, daemon=True).start()
    try:
        cfg = load_config("bbc-lora", tiny_overrides(csv, tmp_path, **ov, **{"blackbox.service": service.address}))
        sim = Simulation(prepare(cfg))
        sim.run()
        z = sim.server.global_flat
        calls = {k: dict(v) for k, v in service.calls.items()}
        again = Simulation(prepare(cfg))  # CMA-ES draws by purpose from the task seed: the same run twice
        again.run()
        assert torch.equal(again.server.global_flat, z)
    finally:
        service.shutdown()
    loss = lambda v: float((((v - z_star) @ A) ** 2).sum())  # noqa: E731
    assert loss(z) < 0.5 * loss(torch.zeros(6)), (loss(z), loss(torch.zeros(6)))
    assert calls and all(c.startswith("client-") for c in calls)  # each client called as itself, the server not
    assert sum(c["calls"] for c in calls.values()) == 3 * 2 * 6 * 6  # rounds × clients × λ × iterations


def test_an_unreachable_service_stops_the_run_naming_the_address_before_any_model_loads(csv, tmp_path):
    from fedfm.simulation import prepare

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config("bbc-lora", tiny_overrides(csv, tmp_path, **fedbpt(**{"blackbox.service": f"127.0.0.1:{port}"})))
    with pytest.raises(FedfmError, match=f"127.0.0.1:{port}"):
        prepare(cfg)
    # a peer that accepts and never answers: a timeout of blackbox.timeout_s, not a hang
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        cfg = load_config("bbc-lora", tiny_overrides(csv, tmp_path, **fedbpt(
            **{"blackbox.service": address, "blackbox.timeout_s": 1.0})))
        t0 = time.perf_counter()
        with pytest.raises(FedfmError, match=f"{address}.*blackbox.timeout_s=1"):
            prepare(cfg)
        assert time.perf_counter() - t0 < 10


def test_a_service_that_cannot_start_says_why_with_its_log():
    t0 = time.perf_counter()
    with pytest.raises(FedfmError, match="exited with code 1 before it listened: .*model.name_or_path"):
        start_service({"name_or_path": "/nonexistent/model"}, 120)
    assert time.perf_counter() - t0 < 120


@pytest.mark.parametrize("override, key", [
    ({"adapter.method": "lora"}, "adapter.method"),
    ({"privacy.mode": "sample", "privacy.noise_multiplier": 1.0}, "privacy.mode"),
    ({"runtime.name": "batched"}, "runtime.name"),
    ({"task.name": "instruction"}, "task.name"),
    ({"eval.finetune_steps": 2}, "eval.finetune_steps"),
    ({"blackbox.service": "not an address:x"}, "blackbox.service"),
    ({"blackbox.popsize": 1}, "blackbox.popsize"),
])
def test_what_fedbpt_cannot_do_is_refused_at_config_time_naming_the_key(csv, tmp_path, override, key):
    with pytest.raises(Exception) as e:
        load_config("bbc-lora", tiny_overrides(csv, tmp_path, **fedbpt(**override)))
    assert key in str(e.value)


def test_a_deployment_refuses_fedbpt_naming_the_key(csv, tmp_path):
    from fedfm.deploy import check_config
    from fedfm.errors import ConfigError

    with pytest.raises(ConfigError, match="client.algorithm 'fedbpt'"):
        check_config(load_config("bbc-lora", tiny_overrides(csv, tmp_path, **fedbpt())))


def test_the_verbalizer_must_name_one_word_per_class(service, csv, tmp_path):
    from fedfm.errors import ConfigError
    from fedfm.simulation import Simulation, prepare

    cfg = load_config("bbc-lora", tiny_overrides(csv, tmp_path, **fedbpt(
        **{"blackbox.service": service.address, "blackbox.verbalizer": ["a", "b"]})))
    with pytest.raises(ConfigError, match="blackbox.verbalizer"):
        Simulation(prepare(cfg))


def test_the_service_body_reads_without_running_code(service):
    """Bodies both ways are safetensors: a pickle is refused, not unpickled."""
    import pickle

    code, reply = _post(service.address, "/forward", pickle.dumps({"input_ids": [1]}),
                        headers={"X-Fedfm-Request": json.dumps({"verbalizer": WORDS})})
    assert code == 400 and b"error" in reply
    assert ServiceClient(service.address, 20).describe()["hidden_size"] == TINY_BERT["hidden_size"]  # still serving
