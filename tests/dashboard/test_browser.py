"""End to end in a real browser: ``fedfm run --dashboard`` on a tiny model, the page open in headless Chromium
(Debian's, driven by Playwright through its ``executable_path``: nothing is downloaded). The test paces the run: each
round's row waits until the test lets it through, so the page is seen before, during and after every round."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fedfm.cli as cli
from fedfm.cli import app
from fedfm.dashboard import Dashboard
from fedfm.tracking import RunDir

from tests.conftest import make_rows, tiny_overrides, write_csv
from tests.dashboard.test_state import write_run

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE_LABEL = "<script>window.pwned=2</script>tech"
HOSTILE_ERROR = "<img src=x onerror=\"window.pwned=1\">"

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason="Debian's chromium is not installed at /usr/bin/chromium (.ci/run installs it)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # the dev extra's: CI has it, so no skip for it

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def open_page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script("window.__blocked = []; document.addEventListener('securitypolicyviolation', "
                         "e => window.__blocked.push(e.violatedDirective + ' ' + (e.blockedURI || '')))")
    return page, errors


def wait_until(page, condition: str, timeout_s: float = 60) -> None:
    """Poll a JS expression through page.evaluate (the page's CSP, rightly, refuses the eval that Playwright's
    wait_for_function uses)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not page.evaluate(condition):
        assert time.monotonic() < deadline, f"the page never showed: {condition}"
        page.wait_for_timeout(100)


def shown_round(page) -> str:
    return page.locator("#round").text_content()


def points(page, chart: str) -> int:
    return page.evaluate(f"(document.getElementById('{chart}').data || []).reduce((n, t) => n + t.x.length, 0)")


def test_the_page_follows_a_run_as_it_happens(browser, tmp_path, monkeypatch):
    rounds = 3
    rows = [{**r, "label": HOSTILE_LABEL if r["label"] == "tech" else r["label"]} for r in make_rows()]
    source = write_csv(tmp_path / "tiny.csv", rows)
    overrides = tiny_overrides(source, tmp_path, **{"federation.rounds": rounds, "eval.federated": True})

    gate, boards, may_stop = threading.Semaphore(0), [], threading.Event()
    append, start, stop = RunDir.append_metrics, Dashboard.start, Dashboard.stop

    def paced(self, row):  # each round's row is written when the test lets it through
        assert gate.acquire(timeout=120), "the test never let this round through"
        append(self, row)

    def started(self):
        boards.append(self)
        return start(self)

    def stop_when_seen(self):  # the page stays up until the test has seen the finished run
        may_stop.wait(timeout=120)
        stop(self)

    monkeypatch.setattr(RunDir, "append_metrics", paced)
    monkeypatch.setattr(Dashboard, "start", started)
    monkeypatch.setattr(Dashboard, "stop", stop_when_seen)
    monkeypatch.setattr(cli.console, "_width", 1000)
    result = {}
    run = threading.Thread(target=lambda: result.update(res=CliRunner().invoke(
        app, ["run", "bbc-lora", *overrides, "--dashboard", "--dashboard-port", "0"])), daemon=True)
    run.start()
    shot = tmp_path / "dashboard.png"
    try:
        page, errors = open_page(browser)
        for _ in range(600):
            if boards and boards[0].port:
                break
            run.join(timeout=0.1)
        assert boards, f"the dashboard did not start: {result}"
        page.goto(boards[0].url)
        wait_until(page, "document.getElementById('status').textContent !== 'connecting'", 60)
        assert shown_round(page).startswith("round – of ")  # no round written yet
        seen_points = [points(page, "chart-accuracy")]
        for r in range(1, rounds + 1):
            gate.release()
            wait_until(page, f"document.getElementById('round').textContent === 'round {r} of {rounds}'", 60)
            wait_until(page, f"(document.getElementById('chart-accuracy').data || [])"
                                   f".some(t => t.x.length === {r})", 10)
            seen_points.append(points(page, "chart-accuracy"))
            assert page.locator("#clients tbody tr").count() >= 1
        assert seen_points == sorted(set(seen_points)), f"the accuracy chart did not gain points: {seen_points}"
        assert seen_points[0] == 0 and seen_points[-1] >= rounds
        wait_until(page, "document.getElementById('status').textContent === 'finished'", 60)
        wait_until(page, "[...document.querySelectorAll('#links-report a')].some(a => a.textContent === 'summary.md')",
                   60)  # make_report writes it last

        table = page.locator("#clients tbody tr")
        assert table.count() >= 2  # 2 clients a round, 3 rounds, over 4 clients
        assert page.locator("#clients tbody tr td:first-child").all_text_contents()[0].isdigit()
        assert points(page, "chart-loss") >= rounds
        assert HOSTILE_LABEL in page.locator("#chart-partition").text_content()  # shown as text, not run
        assert page.evaluate("window.pwned") is None
        assert page.locator("script").count() == 2  # only the page's own
        assert page.locator("#privacy-text").text_content().startswith("no DP")
        adapter = page.locator("#links-adapter a").all_text_contents()
        assert "adapter_config.json" in adapter and "adapter_model.safetensors" in adapter
        page.screenshot(path=str(shot), full_page=True)
        # the one thing the CSP refuses: the map traces' stylesheet plotly.js brings in (no map is drawn here)
        assert set(page.evaluate("window.__blocked")) <= {"style-src-elem inline"}
        assert errors == []
    finally:
        for _ in range(rounds + 1):
            gate.release()
        may_stop.set()
        run.join(timeout=120)
    res = result["res"]
    print(f"screenshot: {shot}")  # here: while the run's CliRunner ran, it held sys.stdout
    assert res.exit_code == 0, res.output
    assert "dashboard stopped" in res.output
    assert not any(t.name == "fedfm-dashboard" for t in threading.enumerate())


def test_what_clients_and_data_say_is_shown_as_text(browser, tmp_path):
    """A dropped client's error and a label name that are HTML: the page shows the characters and runs nothing."""
    run = write_run(tmp_path / "run")  # its round 2 drops client 1 with HOSTILE_ERROR; a label is <script>b</script>
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["dropped"][0]["error"] == HOSTILE_ERROR
    with Dashboard(run, port=0) as d:
        page, errors = open_page(browser)
        page.goto(d.url)
        wait_until(page, "document.querySelectorAll('#clients tbody tr').length === 3", 30)
        reasons = page.locator("#clients td.reason").all_text_contents()
        assert HOSTILE_ERROR in reasons
        assert "<script>b</script>" in page.locator("#chart-partition").text_content()
        assert page.evaluate("window.pwned") is None
        assert page.locator("img").count() == 0 and page.locator("#clients script").count() == 0
        assert page.locator("script").count() == 2
        assert errors == []
