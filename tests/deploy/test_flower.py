"""fedfm between organisations over Flower: a SuperLink and SuperNodes on loopback, each its own process, with TLS
and SuperNode authentication; the server side never opens a client's file; a deployment trains the simulation's
model."""
import json
import textwrap
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fedfm.config import load_config
from fedfm.deploy.local import LocalFederation, make_node_key
from tests.conftest import make_rows, tiny_overrides, write_csv

# every Python the SuperLink (or a SuperNode) starts logs the files it opens (PEP 578 audit hooks): the ServerApp,
# the SuperExec, the ClientApps; opened once, before the hook, so that logging an open opens nothing
AUDIT = textwrap.dedent("""
    import os, sys
    _path = os.environ.get("FEDFM_AUDIT_OPENS")
    if _path:
        _log = open(_path, "a", buffering=1)
        def _hook(event, args, _log=_log, _pid=os.getpid()):
            if event == "open" and args and isinstance(args[0], (str, bytes)):
                _log.write(f"{_pid} {os.fsdecode(args[0])}\\n")
        sys.addaudithook(_hook)
""")


def _sites(tmp_path: Path, n: int = 3):
    """Each organisation's own folder: its training file and its test file, nobody else's."""
    rows = make_rows(n=240, seed=3, sites=n)
    out = []
    for i in range(n):
        mine = [r for r in rows if r["site"] == f"site{i}"]
        org = tmp_path / f"org{i}"
        org.mkdir()
        out.append((write_csv(org / "train.csv", mine[:-16]), write_csv(org / "test.csv", mine[-16:])))
    return out


def _audited(tmp_path: Path, name: str) -> dict[str, str]:
    hooks = tmp_path / "audit"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(AUDIT)
    return {"PYTHONPATH": str(hooks), "FEDFM_AUDIT_OPENS": str(tmp_path / f"opens-{name}.log")}


def _opened(tmp_path: Path, name: str) -> set[str]:
    log = tmp_path / f"opens-{name}.log"
    return {line.split(" ", 1)[1] for line in log.read_text().splitlines()} if log.exists() else set()


def test_three_authenticated_sites_over_tls_and_the_server_never_opens_their_files(tmp_path):
    sites = _sites(tmp_path)
    # the server side's config names no data it could read: it never needs any
    cfg = load_config("bbc-lora", tiny_overrides(tmp_path / "the-server-holds-no-data.csv", tmp_path, **{
        "partition.num_clients": 3, "federation.clients_per_round": 3, "federation.rounds": 2,
        "runtime.connect_timeout_s": 120, "runtime.worker_timeout_s": 300}))
    with LocalFederation(tmp_path / "flower", secure=True, server_env=_audited(tmp_path, "server")) as fed:
        fed.start_superlink()
        for i, (train, test) in enumerate(sites):
            fed.start_supernode(f"site{i}", train, test, env=_audited(tmp_path, f"site{i}"))
        # a fourth organisation whose key nobody registered
        key, _ = make_node_key(tmp_path / "intruder", "intruder")
        intruder = fed.start_supernode("intruder", sites[0][0], register=False, private_key=key)
        status = fed.run(cfg.to_yaml(), timeout_s=900)
        run_log = (fed.work / "run.log").read_text()
        assert status == "finished:completed", run_log[-3000:]
        # the SuperLink refused it: it stopped on its own (the same flags as the others', its key unregistered)
        intruder_code = intruder.wait(timeout=120)
        intruder_log = (fed.work / "supernode-intruder.log").read_text()

    # only the three registered SuperNodes took part; the intruder was turned away by the SuperLink
    assert "3 SuperNodes connected" in run_log
    partition = json.loads((Path(cfg.output.dir) / "partition.json").read_text())
    assert [c["id"] for c in partition["clients"]] == [0, 1, 2] and partition["method"] == "deployment"
    assert intruder_code != 0 and "Failed to activate SuperNode" in intruder_log, intruder_log[-2000:]

    # the run directory is the simulation's: config, metrics, checkpoints, the PEFT adapter, the report
    run = Path(cfg.output.dir)
    for name in ("config.yaml", "metrics.jsonl", "checkpoints", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "report"):
        assert (run / name).exists(), name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["dropped"] == [] and sorted(r["clients"]) == [0, 1, 2]
        # accuracy from the clients' own test files: 16 examples each
        assert r["fed_clients"] == 3 and r["fed_examples"] == 48 and 0.0 <= r["fed_accuracy"] <= 1.0
        # what travelled is fedfm's codec bytes, counted at the message (plus the task/result headers, the config)
        assert r["bytes_up"] <= r["message_bytes_up"] < r["bytes_up"] + 3 * 4096
        assert r["bytes_down"] < r["message_bytes_down"]

    # data stays home, shown: no server-side process opened a site's file; each site opened its own and no other's
    site_files = {str(p.resolve()) for pair in sites for p in pair}
    server_opened = {str(Path(p).resolve()) for p in _opened(tmp_path, "server")}
    assert server_opened, "the audit hook saw nothing on the server side"
    assert any("fedfm" in p for p in server_opened)  # it did run fedfm's server side
    assert not server_opened & site_files
    for i, pair in enumerate(sites):
        mine = {str(Path(p).resolve()) for p in _opened(tmp_path, f"site{i}")}
        assert {str(p.resolve()) for p in pair} <= mine
        assert not (mine & site_files) - {str(p.resolve()) for p in pair}


