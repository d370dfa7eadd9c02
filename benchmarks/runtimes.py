"""Runtimes: the steady-state round time of the same federated LoRA round under each runtime.

Workload: the one ``benchmarks/overhead.py`` builds (its ``make_data`` and ``fedfm_config``: the ~6.3M LLaMA-style
causal LM from a config, LoRA r=8 on q,v, 10 clients x 64 pre-tokenized sequences x 64 tokens, 1 local epoch at
batch 8 = 8 AdamW steps per client, FedAvg, fp32 codec, a real run directory), with all 10 clients in every round.

Arms (``ARMS``; each a function that runs in its own child process and returns its timings):

  * ``local-1t``: ``runtime.name: local``, ``runtime.threads: 1`` (the baseline);
  * ``local-2t``: ``runtime.name: local``, ``runtime.threads: 2``;
  * ``ray-2x1t``: ``runtime.name: ray``, 2 workers of 1 CPU and 1 thread each (the driver at 1 thread too);
  * ``flower-sim``: fedfm's ServerApp / ClientApp under Flower's simulation engine (``flwr.simulation.run_simulation``,
    Ray: 2 CPUs, 1 CPU and 1 thread per ClientApp actor; 10 virtual SuperNodes, each node config ``partition-id``);
  * ``flower-loopback``: a Flower deployment on 127.0.0.1 (``deploy.local.LocalFederation``, insecure: plain HTTP, no
    SuperNode authentication, for speed): a SuperLink, 10 SuperNodes (``partition-id=k num-partitions=10``), the run
    started with ``flwr run``; its round times are the run's ``metrics.jsonl`` ``wall_s``. Flower 1.42 starts a
    ClientApp process per message, so ``clientapp`` times one apart (interpreter, imports, the client built).

A child runs ``--rounds`` measured rounds after one warm-up round (the first round: lazy allocations, and on ray the
actors' first task). Its round time is the row's ``wall_s`` (sample, broadcast, ``runtime.run``, aggregate; the
checkpoint after the round is not in it, and is the same on every arm). Start-up is reported apart: the imports, the
``Simulation`` set-up (on ray: ``ray.init`` and the actors created), and on ray the wait until every actor has built
its client side (``workers_ready_s``). Where the time goes, per steady round:

  * ``parallelism``: the clients' own training seconds (measured inside the worker) / round time; about 1 when the
    clients run one after another, about 2 when two workers train at once;
  * ``overhead_s``: round time - the busiest worker's client seconds (shipping tasks and results, waiting, aggregation);
  * ``cpu_round_s`` and ``cpu_{driver,workers,daemons,busiest_worker}_s``: CPU seconds (user + system) of the child's
    process tree during ``runtime.run`` (Ray's worker processes, and its raylet / gcs / agents, are descendants);
    ``cores_used`` = that CPU / the span's wall time;
  * ``cpu_pressure``: Linux PSI "some" over the span, the share of the time some task on the machine waited for a CPU
    (on a shared machine: how busy the cores were with other work).

The arms alternate (A B C A B C ...) ``--repeats`` times; medians over the repeats (each repeat's value is itself the
median of its measured rounds); a speedup is the baseline's round / the arm's, within each repeat, then the median.
The children share ``--budget`` seconds (each gets what is left / the children left, and is stopped there with the
rounds it finished: on a busy machine ``local-2t`` can take minutes a round); ``--wait-idle S`` waits up to S seconds
before each child for the machine's CPU pressure to drop (not charged to the budget).

    PYTHONPATH=src python benchmarks/runtimes.py [--rounds 3] [--repeats 2] [--budget 540] [--wait-idle 0]
                                                 [--arms local-1t,local-2t,ray-2x1t] [--quick] [--no-save]

prints one JSON line per measurement (arm x repeat) and a summary line with the ratios, and appends them to
benchmarks/results/runtimes.jsonl. ``--quick`` (1 local step per client, 1 repeat) only checks that it runs.
Target (issue 16): ray with 2 workers >= 1.6x faster per round than local on 1 thread (``target_met``; where missed,
``why``, from ``core_gain`` and ``cpu_cost_ratio``: see ``_diagnose``).
Target (issue 16, Flower): ``flower-loopback``'s round within 10% of ``local-1t``'s (``flower_target_met``; the
ratio to ``local-2t`` is given too; where missed, ``flower_why``: see ``_flower_target``).

Adding an arm: see EXTENSION POINT below.
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()  # the child's clock starts before any heavy import

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

from _results import emit  # noqa: E402
from overhead import NUM_CLIENTS, fedfm_config, make_data  # noqa: E402  (the same workload, not a copy)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "runtimes.jsonl"
WORKLOAD = "llama-6.3M lora r8 q,v; 10 clients x 64 x 64 tok, 1 epoch at batch 8; 10/round"
BASELINE, TARGET_ARM, TARGET_SPEEDUP = "local-1t", "ray-2x1t", 1.6
FLOWER_ARM, FLOWER_TARGET = "flower-loopback", 1.10  # issue 16: the deployment's round within 10% of local


# ---------------------------------------------------------------------------------------------- the arms (children)

def _cpu_tree() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of this process and each descendant, with its role: ``driver`` (this
    process), ``workers`` (Ray worker processes, titled ``ray::...``), ``daemons`` (the rest: raylet, gcs_server,
    agents)."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            title = p.cmdline()[:1] or [""]
            role = "driver" if p.pid == me.pid else "workers" if title[0].startswith("ray::") else "daemons"
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        # with its reaped children's (a SuperNode's ClientApp processes, one per message, end within the round)
        out[p.pid] = (role, t.user + t.system + t.children_user + t.children_system)
    return out


def _cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds between two ``_cpu_tree`` snapshots by role, and the busiest single worker's (``busiest_worker``)."""
    spent = {"driver": 0.0, "workers": 0.0, "daemons": 0.0, "busiest_worker": 0.0}
    for pid, (role, t) in after.items():
        d = t - before.get(pid, (role, 0.0))[1]
        spent[role] += d
        if role == "workers":
            spent["busiest_worker"] = max(spent["busiest_worker"], d)
    return spent


