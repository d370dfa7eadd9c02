"""The dashboard's HTTP app (starlette's TestClient): routes, read-only, files of the run only, headers."""
from __future__ import annotations

import json
import re

import pytest
from starlette.testclient import TestClient

from fedfm.dashboard.app import STATIC, make_app, plotly_js, run_file

from tests.dashboard.test_state import write_run


@pytest.fixture
def run(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "report").mkdir()
    (run / "report" / "summary.md").write_text("# <b>summary</b>\n")
    (run / "report" / "accuracy.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (run / "report" / "notes.txt").write_text("the user's own file")  # not fedfm's: never served
    (run / "report" / ".summary.md.tmp").write_text("half")  # a file being written: never served
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "round_0001.pt").write_bytes(b"ck")
    (run / "client_state").mkdir()
    (run / "client_state" / "client_000000.v0.safetensors").write_bytes(b"a client's own state")
    (tmp_path / "secret.txt").write_text("outside the run")
    (run / "report" / "loss.png").symlink_to(tmp_path / "secret.txt")  # an owned name that links out
    return run


@pytest.fixture
def client(run):
    return TestClient(make_app(run))


def test_page_script_style_and_state(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
    state = client.get("/api/state")
    assert state.status_code == 200 and state.headers["cache-control"] == "no-store"
    assert state.json()["round"] == 2 and state.json()["clients_total"] == 3
    assert client.get("/static/index.html").status_code == 404  # only the page's own files, by name
    assert client.get("/static/../app.py").status_code == 404
    assert client.head("/").status_code == 200


def test_plotly_js_is_served_from_the_installed_package(client):
    r = client.get("/static/plotly.min.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert r.content == plotly_js().read_bytes() and len(r.content) > 1_000_000
    assert b"plotly.js v" in r.content[:2000]


def test_every_response_carries_a_strict_csp_and_nosniff(client):
    for path in ("/", "/api/state", "/static/dashboard.js", "/files/report/summary.md", "/nope"):
        h = client.get(path).headers
        assert h["x-content-type-options"] == "nosniff", path
        csp = dict(d.strip().split(" ", 1) for d in h["content-security-policy"].split(";"))
        assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'", path
        assert "unsafe-inline" not in h["content-security-policy"] and "unsafe-eval" not in h["content-security-policy"]
        assert csp["object-src"] == "'none'" and csp["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", ["/", "/api/state", "/files/report/summary.md", "/nope"])
def test_nothing_but_get_and_head(client, run, method, path):
    before = sorted(p.name for p in run.rglob("*"))
    r = client.request(method, path, content=b"x")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert r.headers["content-security-policy"].startswith("default-src 'self'")
    assert sorted(p.name for p in run.rglob("*")) == before


def test_report_and_adapter_files_are_served_read_only(client):
    md = client.get("/files/report/summary.md")
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/plain")  # never as HTML
    assert md.text == "# <b>summary</b>\n"
    assert client.get("/files/report/accuracy.png").headers["content-type"] == "image/png"
    st = client.get("/files/adapter/adapter_model.safetensors")
    assert st.status_code == 200 and st.headers["content-type"] == "application/octet-stream"
    assert "attachment" in st.headers["content-disposition"]
    links = client.get("/api/state").json()["links"]
    assert [f["name"] for f in links["report"]] == ["accuracy.png", "summary.md"]  # no notes, tmp, or link out
    assert [f["name"] for f in links["adapter"]] == ["adapter_config.json", "adapter_model.safetensors"]
    for f in links["report"] + links["adapter"]:
        assert client.get("/" + f["href"]).status_code == 200


@pytest.mark.parametrize("path", [
    "config.yaml", "metrics.jsonl", ".fedfm-run",  # the run's, but not what the page links to
    "checkpoints/round_0001.pt", "client_state/client_000000.v0.safetensors",  # never: a client's own state
    "report/notes.txt", "report/.summary.md.tmp",  # not fedfm's, or not finished
    "report/loss.png",  # fedfm's name, but a link out of the run directory
    "report/../config.yaml", "report/../../secret.txt", "adapter/../../secret.txt", "../secret.txt",
    "/etc/passwd", "report/", "report", "adapter/missing.json",
])
def test_anything_else_is_refused(run, client, path):
    assert run_file(run, path) is None
    quoted = re.sub(r"\.\.", "%2e%2e", path)  # so the client does not normalise the dots away
    assert client.get(f"/files/{quoted}").status_code == 404
    assert client.get(f"/files/{path}").status_code == 404


def test_a_run_directory_that_does_not_exist_yet(tmp_path):
    client = TestClient(make_app(tmp_path / "later"))
    assert client.get("/").status_code == 200
    assert client.get("/api/state").json()["status"] == "waiting"
    assert client.get("/files/report/summary.md").status_code == 404


def test_the_page_has_no_inline_script_and_its_script_writes_no_html():
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S)
    assert len(scripts) == 2 and all(s.strip() == "" for s in scripts)  # each loads a file of this server
    assert re.findall(r"<script\b[^>]*\bsrc=\"([^\"]+)\"", html) == ["static/plotly.min.js", "static/dashboard.js"]
    assert not re.search(r"\son\w+\s*=", html) and "style=" not in html
    js = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink


def test_state_is_strict_json(client):
    json.loads(client.get("/api/state").text, parse_constant=lambda c: pytest.fail(f"{c} in /api/state"))


@pytest.mark.parametrize("host, ok", [("127.0.0.1:8765", True), ("localhost:8765", True), ("[::1]:8765", True),
                                      ("LOCALHOST", True), ("evil.example:8765", False), ("", False),
                                      ("127.0.0.1.evil.example", False)])
def test_a_host_header_of_another_name_is_refused(run, host, ok):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 must not read the run."""
    from fedfm.dashboard import allowed_hosts

    client = TestClient(make_app(run, hosts=allowed_hosts("127.0.0.1")))
    for path in ("/", "/api/state", "/files/report/summary.md"):
        r = client.get(path, headers={"host": host})
        assert r.status_code == (200 if ok else 421), (path, host)
        assert r.headers["x-content-type-options"] == "nosniff"


def test_hosts_by_binding():
    from fedfm.dashboard import allowed_hosts

    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("::") is None  # every interface: any name
    assert set(allowed_hosts("::1")) == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("10.0.0.5") == ("10.0.0.5",)