def _serverapp(superlink_pid: int):
    """The ServerApp process (fedfm's server side) the SuperLink started, once it runs."""
    import psutil

    for p in psutil.Process(superlink_pid).children(recursive=True):
        try:
            if any("flwr-serverapp" in part for part in p.cmdline()):
                return p
        except psutil.Error:
            pass
    return None


def _simulated_and_sites(tmp_path: Path, extra: dict):
    """A simulation of 3 clients run to the end, each client's examples (in the simulation's order) written to its
    own training and test files, and the same config for a deployment (its data.source never read)."""
    from fedfm.simulation import Simulation, prepare
    from fedfm.tracking import RunDir

    rows = make_rows(n=180, seed=5, sites=3)
    table = write_csv(tmp_path / "all.csv", rows)
    common = {"partition.num_clients": 3, "federation.clients_per_round": 2, "federation.rounds": 2,
              "data.test_fraction": 0, "eval.federated": True, "eval.per_client": False,
              "runtime.connect_timeout_s": 120, "runtime.worker_timeout_s": 300, **extra}
    sim_cfg = load_config("bbc-lora", tiny_overrides(table, tmp_path, **common, **{"output.dir": str(tmp_path / "sim")}))
    prepared = prepare(sim_cfg)
    rd = RunDir(sim_cfg.output.dir)
    rd.create(overwrite=False)
    rd.write_config(sim_cfg.to_yaml())
    sim_rows = Simulation(prepared, rd).run()
    sites = []
    for c in prepared.data.clients:
        pick = lambda idx: [rows[int(i)] for i in idx]  # noqa: E731  (load_examples kept every row, in order)
        org = tmp_path / f"org{c.id}"
        org.mkdir()
        sites.append((write_csv(org / "train.csv", pick(c.train)), write_csv(org / "test.csv", pick(c.test))))
    dep_cfg = load_config("bbc-lora", tiny_overrides(tmp_path / "no-data-here.csv", tmp_path,
                                                     **common, **{"output.dir": str(tmp_path / "dep")}))
    return sim_rows, sites, dep_cfg


def _same_adapter(tmp_path: Path) -> None:
    """The deployment's final adapter is the simulation's, within 1e-6."""
    sim_adapter = load_file(str(tmp_path / "sim" / "adapter" / "adapter_model.safetensors"))
    dep_adapter = load_file(str(tmp_path / "dep" / "adapter" / "adapter_model.safetensors"))
    assert sim_adapter.keys() == dep_adapter.keys() and sim_adapter
    for k in sim_adapter:
        torch.testing.assert_close(dep_adapter[k], sim_adapter[k], rtol=0, atol=1e-6)