def _cpu_pressure_us() -> float | None:
    """Linux PSI: total microseconds during which some runnable task waited for a CPU (None where not available)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def report(event: str, **fields) -> None:
    """A child's one line to the parent: ``startup`` (once, ``startup_s`` at least), ``round`` (per round, the
    warm-up first, ``wall_s`` at least), ``done``. Printed as it happens, so a child stopped at its time limit still
    leaves the rounds it finished."""
    print(json.dumps({"event": event, **fields}), flush=True)


class _Recorder:
    """A ``Display`` for the fedfm arms: per round, the span of ``runtime.run`` (from ``round_start`` to the last
    client's result: its wall time, the CPU seconds of this process tree by role, the machine's CPU pressure) and each
    client's own ``seconds`` (its training, measured where it runs); ``report``s the round when it ends."""

    def __init__(self, num_workers: int, placement: bool = True, startup: bool = False):
        """``placement``: client k runs on worker k % num_workers (fedfm's ray runtime); else (Flower's simulation
        engine places them itself) the busiest worker is taken as the clients' seconds / num_workers (ideal).
        ``startup``: report "startup" when the first round starts."""
        from fedfm.display import Display

        rec, self.num_workers, self.span = self, num_workers, {}
        self.placement, self.startup = placement, startup

        class Recorder(Display):
            def round_start(self, rnd: int, total: int, n_clients: int) -> None:
                if rec.startup:
                    rec.startup = False
                    report("startup", startup_s=time.perf_counter() - _T0)
                rec.span = {"n": n_clients, "clients": [], "t0": time.perf_counter(), "cpu0": _cpu_tree(),
                            "psi0": _cpu_pressure_us()}

            def client_done(self, result) -> None:
                rec.client_done(result)

            def round_end(self, row: dict) -> None:
                rec.round_end(row)

        self.display = Recorder()

    def client_done(self, result) -> None:
        span = self.span
        span["clients"].append((result.client_id, float(result.metrics.get("seconds", 0.0))))
        if len(span["clients"]) == span["n"]:
            span["run_s"] = time.perf_counter() - span["t0"]
            span["cpu"] = _cpu_spent(span["cpu0"], _cpu_tree())
            psi = _cpu_pressure_us()
            p0 = span["psi0"]
            span["pressure"] = None if psi is None or p0 is None else (psi - p0) / 1e6 / span["run_s"]

    def round_end(self, row: dict) -> None:
        span, busy = self.span, [0.0] * self.num_workers
        for cid, sec in span["clients"]:
            if self.placement:
                busy[cid % self.num_workers] += sec  # the ray runtime's placement: client k on worker k % num_workers
            else:
                busy = [b + sec / self.num_workers for b in busy]
        report("round", round=row["round"], wall_s=row["wall_s"], train_loss=row.get("train_loss"),
               clients=len(row["clients"]), dropped=len(row.get("dropped") or []),
               client_s=sum(sec for _, sec in span["clients"]), busiest_worker_s=max(busy),
               run_s=span.get("run_s"), cpu=span.get("cpu"), pressure=span.get("pressure"))


