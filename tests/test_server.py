"""The round loop: sampling, FedAvg, drop-outs, evaluation, checkpoints and bit-for-bit resume."""
import json

import numpy as np
import pytest
import torch

from fedfm.client import ClientResult
from fedfm.display import Display
from fedfm.server import sample_clients, worst_fraction_mean
from fedfm.simulation import Simulation, prepare
from fedfm.tracking import RunDir


def _run(cfg, run_dir=None):
    rd = None
    if run_dir is not None:
        rd = RunDir(run_dir)
        rd.create(overwrite=False)
        rd.write_config(cfg.to_yaml())
    server = Simulation(prepare(cfg), rd)
    rows = server.run()
    return server, rows


def test_sampling_is_seeded_and_sized(tiny_config):
    fed = tiny_config().federation
    a = [sample_clients(fed, 10, r).tolist() for r in range(1, 6)]
    b = [sample_clients(fed, 10, r).tolist() for r in range(1, 6)]
    assert a == b and all(len(s) == 2 and len(set(s)) == 2 for s in a)
    assert len({tuple(s) for s in a}) > 1  # rounds differ
    frac = tiny_config(**{"federation.fraction": 0.25, "federation.min_clients": 3}).federation
    assert len(sample_clients(frac, 8, 1)) == 3  # max(min_clients, ceil(0.25 * 8))


def test_worst_fraction():
    assert worst_fraction_mean([0.9, 0.1, 0.5, 0.7]) == pytest.approx(0.1)
    assert worst_fraction_mean([1.0, 2.0, 3.0], higher_is_better=False) == pytest.approx(3.0)


def test_training_improves_and_logs_bytes(tiny_config, tmp_path):
    cfg = tiny_config(**{"federation.rounds": 4, "federation.clients_per_round": 4, "eval.initial": True,
                         "client.epochs": 2})
    server, rows = _run(cfg, tmp_path / "r")
    first, last = rows[0], rows[-1]
    assert first["round"] == 0 and last["round"] == 4
    assert last["eval_loss"] < first["eval_loss"]
    assert last["eval_accuracy"] > first["eval_accuracy"]
    payload = server.codec.encode(server.spec.unflatten(server.global_flat))
    assert last["bytes_down"] == len(payload) * 4
    assert last["bytes_up"] == len(payload) * 4  # fp32 deltas have the same layout as the state
    assert set(last["client_acc"]) == {"0", "1", "2", "3"}
    assert min(last["client_acc"].values()) == pytest.approx(last["client_acc_worst10"])
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2, 3, 4]
    # each client's part of the round's bytes and examples (the dashboard's client table)
    stats = last["client_stats"]
    assert sorted(s["id"] for s in stats) == sorted(last["clients"])
    assert sum(s["bytes_up"] for s in stats) == last["bytes_up"]
    assert sum(s["bytes_down"] for s in stats) == last["bytes_down"]
    sizes = server.client_sizes
    assert all(s["examples"] == int(sizes[s["id"]]) for s in stats)
    assert all(s["seconds"] > 0 and s["epsilon"] is None for s in stats)


def test_fp16_codec_halves_bytes(tiny_config):
    _, rows32 = _run(tiny_config(**{"federation.rounds": 1}))
    _, rows16 = _run(tiny_config(**{"federation.rounds": 1, "codec.name": "fp16"}))
    assert rows16[0]["bytes_up"] < 0.6 * rows32[0]["bytes_up"]


def test_failing_client_is_dropped_and_round_goes_on(tiny_config, monkeypatch):
    cfg = tiny_config(**{"federation.rounds": 1, "federation.clients_per_round": 3, "federation.min_clients": 2})
    server = Simulation(prepare(cfg))
    real = server.runtime.client_fn
    victim = int(sample_clients(cfg.federation, 4, 1)[0])

    def flaky(task):
        if task.client_id == victim:
            raise RuntimeError("disk on fire")
        return real(task)

    server.runtime.client_fn = flaky
    before = server.global_flat.clone()
    row = server.run_round(1)
    assert row["aggregated"] is True
    assert [d["id"] for d in row["dropped"]] == [victim]
    assert "disk on fire" in row["dropped"][0]["error"]
    assert victim not in [c for c in row["clients"] if c not in [victim]]
    assert not torch.equal(server.global_flat, before)