def test_a_deployment_trains_the_simulations_model_even_when_its_server_side_is_killed_and_resumed(tmp_path):
    """Same seed, data and config: each SuperNode holds exactly its simulated client's examples (training and test),
    and the final adapter is the simulation's within 1e-6: also when the server side (the ServerApp process) is
    SIGKILLed after round 1's checkpoint and the run goes on with ``resume`` (``fedfm deploy run --resume``)."""
    import threading
    import time

    sim_rows, sites, dep_cfg = _simulated_and_sites(tmp_path, {"federation.rounds": 3})
    with LocalFederation(tmp_path / "flower", secure=False) as fed:
        fed.start_superlink()
        for i, (train, test) in enumerate(sites):
            fed.start_supernode(f"site{i}", train, test, client_id=i)
        first: dict = {}
        runner = threading.Thread(target=lambda: first.update(status=fed.run(dep_cfg.to_yaml(), timeout_s=900)))
        runner.start()
        checkpoint = tmp_path / "dep" / "checkpoints" / "round_0001.pt"
        deadline = time.monotonic() + 600
        while not checkpoint.exists() and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint.exists(), (fed.work / "run.log").read_text()[-3000:]
        server_side = _serverapp(fed.procs[0].pid)
        assert server_side is not None
        server_side.kill()  # SIGKILL: no clean-up of any kind
        runner.join(timeout=600)
        assert first["status"] != "finished:completed"
        status = fed.run(dep_cfg.to_yaml(), resume=True, timeout_s=900)
        log = (fed.work / "run.log").read_text()
        assert status == "finished:completed", log[-3000:]
        assert "resuming after round 1" in log or "resuming after round 2" in log, log[-3000:]

    dep_rows = [json.loads(x) for x in (tmp_path / "dep" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in dep_rows] == [1, 2, 3]  # each round once: what the killed side logged was cut back
    assert [r["clients"] for r in dep_rows] == [r["clients"] for r in sim_rows]  # the same clients sampled
    for a, b in zip(sim_rows, dep_rows):
        np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(b["fed_accuracy"], a["fed_accuracy"], rtol=0, atol=1e-9)
    _same_adapter(tmp_path)


def test_sample_level_dp_in_a_deployment_is_the_simulations(tmp_path):
    """privacy.mode sample: DP-SGD on each SuperNode, its accountant's steps kept in its state directory across
    rounds (a new ClientApp process every round); with the noise seeded (privacy.randomness: seeded) the deployment
    gives the simulation's model and the simulation's ε, round by round."""
    dp = {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "privacy.clip": 1.0,
          "privacy.randomness": "seeded", "federation.clients_per_round": 3}
    sim_rows, sites, dep_cfg = _simulated_and_sites(tmp_path, dp)
    with LocalFederation(tmp_path / "flower", secure=False) as fed:
        fed.start_superlink()
        for i, (train, test) in enumerate(sites):
            fed.start_supernode(f"site{i}", train, test, client_id=i)
        status = fed.run(dep_cfg.to_yaml(), timeout_s=900)
        assert status == "finished:completed", (fed.work / "run.log").read_text()[-3000:]
    dep_rows = [json.loads(x) for x in (tmp_path / "dep" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in dep_rows] == [1, 2]
    for a, b in zip(sim_rows, dep_rows):
        assert b["epsilon"] > 0 and "train_loss" not in b  # a DP-SGD client tells only its own accounting
        np.testing.assert_allclose(b["epsilon"], a["epsilon"], rtol=1e-12)
    assert dep_rows[1]["epsilon"] > dep_rows[0]["epsilon"]  # each client's accountant went on from round 1
    _same_adapter(tmp_path)