def _fedfm_arm(runtime: dict, data: Path, out: Path, rounds: int, quick: bool) -> None:
    """A fedfm run (as ``fedfm run`` does it: validation, ``prepare``, a run directory, ``Simulation.run``) with the
    ``runtime`` section given, 1 warm-up + ``rounds`` rounds of all clients."""
    import torch

    torch.set_num_threads(runtime.get("threads") or 1)
    from fedfm.config import validate_config
    from fedfm.simulation import Simulation, prepare
    from fedfm.tracking import RunDir

    t_import = time.perf_counter()
    raw = fedfm_config(data, out)
    raw["runtime"] = dict(runtime)
    raw["federation"].update(rounds=rounds + 1, clients_per_round=NUM_CLIENTS)
    if quick:  # one step per client: checks that the arm runs, measures nothing
        raw["client"].update(steps=1, epochs=None)
    cfg = validate_config(raw)
    prepared = prepare(cfg)
    run_dir = RunDir(cfg.output_dir())
    run_dir.create(overwrite=False)
    run_dir.write_config(cfg.to_yaml())
    run_dir.write_json("partition.json", prepared.data.describe())
    recorder = _Recorder(cfg.runtime.num_workers if cfg.runtime.name == "ray" else 1)
    sim = Simulation(prepared, run_dir, display=recorder.display)
    t_setup = time.perf_counter()
    workers = getattr(sim.runtime, "workers", None)
    if workers:  # ray: the actors build their client side in the background; wait for them, so round 1 does not
        import ray

        ray.get([w.ready.remote() for w in workers])
    t_ready = time.perf_counter()
    report("startup", startup_s=t_ready - _T0, import_s=t_import - _T0, setup_s=t_setup - t_import,
           workers_ready_s=t_ready - t_setup)
    rows = sim.run()
    assert [len(r["clients"]) for r in rows] == [NUM_CLIENTS] * (rounds + 1), [r["clients"] for r in rows]
    assert not any(r.get("dropped") for r in rows), [r.get("dropped") for r in rows]


# ---- the arms: one function each, (data, out, rounds, quick) -> None, run in a child process of its own; it calls
# report("startup", startup_s=...) once, then report("round", wall_s=...) after each round (the warm-up round first).

def arm_local_1t(data: Path, out: Path, rounds: int, quick: bool) -> None:
    _fedfm_arm({"name": "local", "threads": 1}, data, out, rounds, quick)


def arm_local_2t(data: Path, out: Path, rounds: int, quick: bool) -> None:
    _fedfm_arm({"name": "local", "threads": 2}, data, out, rounds, quick)


def arm_ray_2x1t(data: Path, out: Path, rounds: int, quick: bool) -> None:
    _fedfm_arm({"name": "ray", "num_workers": 2, "cpus_per_worker": 1, "threads": 1}, data, out, rounds, quick)


def _flower_config(data: Path, out: Path, rounds: int, quick: bool) -> "object":
    """The same workload as a deployment config: ``runtime.threads`` 1 (each client's process trains on 1 thread),
    ``rounds`` + 1 rounds of all clients. A deployment switches ``eval.federated`` on (``deployment_config``); with
    ``eval.every: 0`` and no local test split it scores nothing."""
    from fedfm.config import validate_config

    raw = fedfm_config(data, out)
    raw["runtime"] = {"name": "local", "threads": 1, "worker_timeout_s": 900.0, "connect_timeout_s": 300.0}
    raw["federation"].update(rounds=rounds + 1, clients_per_round=NUM_CLIENTS)
    if quick:
        raw["client"].update(steps=1, epochs=None)
    return validate_config(raw)


def arm_flower_sim(data: Path, out: Path, rounds: int, quick: bool) -> None:
    """The fedfm ServerApp / ClientApp under Flower's simulation engine (``flwr.simulation.run_simulation``, Ray
    backend): 10 virtual SuperNodes (node config ``partition-id``/``num-partitions``), 2 CPUs, 1 CPU per ClientApp
    actor (so 2 train at once). A ClientApp actor keeps the client it built (``deploy.flower._client``)."""
    import torch

    torch.set_num_threads(1)
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedfm.deploy.flower import client_app, serve

    cfg = _flower_config(data, out, rounds, quick)
    recorder = _Recorder(2, placement=False, startup=True)
    server_app, got = ServerApp(), {}

    @server_app.main()
    def _main(grid, context) -> None:
        got["rows"] = serve(grid, {"fedfm-config": cfg.to_yaml()}, display=recorder.display)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=NUM_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    rows = got.get("rows") or []
    assert [len(r["clients"]) for r in rows] == [NUM_CLIENTS] * (rounds + 1), [r.get("clients") for r in rows]


def _clientapp_start(cfg_text: str) -> dict:
    """What a SuperNode's ClientApp process pays per message before it trains, timed in a fresh interpreter: the
    imports (flwr, fedfm's ClientApp, torch) and the client built (partition 0: the data read and cut, the base and
    the adapter built)."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "import sys, json, yaml\n"
        "from fedfm.deploy import flower as f\n"
        "import torch\n"
        "t1 = time.perf_counter()\n"
        "text = sys.stdin.read(); cfg = f._config_from_text(text, 'cfg')\n"
        "node = {'partition': 0, 'data': None, 'test': None, 'client_id': 0, 'state_dir': None}\n"
        "f._client(text, cfg, node, 0, None, None)\n"
        "t2 = time.perf_counter()\n"
        "print(json.dumps({'import_s': t1 - t0, 'build_s': t2 - t1}))\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], input=cfg_text, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        return {"error": out.stderr[-500:]}
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"process_s": wall, **got}


def arm_flower_loopback(data: Path, out: Path, rounds: int, quick: bool) -> None:
    """A real Flower deployment on 127.0.0.1 (``deploy.local.LocalFederation``, INSECURE: plain HTTP, no SuperNode
    authentication, for speed): a SuperLink, 10 SuperNodes (node config ``partition-id=k num-partitions=10``), the
    run started with ``flwr run``. Flower 1.42 starts a ClientApp process per message, so every task loads the
    model. The round times are the run's ``metrics.jsonl`` ``wall_s`` (written by the ServerApp process), reported
    as they appear; ``cpu`` per round: this process tree's CPU between two rows (all Flower processes, as daemons).
    Caveat: that CPU is not trustworthy here (measured over 2 cores on a 2-core machine): the ClientApp processes end
    within the round and are read from their parents' reaped-children times, which double-counts one alive at a
    snapshot. Only the wall times are measured."""
    import threading

    from fedfm.deploy.local import LocalFederation

    cfg = _flower_config(data, out, rounds, quick)
    cfg_text = cfg.to_yaml()
    start = _clientapp_start(cfg_text)  # before the federation starts: on an otherwise quiet machine
    work = out.parent / (out.name + "-flower")
    work.mkdir(parents=True, exist_ok=True)
    metrics = Path(cfg.output_dir()) / "metrics.jsonl"
    stop = threading.Event()

    def poll() -> None:
        seen, cpu0, psi0, t_prev = 0, _cpu_tree(), _cpu_pressure_us(), time.perf_counter()
        while not stop.is_set():
            time.sleep(0.5)
            try:
                lines = metrics.read_text().splitlines()
            except OSError:
                continue
            rows = [json.loads(ln) for ln in lines if ln.strip()]
            rows = [r for r in rows if r.get("round", 0) >= 1]
            for row in rows[seen:]:
                now, cpu1, psi1 = time.perf_counter(), _cpu_tree(), _cpu_pressure_us()
                if seen == 0:
                    report("startup", startup_s=now - _T0 - row["wall_s"], clientapp=start)
                span = now - t_prev
                report("round", round=row["round"], wall_s=row["wall_s"], train_loss=row.get("train_loss"),
                       clients=len(row["clients"]), dropped=len(row.get("dropped") or []),
                       cpu=_cpu_spent(cpu0, cpu1), run_s=span,
                       pressure=None if psi1 is None or psi0 is None else (psi1 - psi0) / 1e6 / span)
                seen, cpu0, psi0, t_prev = seen + 1, cpu1, psi1, now

    with LocalFederation(work, secure=False) as fed:
        fed.start_superlink()
        for k in range(NUM_CLIENTS):
            fed.start_supernode(f"site{k}", None, node_config={"partition-id": k, "num-partitions": NUM_CLIENTS})
        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            status = fed.run(cfg_text, timeout_s=3600)
        finally:
            time.sleep(1.0)
            stop.set()
            watcher.join(timeout=10)
    assert status == "finished:completed", (status, (work / "run.log").read_text()[-3000:])


# EXTENSION POINT: an arm is a function (data, out, rounds, quick) -> None like the ones above (the same workload:
# fedfm_config(data, out) with federation.clients_per_round=NUM_CLIENTS and rounds + 1 rounds; report "startup" when
# the first round can start and "round" with wall_s after each); add it here: the parent alternates it with the
# others, gives it the same time budget, and puts its speedup over the baseline in the summary.
ARMS: dict[str, Callable[[Path, Path, int, bool], None]] = {
    "local-1t": arm_local_1t,
    "local-2t": arm_local_2t,
    "ray-2x1t": arm_ray_2x1t,
    "flower-sim": arm_flower_sim,
    "flower-loopback": arm_flower_loopback,
}


# ---------------------------------------------------------------------------------------------- parent

def _pressure_avg10() -> float | None:
    """The machine's CPU pressure over the last 10 s (PSI ``some avg10``, 0..1); None where not available."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("avg10=")[1].split()[0]) / 100.0
    except (OSError, IndexError, ValueError):
        return None


