"""Personal parameters stay on the client; FedSA-LoRA and FFA-LoRA; per-client global vs personalized vs fine-tuned."""
import torch

from fedfm.client import ClientContext
from fedfm.simulation import Simulation, prepare


def _run(cfg):
    server = Simulation(prepare(cfg))
    rows = server.run()
    return server, rows


def test_fedsa_lora_keeps_b_on_each_client_and_shares_a(tiny_config):
    server, rows = _run(tiny_config(**{"adapter.method": "fedsa-lora", "federation.rounds": 2,
                                       "federation.clients_per_round": 4}))
    assert server.spec.names and all(".lora_B." not in n for n in server.spec.names)
    assert any(".lora_A." in n for n in server.spec.names)
    assert server.personal.names and all(".lora_B." in n for n in server.personal.names)
    own = [server.store.get(c)[ClientContext.PERSONAL_KEY] for c in range(4)]
    assert all(o.abs().sum() > 0 for o in own)  # each trained its own B (from zero)
    assert not torch.equal(own[0], own[1])
    last = rows[-1]
    assert set(last["client_acc_personal"]) == set(last["client_acc"])
    # the global model has B at its initial zeros (no LoRA effect); the personalized one uses the client's own B
    own = server.local[0]  # client 0's own data
    server._load_global()
    loss_global = server.task.evaluate(server.model, own.encoded, own.test, 64)["loss"]
    server.ctx.load_personal(0)
    loss_personal = server.task.evaluate(server.model, own.encoded, own.test, 64)["loss"]
    assert loss_personal != loss_global
    # only A (and the head) travelled: fewer bytes than plain LoRA
    _, plain = _run(tiny_config(**{"federation.rounds": 2, "federation.clients_per_round": 4}))
    assert last["bytes_up"] < plain[-1]["bytes_up"]


def test_personal_head_never_leaves_the_client(tiny_config):
    server, rows = _run(tiny_config(**{"adapter.personal": ["classifier"], "federation.rounds": 1}))
    assert all("classifier" not in n for n in server.spec.names)
    assert any("classifier" in n for n in server.personal.names)
    assert "client_acc_personal" in rows[-1]


def test_ffa_lora_freezes_a_at_its_shared_init(tiny_config):
    cfg = tiny_config(**{"adapter.method": "ffa-lora", "federation.rounds": 2})
    server = Simulation(prepare(cfg))
    a_names = [n for n, p in server.model.named_parameters() if ".lora_A." in n]
    before = {n: p.detach().clone() for n, p in server.model.named_parameters() if n in a_names}
    assert a_names and not any(n in server.spec.names for n in a_names)
    assert any(".lora_B." in n for n in server.spec.names)
    server.run()
    after = dict(server.model.named_parameters())
    assert all(torch.equal(before[n], after[n].detach()) for n in a_names)
    # A is the same seeded init in every process: a second server builds the identical A
    again = Simulation(prepare(cfg))
    assert all(torch.equal(before[n], dict(again.model.named_parameters())[n].detach()) for n in a_names)


def test_finetune_steps_reports_fedavg_plus_local_finetuning(tiny_config):
    server, rows = _run(tiny_config(**{"federation.rounds": 1, "eval.finetune_steps": 3, "client.lr": 0.05}))
    last = rows[-1]
    assert set(last["client_acc_finetuned"]) == set(last["client_acc"])
    assert last["client_acc_finetuned"] != last["client_acc"]
    # evaluation leaves the global model in place
    assert torch.equal(server.spec.flat(), server.global_flat)


def test_ffa_lora_average_of_b_is_the_average_of_the_products(tiny_config):
    """With A frozen and shared, FedAvg of the B's gives exactly the example-weighted mean of the clients' B_k A."""
    from fedfm.client import ClientTask
    from fedfm.models.ranks import LORA_A

    server = Simulation(prepare(tiny_config(**{"adapter.method": "ffa-lora", "federation.rounds": 1,
                                           "federation.clients_per_round": 2})))
    x = server.spec.get()
    payload = server.codec.encode(x)
    b_names = [n for n in server.spec.names if ".lora_B." in n]
    params = dict(server.model.named_parameters())
    locals_, weights = [], []
    for cid in (0, 1):
        res = server.client_algo(ClientTask(client_id=cid, round=1, payload=payload, seed=cid))
        d = server.codec.decode(res.update, server.spec)
        locals_.append({n: x[n] + d[n] for n in b_names})
        weights.append(res.num_examples)
    server.spec.load(x)
    server.global_flat = server.spec.flat()
    rows = server.aggregate_results(1, [server.client_algo(ClientTask(client_id=c, round=1, payload=payload, seed=c))
                                        for c in (0, 1)])
    assert rows["aggregated"]
    new = server.spec.unflatten(server.global_flat)
    p = torch.tensor(weights, dtype=torch.float32) / sum(weights)
    for b in b_names:
        A = params[b.replace(".lora_B.", LORA_A)].detach().cpu()
        want = p[0] * (locals_[0][b] @ A) + p[1] * (locals_[1][b] @ A)
        assert torch.allclose(new[b] @ A, want, atol=1e-6)