def test_a_run_whose_every_client_crashes_stops_with_the_error(tiny_config, tmp_path):
    """Seen on the first GPU run: a device bug made every client raise, and the run logged six empty rounds with
    exit status 0. A round where every client raises before anything was ever aggregated now stops the run."""
    from fedfm.errors import ClientFailure

    cfg = tiny_config(**{"federation.rounds": 3})
    run_dir = RunDir(tmp_path / "run")
    run_dir.create(overwrite=False)
    server = Simulation(prepare(cfg), run_dir)

    def broken(task):
        raise RuntimeError("Expected all tensors to be on the same device")

    server.runtime.client_fn = broken
    closed = []
    server.runtime.close = lambda: closed.append(True)  # a Ray the runtime started must stop however the run ends
    with pytest.raises(ClientFailure, match="round 1: every sampled client.*same device"):
        server.run()
    assert closed == [True]
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["aggregated"] is False  # the failed round is still logged


def test_a_fedbuff_run_whose_every_client_crashes_stops_too(tiny_config):
    """FedBuff waits for buffer_size updates; when every client crashes none ever comes, and the round used to wait
    forever. After as many crashes as clients with no update, the round ends and the run stops with the error."""
    from fedfm.errors import ClientFailure

    cfg = tiny_config(**{"federation.rounds": 2, "federation.schedule": "fedbuff", "federation.buffer_size": 2,
                         "federation.concurrency": 2})
    server = Simulation(prepare(cfg))

    def broken(task):
        raise RuntimeError("CUDA error: an illegal memory access")

    server.runtime.client_fn = broken
    with pytest.raises(ClientFailure, match="round 1: every sampled client.*illegal memory access"):
        server.run()


def test_too_few_clients_leaves_global_unchanged(tiny_config):
    cfg = tiny_config(**{"federation.rounds": 1, "federation.clients_per_round": 2, "federation.min_clients": 2})
    server = Simulation(prepare(cfg))
    real = server.runtime.client_fn
    server.runtime.client_fn = lambda t: ClientResult(client_id=t.client_id, update=b"garbage", num_examples=5) \
        if t.client_id == int(sample_clients(cfg.federation, 4, 1)[0]) else real(t)
    before = server.global_flat.clone()
    row = server.run_round(1)
    assert row["aggregated"] is False and row["dropped"][0]["error"].startswith("rejected")
    assert torch.equal(server.global_flat, before)


@pytest.mark.parametrize("algo", [
    {}, {"server.optimizer": "fedyogi"}, {"client.algorithm": "scaffold", "client.optimizer": "sgd", "client.lr": 0.05},
    {"adapter.method": "fedsa-lora"},
    {"federation.schedule": "fedbuff", "federation.buffer_size": 2, "federation.concurrency": 3,
     "clock.speed_distribution": "lognormal"},
    {"privacy.mode": "client", "privacy.noise_multiplier": 0.3, "privacy.target_quantile": 0.5, "privacy.count_noise": 1.0,
     "privacy.randomness": "seeded"},
    {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "privacy.randomness": "seeded"},
    {"codec.name": "topk", "codec.fraction": 0.05, "codec.values": "int8", "codec.stochastic": True,
     "codec.downlink": "int8", "runtime.cache_clients": 1},
], ids=["fedavg", "fedyogi-state", "scaffold-control-variates", "fedsa-personal-b", "fedbuff-in-flight",
        "dp-adaptive-clip", "dp-sample-epsilons", "topk-int8-error-feedback-spilled"])
