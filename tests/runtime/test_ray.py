"""The ray runtime (``runtime.name: ray``): with the same seed it gives every client the update ``local`` gives it and
the same round rows; a worker killed mid-round gives its clients back as dropped (naming the worker), is replaced,
and the next round runs on all workers; stateful client settings are refused before anything loads; the package
never imports ray unless the runtime is chosen."""
from __future__ import annotations

import subprocess
import time
import sys

import pytest

from fedfm.config import load_config
from fedfm.errors import ConfigError
from fedfm.simulation import Simulation, prepare

from ..conftest import tiny_overrides  # noqa: TID252

ray = pytest.importorskip("ray")

TIMING = {"wall_s", "seconds", "round_s", "client_s", "eval_s", "aggregate_s"}


def _config(tiny_csv, tmp_path, name, **extra):
    return load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path / name, **{
        "federation.clients_per_round": 4, "eval.per_client": False, **extra}))


def _recording(sim):
    """Keep every result the runtime hands back, per round."""
    seen, run = [], sim.runtime.run

    def recorded(tasks, on_result=None):
        results = run(tasks, on_result)
        seen.append(results)
        return results

    sim.runtime.run = recorded
    return seen


def _untimed(row):
    out = {k: v for k, v in row.items() if k not in TIMING and not k.endswith("_s")}
    if "client_stats" in out:  # each client's seconds are timing too
        out["client_stats"] = [{k: v for k, v in s.items() if k != "seconds"} for s in out["client_stats"]]
    return out


def test_ray_gives_the_updates_and_rows_of_local(tiny_csv, tmp_path):
    local = Simulation(prepare(_config(tiny_csv, tmp_path, "local")))
    seen_local = _recording(local)
    rows_local = local.run()
    ray_sim = Simulation(prepare(_config(tiny_csv, tmp_path, "ray", **{"runtime.name": "ray",
                                                                         "runtime.num_workers": 2})))
    try:
        assert len(ray_sim.runtime.workers) == 2
        seen_ray = _recording(ray_sim)
        rows_ray = ray_sim.run()  # closes the runtime: the local Ray it started is shut down
    finally:
        ray_sim.runtime.close()
    assert not ray.is_initialized()
    assert len(seen_local) == len(seen_ray) == 2
    for a_round, b_round in zip(seen_local, seen_ray):
        assert [r.client_id for r in a_round] == [r.client_id for r in b_round]
        for a, b in zip(a_round, b_round):
            assert a.error is None and b.error is None, (a.error, b.error)
            da, db = local.server.check(a)[0], ray_sim.server.check(b)[0]
            assert da.abs().max() > 0
            assert float((da - db).abs().max()) <= 1e-6, a.client_id
            assert a.num_examples == b.num_examples
    assert len(rows_local) == len(rows_ray) == 2
    for a, b in zip(rows_local, rows_ray):
        a, b = _untimed(a), _untimed(b)
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], abs=1e-6), k
            else:
                assert a[k] == b[k], k


def test_a_worker_killed_mid_round_drops_its_clients_and_is_replaced(tiny_csv, tmp_path):
    cfg = _config(tiny_csv, tmp_path, "kill", **{"runtime.name": "ray", "runtime.num_workers": 2,
                                                 "federation.rounds": 1})
    sim = Simulation(prepare(cfg))
    rt = sim.runtime
    try:
        victim = rt.workers[0]
        ray.get([w.ready.remote() for w in rt.workers])
        submit = rt.submit

        def submit_then_kill(tasks):  # the round's tasks are out; then worker 0 dies before answering
            out = submit(tasks)
            ray.kill(victim, no_restart=True)
            return out

        rt.submit = submit_then_kill
        row = sim.run_round(1)
        rt.submit = submit
        dropped = {d["id"]: d["error"] for d in row.get("dropped", [])}
        on_victim = {c for c in range(4) if c % 2 == 0}
        assert set(dropped) <= on_victim and dropped, dropped
        assert all("ray worker 0 died" in e for e in dropped.values()), dropped
        assert rt.workers[0] is not victim and rt.replaced == 1
        seen = _recording(sim)
        row2 = sim.run_round(2)  # all workers again: nobody drops
        assert not row2.get("dropped"), row2.get("dropped")
        assert sorted(r.client_id for r in seen[0]) == [0, 1, 2, 3]
        assert all(r.error is None for r in seen[0])
    finally:
        rt.close()
    assert not ray.is_initialized()


def test_a_silent_worker_times_out_naming_it_instead_of_hanging(tiny_csv, tmp_path):
    cfg = _config(tiny_csv, tmp_path, "silent", **{"runtime.name": "ray", "runtime.num_workers": 2,
                                                   "federation.rounds": 1, "federation.min_clients": 1})
    sim = Simulation(prepare(cfg))
    rt = sim.runtime
    try:
        ray.get([w.ready.remote() for w in rt.workers])
        first = list(rt.workers)

        @ray.remote(num_cpus=0)
        def never_answers():
            time.sleep(600)

        # every task goes out, but what the round waits on is a reference that is never ready (a hung worker)
        rt.submit = lambda tasks: [(t, t.client_id % rt.num_workers, never_answers.remote()) for t in tasks]
        rt.timeout = 0.5
        row = sim.run_round(1)
        dropped = {d["id"]: d["error"] for d in row["dropped"]}
        assert sorted(dropped) == [0, 1, 2, 3]
        assert all("gave no answer within runtime.worker_timeout_s=0.5s" in e and "a local Ray" in e
                   for e in dropped.values()), dropped
        assert all(a is not b for a, b in zip(rt.workers, first)) and rt.replaced == 2
    finally:
        rt.close()
    assert not ray.is_initialized()


@pytest.mark.parametrize("override, named", [
    ({"client.algorithm": "scaffold", "client.optimizer": "sgd"}, "client.algorithm 'scaffold'"),
    ({"adapter.method": "fedsa-lora"}, "adapter.method 'fedsa-lora'"),
    ({"adapter.personal": ["classifier"]}, "adapter.personal"),
])
def test_ray_refuses_per_client_state_before_anything_loads(tiny_csv, tmp_path, override, named):
    with pytest.raises((ConfigError, ValueError), match="runtime.name 'ray'") as err:
        load_config("bbc-lora", tiny_overrides(tiny_csv, tmp_path, **{"runtime.name": "ray", **override}))
    assert named in str(err.value)


def test_the_package_does_not_import_ray_unless_chosen():
    code = ("import sys, fedfm; from fedfm.simulation import Simulation; import fedfm.runtime; "
            "from fedfm.config import load_config; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr
