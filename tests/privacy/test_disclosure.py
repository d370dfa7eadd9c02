"""What each party sees, against what the docs say it sees: for each privacy setting, the fields of every client
result (besides the update) and of every metrics row are exactly the ones docs/privacy.md lists for it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedfm.simulation import Simulation, prepare

DOC = Path(__file__).resolve().parents[2] / "docs" / "privacy.md"
DP = {"privacy.mode": "client", "privacy.noise_multiplier": 1.0}
SECURE = {"secagg.enabled": True, "secagg.corrupt_fraction": 0}  # 4 clients: no corrupt one is needed to run
SETTINGS = {
    "none": [{}],
    "secagg": [SECURE],
    "client": [DP, {**DP, "privacy.target_quantile": 0.5, "privacy.count_noise": 2.0}],
    "client + secagg": [{**DP, **SECURE}, {**DP, **SECURE, "secagg.dp_noise": "distributed"}],
    "sample": [{"privacy.mode": "sample", "privacy.noise_multiplier": 1.0}],
}


def _documented() -> dict[str, dict[str, dict[str, set[str]]]]:
    """{setting: {"result"|"row": {"always": fields, "sometimes": fields}}} from the docs' table."""
    text = DOC.read_text()
    body = text.split("<!-- what-each-party-sees -->")[1].split("<!-- /what-each-party-sees -->")[0]
    lines = [ln for ln in body.strip().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out: dict = {s: {"result": {"always": set(), "sometimes": set()}, "row": {"always": set(), "sometimes": set()}}
                 for s in SETTINGS}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        field, where = cells[0].strip("`"), cells[1]
        for setting in SETTINGS:
            cell = cells[header.index(setting)]
            if cell.startswith("—"):
                continue
            out[setting][where]["sometimes" if "(if" in cell else "always"].add(field)
    return out


def _matches(key: str, field: str) -> bool:
    return key == field or (field.endswith("*") and key.startswith(field[:-1]))


def _observe(tiny_config, overrides: dict) -> tuple[set[str], set[str], list]:
    cfg = tiny_config(**{"federation.rounds": 1, "eval.every": 1, "partition.num_clients": 4,
                         "federation.clients_per_round": 4, "eval.federated": True, **overrides})
    server = Simulation(prepare(cfg))
    seen: list = []
    real = server.aggregate_results

    def spy(rnd, results, *a, **k):
        seen.extend(results)
        return real(rnd, results, *a, **k)

    server.aggregate_results = spy
    rows = server.run()
    result_fields = {"num_examples"} | {k for r in seen if r.error is None for k in r.metrics}
    return result_fields, set(rows[-1]), seen


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_field_each_party_sees_is_the_one_the_docs_list(tiny_config, setting):
    documented = _documented()[setting]
    observed = {"result": set(), "row": set()}
    for overrides in SETTINGS[setting]:
        result_fields, row_fields, results = _observe(tiny_config, overrides)
        observed["result"] |= result_fields
        observed["row"] |= row_fields
        if setting == "client + secagg":  # nothing exact about the client's data, not even its size
            assert all(r.num_examples == 1 and not r.metrics for r in results if r.error is None)
    for where in ("result", "row"):
        listed = documented[where]["always"] | documented[where]["sometimes"]
        undocumented = {k for k in observed[where] if not any(_matches(k, f) for f in listed)}
        assert not undocumented, f"{setting}: {where} fields the docs do not list: {sorted(undocumented)}"
        missing = {f for f in documented[where]["always"] if not any(_matches(k, f) for k in observed[where])}
        assert not missing, f"{setting}: the docs list {where} fields that are not there: {sorted(missing)}"


def test_the_docs_table_names_every_setting_and_mark():
    text = DOC.read_text().split("<!-- what-each-party-sees -->")[1].split("<!-- /what-each-party-sees -->")[0]
    marks = set(re.findall(r"\| (exact|released|public|—)", text))
    assert marks == {"exact", "released", "public", "—"}