def test_resume_is_bit_for_bit(tiny_config, tmp_path, algo):
    """A run interrupted after round 2 and resumed ends with the same global state as an uninterrupted one
    (also when the server optimizer keeps state: its moments are in the checkpoint). Checkpoints hold only tensors
    and builtins: they load with ``torch.load(weights_only=True)``, which runs no pickled code."""
    over = {"federation.rounds": 4, "adapter.dropout": 0.1, "model.from_config.hidden_dropout_prob": 0.1, **algo}
    full, _ = _run(tiny_config(**{**over, "output.dir": str(tmp_path / "full")}), tmp_path / "full")

    part_dir = tmp_path / "part"
    _run(tiny_config(**{**over, "federation.rounds": 2, "output.dir": str(part_dir)}), part_dir)
    rd = RunDir(part_dir)
    resumed = Simulation(prepare(tiny_config(**{**over, "output.dir": str(part_dir)})), rd)
    ck = rd.load_last_checkpoint()
    assert ck["round"] == 2
    resumed.load_checkpoint_state(ck)
    rows = resumed.run()
    assert [r["round"] for r in rows] == [3, 4]
    assert torch.equal(resumed.global_flat, full.global_flat)
    assert len(rd.list_checkpoints()) == 2  # keep_checkpoints


def test_final_adapter_is_a_peft_directory(tiny_config, tmp_path):
    from peft import PeftModel

    from fedfm.models.loader import load_base

    server, _ = _run(tiny_config(**{"federation.rounds": 1}), tmp_path / "r")
    adapter = tmp_path / "r" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    cfg = server.cfg
    torch.manual_seed(123)
    base = load_base(cfg.model, "AutoModelForSequenceClassification", num_labels=4)
    loaded = PeftModel.from_pretrained(base, str(adapter))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n or "modules_to_save" in n}
    want = server.spec.unflatten(server.global_flat)
    for n, t in want.items():
        assert torch.equal(got[n].detach(), t), n


def test_building_a_simulation_writes_nothing_into_its_run_directory(tiny_config, tmp_path):
    """So --overwrite can leave an old run as it was until the new one is built (the CLI creates the directory
    then, issue 15)."""
    rd = RunDir(tmp_path / "not_yet")
    Simulation(prepare(tiny_config(**{"output.dir": str(rd.path), "client.algorithm": "scaffold",
                                      "client.optimizer": "sgd"})), rd)
    assert not rd.path.exists()


# ---------------------------------------------------------------------------------------------- federation.byte_budget
class _Said(Display):
    """A display that keeps the run's messages."""

    def __init__(self):
        self.said: list[str] = []

    def message(self, text: str) -> None:
        self.said.append(text)


def _round_bytes(tiny_config) -> int:
    """One round's bytes up + down of the tiny config (2 clients of 4, fp32 both ways): every round the same."""
    _, rows = _run(tiny_config(**{"federation.rounds": 2}))
    sizes = {r["bytes_up"] + r["bytes_down"] for r in rows if r["round"]}
    assert len(sizes) == 1 and rows[-1]["bytes_total"] == 2 * sizes.pop() == 2 * (rows[0]["bytes_up"] * 2)
    return rows[0]["bytes_up"] + rows[0]["bytes_down"]


@pytest.mark.parametrize("rounds_in_budget", [1.5, 2.0, 3.7])
def test_a_byte_budget_stops_the_run_within_it_and_scores_the_last_round(tiny_config, tmp_path, rounds_in_budget):
    """With rounds of R bytes, a budget of b·R runs floor(b) rounds, never more bytes than the budget; the last round
    is evaluated although eval.every would not (round 1: found only once its bytes are known; later: foreseen, so its
    clients' federated scores come too), its score is the final model's, and the adapter is written."""
    R = _round_bytes(tiny_config)
    budget = int(rounds_in_budget * R)
    said = _Said()
    cfg = tiny_config(**{"federation.rounds": 6, "federation.byte_budget": budget, "eval.every": 5,
                         "eval.federated": True, "partition.local_test_fraction": 0.2,
                         "output.dir": str(tmp_path / "r")})
    rd = RunDir(tmp_path / "r")
    rd.create(overwrite=False)
    server = Simulation(prepare(cfg), rd, said)
    rows = server.run()
    n = int(rounds_in_budget)
    assert [r["round"] for r in rows] == list(range(1, n + 1))
    assert [r["bytes_total"] for r in rows] == [R * k for k in range(1, n + 1)]
    assert rows[-1]["bytes_total"] <= budget
    assert "eval_accuracy" in rows[-1] and all("eval_accuracy" not in r for r in rows[:-1])
    assert ("fed_accuracy" in rows[-1]) == (n > 1)  # foreseen from round 2 on: the clients scored it as well
    assert rows[-1]["eval_accuracy"] == server.evaluate(n)["eval_accuracy"]  # the model at the end
    assert (tmp_path / "r" / "adapter" / "adapter_config.json").exists()
    why = [m for m in said.said if "byte budget" in m]
    assert len(why) == 1 and f"federation.byte_budget={budget:,}" in why[0] and f"after round {n} of 6" in why[0]
    assert [json.loads(x)["round"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, n + 1))


