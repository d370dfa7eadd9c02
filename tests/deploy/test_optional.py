"""Flower and Ray are optional: fedfm, its simulation, its server side and its CLI's help import neither, and the
deploy package imports flwr only when a deployment runs (``deploy.flower``). ``fedfm deploy run`` refuses bad input
clearly and quickly, before anything loads."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fedfm
from fedfm.deploy.local import free_port

# the fedfm these tests import (this checkout's), for the fresh interpreters they start
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fedfm.__file__).resolve().parents[1]),
                                                    os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200"}


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def _fedfm(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fedfm", *args], capture_output=True, text=True, env=ENV,
                         timeout=timeout)
    return out, time.monotonic() - start


def test_fedfm_and_its_cli_help_import_neither_flwr_nor_ray():
    out = _python("""
        import sys
        import fedfm, fedfm.simulation, fedfm.server, fedfm.cli
        for args in (["--help"], ["deploy", "--help"], ["deploy", "run", "--help"], ["deploy", "local", "--help"]):
            try:
                fedfm.cli.app(args=args, prog_name="fedfm")
            except SystemExit as e:
                assert e.code in (0, None), (args, e.code)
        print("LOADED", sorted(m for m in ("flwr", "ray") if m in sys.modules))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "deploy" in out.stdout  # the help was printed
    assert "LOADED []" in out.stdout, out.stdout[-2000:]


def test_the_deploy_package_does_not_import_flwr():
    out = _python("""
        import sys
        import fedfm.deploy, fedfm.deploy.local
        assert fedfm.deploy.Deployment and fedfm.deploy.check_config
        print("LOADED", sorted(m for m in ("flwr", "ray") if m in sys.modules))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout, out.stdout[-2000:]


def test_deploy_run_without_tls_or_insecure_names_both_options():
    out, _ = _fedfm("deploy", "run", "bbc-lora", "--superlink", "127.0.0.1:1")
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "--root-certificates" in text and "--insecure" in text, text[-2000:]


def test_deploy_run_against_a_closed_port_fails_quickly_naming_the_address():
    address = f"127.0.0.1:{free_port()}"  # bound and closed again: nothing listens there
    out, seconds = _fedfm("deploy", "run", "bbc-lora", "--superlink", address, "--insecure", "--timeout", "60")
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert address in text and "no SuperLink reachable" in text, text[-2000:]
    assert seconds < 90, seconds  # refused by the check before `flwr run`, which would retry against nothing


def test_deploy_run_refuses_an_address_without_a_port():
    out, _ = _fedfm("deploy", "run", "bbc-lora", "--superlink", "127.0.0.1", "--insecure")
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "HOST:PORT" in text and "127.0.0.1" in text, text[-2000:]


def test_deploy_run_refuses_what_a_deployment_cannot_do_before_reaching_out():
    out, _ = _fedfm("deploy", "run", "bbc-lora", "attack.kind=sign-flip", "--superlink", "127.0.0.1:1", "--insecure")
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "attack.kind" in text and "no SuperLink reachable" not in text, text[-2000:]


def test_deploy_local_refuses_what_a_deployment_cannot_do_before_splitting_the_data(tmp_path):
    out, _ = _fedfm("deploy", "local", "bbc-lora", "federation.schedule=fedbuff", "--work", str(tmp_path / "fed"))
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "federation.schedule" in text, text[-2000:]
    assert not (tmp_path / "fed").exists()