def wait_idle(limit_s: float, below: float = 0.1) -> dict:
    """On a shared machine: wait up to ``limit_s`` for the CPU pressure (other work) to fall below ``below``."""
    t0 = time.perf_counter()
    p = _pressure_avg10()
    while limit_s > 0 and p is not None and p >= below and time.perf_counter() - t0 < limit_s:
        time.sleep(5)
        p = _pressure_avg10()
    return {"waited_s": _r(time.perf_counter() - t0, 1), "pressure_at_start": p, "loadavg_at_start": os.getloadavg()[0]}


def run_child(arm: str, data: Path, work: Path, k: int, rounds: int, quick: bool, limit_s: float) -> dict:
    """One arm in a child process of its own; stopped (SIGINT: a Ray it started shuts down) after ``limit_s``, keeping
    the rounds it finished. Returns its ``startup`` fields and its ``rounds`` (the warm-up first)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--data", str(data),
           "--out", str(work / f"run-{arm}-{k}"), "--rounds", str(rounds)] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = False
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        stopped = True
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    events = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith('{"event"')]
    if proc.returncode != 0 and not stopped:
        sys.stderr.write(stderr[-5000:])
        raise SystemExit(f"{arm} child failed with exit code {proc.returncode}")
    startup = next((e for e in events if e["event"] == "startup"), {})
    return {**startup, "rounds": [e for e in events if e["event"] == "round"], "stopped_at_limit": stopped,
            "limit_s": limit_s, "process_s": time.perf_counter() - t0}  # process_s: interpreter start-up included


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def _med(values) -> float | None:
    values = [v for v in values if v is not None]
    return _r(statistics.median(values)) if values else None


def measurement(arm: str, k: int, res: dict) -> dict:
    """One arm x repeat: the median of its steady rounds (None when it finished none within its time), its warm-up
    round, start-up, and where the time went. Only ``wall_s`` per round and ``startup_s`` are required of an arm; the
    rest is reported where the arm gives it."""
    steady = res["rounds"][1:]  # the first round is the warm-up
    rec = {"benchmark": "runtimes", "kind": "measurement", "arm": arm, "repeat": k,
           "round_s": _med(r["wall_s"] for r in steady), "rounds_s": [_r(r["wall_s"]) for r in steady],
           "first_round_s": _r(res["rounds"][0]["wall_s"]) if res["rounds"] else None,
           **{key: _r(res.get(key)) for key in ("startup_s", "import_s", "setup_s", "workers_ready_s", "process_s")}}
    if res["stopped_at_limit"]:
        rec["stopped_at_limit_s"] = _r(res["limit_s"], 1)
    if steady and steady[0].get("client_s") is not None:  # the clients' own training seconds
        rec.update(client_s=_med(r["client_s"] for r in steady),
                   parallelism=_med(r["client_s"] / r["wall_s"] for r in steady),
                   overhead_s=_med(r["wall_s"] - r["busiest_worker_s"] for r in steady))
    if steady and steady[0].get("cpu"):  # CPU seconds of the arm's process tree during runtime.run, and its cores
        total = [sum(r["cpu"][role] for role in ("driver", "workers", "daemons")) for r in steady]
        rec.update(cpu_round_s=_med(total), cores_used=_med(t / r["run_s"] for t, r in zip(total, steady)),
                   **{f"cpu_{role}_s": _med(r["cpu"][role] for r in steady) for role in steady[0]["cpu"]})
        rec["cpu_pressure"] = _med(r.get("pressure") for r in steady)  # PSI some: share of the time a task waited
    if res.get("clientapp"):  # flower-loopback: a bare ClientApp process's start, timed apart
        rec["clientapp"] = {k: _r(v) if isinstance(v, float) else v for k, v in res["clientapp"].items()}
    for key in ("waited_s", "pressure_at_start", "loadavg_at_start"):  # the machine before the child (parent's)
        if res.get(key) is not None:
            rec[key] = _r(res[key], 2)
    return rec


def _diagnose(out: dict) -> dict:
    """The target arm next to the baseline, from the same run. Its speedup is about ``core_gain / cpu_cost_ratio``:
    how many more cores its processes ran on while the clients trained (ideal 2 for 2 workers), over how much more CPU
    it spent per round (ideal 1). ``cpu_speedup_bound``: the baseline's CPU per round / the busiest worker's (the
    speedup with a free core per worker and nothing else running; an upper bound). Where the target is missed,
    ``why`` says which of these fell short."""
    t, b = f"{TARGET_ARM}:", f"{BASELINE}:"
    got = {k: out.get(t + k) for k in ("round_s", "parallelism", "overhead_s", "cpu_round_s", "cores_used",
                                        "cpu_busiest_worker_s", "cpu_workers_s", "cpu_daemons_s", "cpu_driver_s",
                                        "cpu_pressure")}
    base_cpu, base_cores = out.get(b + "cpu_round_s"), out.get(b + "cores_used")
    res: dict = {}
    if base_cpu and got["cpu_round_s"]:
        res["cpu_cost_ratio"] = _r(got["cpu_round_s"] / base_cpu, 4)
    if base_cores and got["cores_used"]:
        res["core_gain"] = _r(got["cores_used"] / base_cores, 4)
    if base_cpu and got["cpu_busiest_worker_s"]:
        res["cpu_speedup_bound"] = _r(base_cpu / got["cpu_busiest_worker_s"], 4)
    if out["target_met"] is not False:
        return res
    why = []
    if got["parallelism"] is not None and got["parallelism"] < TARGET_SPEEDUP:
        why.append(f"the workers' training overlapped only {got['parallelism']:.2f}x (clients' seconds / round)")
    if res.get("core_gain") is not None and res["core_gain"] < 1.9:
        busy = got["cpu_pressure"] is not None and got["cpu_pressure"] > 0.2
        why.append(f"cores: its processes ran on {got['cores_used']:.2f} cores while training, the baseline on "
                   f"{base_cores:.2f} (x{res['core_gain']:.2f}, ideal x2)" + (
                       f"; the machine was busy (CPU pressure {got['cpu_pressure']:.2f}: a task waited for a CPU that "
                       "share of the time)" if busy else ""))
    if res.get("cpu_cost_ratio") is not None and res["cpu_cost_ratio"] > 1.05:
        own = (got["cpu_daemons_s"] or 0.0) + (got["cpu_driver_s"] or 0.0)
        why.append(f"CPU: it spent x{res['cpu_cost_ratio']:.2f} the baseline's CPU per round: its workers "
                   f"{got['cpu_workers_s']}s for the clients the baseline trained in {base_cpu}s (the same client "
                   f"code, so the same steps cost more CPU with both cores training), Ray's daemons and the driver "
                   f"{own:.2f}s")
    if got["overhead_s"] is not None and got["round_s"] and got["overhead_s"] > 0.1 * got["round_s"]:
        why.append(f"{got['overhead_s']:.2f}s of each round is outside the clients' training (shipping, waiting)")
    res["why"] = why or ["no single cause in these numbers"]
    return res


def _flower_target(out: dict, meas: list[dict]) -> dict:
    """Issue 16: the Flower deployment's round within 10% of ``local`` for the same clients. ``local`` is the
    baseline (``local-1t``: ``runtime.threads: 1``, as every ClientApp process trains); ``local-2t`` is given too.
    Where missed, ``why``: the round's time beyond ``local``'s, next to what a ClientApp process costs per message
    before it trains (``clientapp``: interpreter, imports, the client built), times the messages of a round over the
    cores."""
    f = out.get(f"{FLOWER_ARM}:round_s")
    res: dict = {"flower_target": f"{FLOWER_ARM} round <= {FLOWER_TARGET}x {BASELINE}'s (also given: vs local-2t)"}
    for base in (BASELINE, "local-2t"):
        b = out.get(f"{base}:round_s")
        if f and b:
            res[f"flower_ratio:{base}"] = _r(f / b, 4)
            res[f"flower_overhead_s:{base}"] = _r(f - b, 3)
    ratio = res.get(f"flower_ratio:{BASELINE}")
    res["flower_target_met"] = None if ratio is None else bool(ratio <= FLOWER_TARGET)
    starts = [m["clientapp"] for m in meas if m["arm"] == FLOWER_ARM and m.get("clientapp", {}).get("process_s")]
    if starts:
        per = {k: _med(s.get(k) for s in starts) for k in ("process_s", "import_s", "build_s")}
        res["flower_clientapp_start_s"] = per
        cores = os.cpu_count() or 1
        res["flower_start_cost_per_round_s"] = _r(per["process_s"] * NUM_CLIENTS / min(cores, NUM_CLIENTS), 3)
    if res["flower_target_met"] is False:
        why = [f"{FLOWER_ARM} round {f:.1f}s vs {BASELINE} {out[BASELINE + ':round_s']:.1f}s (x{ratio:.2f}): "
               f"{res[f'flower_overhead_s:{BASELINE}']:.1f}s more a round"]
        if starts:
            why.append(f"Flower 1.42 starts a ClientApp process per message: {per['process_s']:.1f}s each before it "
                       f"trains (imports {per['import_s']:.1f}s, client built {per['build_s']:.1f}s, the rest the "
                       f"interpreter), x{NUM_CLIENTS} messages a round over {cores} cores = "
                       f"~{res['flower_start_cost_per_round_s']:.1f}s a round")
        cpu_f, cpu_b = out.get(f"{FLOWER_ARM}:cpu_round_s"), out.get(f"{BASELINE}:cpu_round_s")
        if cpu_f and cpu_b:
            why.append(f"CPU: {cpu_f:.1f} CPU-s a round (all Flower processes) vs {cpu_b:.1f} for {BASELINE}")
        pressure = out.get(f"{FLOWER_ARM}:cpu_pressure")
        if pressure is not None and pressure > 0.2:
            why.append(f"the machine was busy during it (CPU pressure {pressure:.2f})")
        res["flower_why"] = why
    return res


def summary(arms: list[str], meas: list[dict], args) -> dict:
    import torch

    def med(arm: str, key: str) -> float | None:
        return _med(m.get(key) for m in meas if m["arm"] == arm)

    out: dict = {"benchmark": "runtimes", "kind": "summary", "workload": WORKLOAD, "quick": args.quick,
                 "rounds_measured": args.rounds, "repeats": args.repeats, "budget_s": args.budget,
                 "wait_idle_s": args.wait_idle,
                 "stat": "median over repeats of each child's median steady round (warm-up round excluded)"}
    for arm in arms:
        for key in ("round_s", "first_round_s", "startup_s", "workers_ready_s", "client_s", "parallelism",
                    "overhead_s", "cpu_round_s", "cores_used", "cpu_workers_s", "cpu_busiest_worker_s",
                    "cpu_daemons_s", "cpu_driver_s", "cpu_pressure", "pressure_at_start"):
            out[f"{arm}:{key}"] = med(arm, key)
        stopped = sum(1 for m in meas if m["arm"] == arm and "stopped_at_limit_s" in m)
        if stopped:
            out[f"{arm}:stopped_at_limit"] = stopped
        if arm != BASELINE and BASELINE in arms:  # per repeat: the two children of a repeat ran one after the other
            ratios = [b["round_s"] / m["round_s"] for b in meas if b["arm"] == BASELINE and b["round_s"]
                      for m in meas if m["arm"] == arm and m["repeat"] == b["repeat"] and m["round_s"]]
            out[f"speedup:{arm}"] = _r(statistics.median(ratios), 4) if ratios else None
            out[f"speedups:{arm}"] = [_r(x, 4) for x in ratios]
    if TARGET_ARM in arms and BASELINE in arms:
        speed = out[f"speedup:{TARGET_ARM}"]
        out.update(target=f"{TARGET_ARM} round >= {TARGET_SPEEDUP}x faster than {BASELINE}",
                   target_speedup=TARGET_SPEEDUP, measured_speedup=speed,
                   target_met=None if speed is None else bool(speed >= TARGET_SPEEDUP))
        out.update(_diagnose(out))
    if FLOWER_ARM in arms:
        out.update(_flower_target(out, meas))
    out.update(torch=torch.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
               loadavg_after=[_r(x, 2) for x in os.getloadavg()],
               date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds per child, after one warm-up round")
    ap.add_argument("--repeats", type=int, default=None, help="times each arm runs, alternating (default 2; quick 1)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    ap.add_argument("--quick", action="store_true", help="1 local step per client: a smoke test, not a measurement")
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON lines appended here")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--budget", type=float, default=540.0, metavar="S",
                    help="seconds for all the children together: each gets what is left / the children left, and is "
                         "stopped there, keeping the rounds it finished")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="shared machine: before each child wait up to S seconds for CPU pressure < 10%%")
    ap.add_argument("--child", choices=list(ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1 (the warm-up round comes on top)")
    if args.child:
        ARMS[args.child](args.data, args.out, args.rounds, args.quick)
        report("done")
        return {}
    args.repeats = args.repeats or (1 if args.quick else 2)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; known: {list(ARMS)}")
    path = None if args.no_save else args.results

    meas, t_start, children = [], time.perf_counter(), args.repeats * len(arms)
    with tempfile.TemporaryDirectory(prefix="fedfm-runtimes-") as tmp:
        work = Path(tmp)
        data = make_data(work)
        for k in range(args.repeats):
            for arm in arms:
                machine = wait_idle(args.wait_idle)
                limit = max(60.0, (args.budget - (time.perf_counter() - t_start)) / (children - len(meas)))
                res = run_child(arm, data, work, k, args.rounds, args.quick, limit)
                rec = measurement(arm, k, {**res, **machine})
                emit(rec, path)
                meas.append(rec)
                t_start += machine["waited_s"]  # waiting for an idle machine is not charged to the budget
    result = summary(arms, meas, args)
    emit(result, path)
    return result


if __name__ == "__main__":
    main()
