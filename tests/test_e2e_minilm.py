"""End to end on the real shipped model (all-MiniLM-L6-v2) and real data (BBC News): a couple of short rounds."""
import pytest

from fedfm.config import load_config
from fedfm.simulation import Simulation, prepare
from fedfm.tracking import RunDir


@pytest.mark.e2e
def test_minilm_bbc_news_learns(tmp_path):
    cfg = load_config("bbc-lora", [
        "federation.rounds=2", "federation.clients_per_round=3", "client.steps=8", "client.epochs=null",
        "client.lr=0.01", "task.max_length=32", "eval.initial=true", "eval.per_client=false",
        "data.max_examples=500", "runtime.threads=2",
        f"output.dir={tmp_path / 'run'}",
    ])
    prepared = prepare(cfg)
    assert prepared.data.examples.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    rd = RunDir(cfg.output_dir())
    rd.create(overwrite=False)
    rows = Simulation(prepared, rd).run()
    assert rows[0]["round"] == 0 and rows[-1]["round"] == 2
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"]
    assert rows[-1]["eval_accuracy"] > 0.5
    assert (rd.adapter / "adapter_model.safetensors").exists()