def test_a_byte_budget_that_fits_every_round_changes_nothing(tiny_config):
    R = _round_bytes(tiny_config)
    free, rows = _run(tiny_config(**{"federation.rounds": 3}))
    capped, capped_rows = _run(tiny_config(**{"federation.rounds": 3, "federation.byte_budget": 3 * R}))
    assert [r["round"] for r in capped_rows] == [1, 2, 3] and capped_rows[-1]["bytes_total"] == 3 * R
    assert torch.equal(free.global_flat, capped.global_flat)


def test_a_byte_budget_smaller_than_one_round_is_refused_naming_the_key(tiny_config, tmp_path):
    from fedfm.errors import ConfigError

    R = _round_bytes(tiny_config)
    cfg = tiny_config(**{"federation.byte_budget": R - 1, "output.dir": str(tmp_path / "r")})
    rd = RunDir(tmp_path / "r")
    rd.create(overwrite=False)
    with pytest.raises(ConfigError, match=rf"federation\.byte_budget={R - 1:,} bytes is smaller than one round: "
                                          rf"round 1 sent {R:,} bytes"):
        Simulation(prepare(cfg), rd).run()
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # the round over the budget is not logged
    assert not rd.list_checkpoints()


def test_a_byte_budget_run_resumes_from_its_count(tiny_config, tmp_path):
    """Interrupted after round 2 and resumed, a run stops where an uninterrupted one does (the total is in the
    checkpoint, or counted from metrics.jsonl for a checkpoint without it), with the same model; resumed again
    with more rounds, it runs none and says why."""
    import fedfm

    R = _round_bytes(tiny_config)
    over = {"federation.rounds": 6, "federation.byte_budget": int(3.5 * R), "eval.every": 5}
    full = fedfm.run(tiny_config(**{**over, "output.dir": str(tmp_path / "full")}), report=False)
    assert [r["round"] for r in full.rows] == [1, 2, 3]

    for old_checkpoint in (False, True):
        part = tmp_path / f"part{old_checkpoint}"
        fedfm.run(tiny_config(**{**over, "federation.rounds": 2, "output.dir": str(part)}), report=False)
        if old_checkpoint:  # written before the count was kept
            for path in RunDir(part).list_checkpoints():
                ck = torch.load(path, weights_only=True)
                del ck["bytes"]
                torch.save(ck, path)
        said = _Said()
        resumed = fedfm.resume(part, {"federation.rounds": 6}, display=said, report=False)
        assert [r["round"] for r in resumed.rows] == [1, 2, 3]
        assert resumed.rows[-1]["bytes_total"] == 3 * R and "eval_accuracy" in resumed.rows[-1]
        assert resumed.rows[-1]["eval_accuracy"] == full.rows[-1]["eval_accuracy"]
        ours, theirs = (torch.load(RunDir(d).list_checkpoints()[-1], weights_only=True) for d in (part, full.run_dir))
        assert torch.equal(ours["global"], theirs["global"])
        assert any("stopping after round 3 of 6" in m for m in said.said)

        said = _Said()
        again = fedfm.resume(part, {"federation.rounds": 8}, display=said, report=False)
        assert [r["round"] for r in again.rows] == [1, 2, 3]
        assert any("byte budget reached: round 4" in m and "stopping after round 3 of 8" in m for m in said.said)
