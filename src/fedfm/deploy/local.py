"""A Flower federation on this machine, secure as between organisations: TLS certificates and SuperNode keys made
with ``cryptography``, a SuperLink that admits only registered SuperNodes, one SuperNode per site file, the fedfm app
run on it with ``flwr run``. What ``fedfm deploy local`` and the deployment tests start; ``docs/deployment.md`` does
the same by hand across machines.

Every process is Flower's own (``flower-superlink``, ``flower-supernode``, ``flwr``); this module only writes their
certificates, keys and config files and starts and stops them. Nothing waits forever: a SuperLink that does not
listen, or a run that does not finish, times out naming the address.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import FedfmError

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedfm-app"
version = "1.0.0"
description = "fedfm's ServerApp and ClientApp (the fedfm package must be installed where they run)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedfm"

[tool.flwr.app.components]
serverapp = "fedfm.deploy.flower:server_app"
clientapp = "fedfm.deploy.flower:client_app"

[tool.flwr.app.config]
fedfm-config = ""
resume = false
overwrite = false
"""


def write_app(directory: Path) -> Path:
    """The Flower app directory ``flwr run`` takes: a pyproject.toml naming fedfm's ServerApp and ClientApp."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT)
    return directory


def flower_exe(name: str) -> str:
    """A Flower command from this Python's environment (``pip install "fedfm[flower]"``)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise FedfmError(f"{name} not found: install Flower with pip install \"fedfm[flower]\"")
    return found


def flower_env(**extra: str) -> dict[str, str]:
    """The environment for a Flower process: this Python's scripts first on PATH (a SuperLink and a SuperNode start
    ``flower-superexec`` and ``flwr-serverapp``/``flwr-clientapp`` by name)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **extra}


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_connection(home: Path, address: str, root_certificates: Optional[Path]) -> None:
    """A Flower CLI home (``FLWR_HOME``) whose SuperLink connection ``fedfm`` is ``address`` (TLS with the CA
    ``root_certificates``, or plain HTTP when None)."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "fedfm"', "", "[superlink.fedfm]", f"address = {_toml_string(address)}"]
    lines.append(f"root-certificates = {_toml_string(str(root_certificates))}" if root_certificates else
                 "insecure = true")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise naming ``address`` unless something accepts a TCP connection there within ``timeout_s`` (``flwr run``
    against a closed port retries for a while and then says only that the connection is unavailable)."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise FedfmError(f"--superlink {address!r}: expected HOST:PORT (e.g. superlink.example.org:8000)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise FedfmError(f"no SuperLink reachable at {address} ({e.strerror or e}): is flower-superlink running "
                         f"there, with --host/--port matching, and does the firewall let this machine in?") from None


def run_app(config_yaml: str, address: str, root_certificates: Optional[Path], work: Path, resume: bool = False,
            overwrite: bool = False, timeout_s: float = 3600.0, log=None) -> str:
    """``flwr run`` of fedfm's app on the SuperLink at ``address`` with the run's config; streams the server side's
    output (to ``log``, a binary file, or this process's stdout) and returns when the run ends with its Flower status
    (``finished:completed``, ``finished:failed``, …); raises naming the address when nothing listens there (within
    10 s) or after ``timeout_s``."""
    import json
    import re
    import threading

    check_reachable(address)
    app = write_app(work / "app")
    home = work / "flwr-cli"
    write_connection(home, address, root_certificates)
    run_config = work / "run-config.toml"
    run_config.write_text(f"fedfm-config = {_toml_string(config_yaml)}\nresume = {str(resume).lower()}\n"
                          f"overwrite = {str(overwrite).lower()}\n")
    env = flower_env(FLWR_HOME=str(home))
    cmd = [flower_exe("flwr"), "run", str(app), "fedfm", "--run-config", str(run_config), "--stream"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sink = log if log is not None else sys.stdout.buffer
    seen: list[bytes] = []

    def pump() -> None:
        for line in iter(proc.stdout.readline, b""):
            seen.append(line)
            sink.write(line)
            sink.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise FedfmError(f"flwr run on the SuperLink at {address} did not finish within {timeout_s:g}s") from None
    reader.join(timeout=10)
    found = re.search(rb"started run (\d+)", b"".join(seen))
    if found is None:
        raise FedfmError(f"flwr run could not start the run on the SuperLink at {address} (exit code "
                         f"{proc.returncode}): {b''.join(seen)[-1500:].decode(errors='replace')}")
    run_id = found.group(1).decode()
    out = subprocess.run([flower_exe("flwr"), "ls", "--run-id", run_id, "--format", "json"], env=env,
                         capture_output=True, text=True, timeout=60)
    try:
        return str(json.loads(out.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        raise FedfmError(f"flwr ls on the SuperLink at {address} did not say how run {run_id} ended: "
                         f"{out.stdout[-500:]}{out.stderr[-500:]}") from None


# ---------------------------------------------------------------------------------------------- certificates, keys
@dataclass
class Certificates:
    ca: Path  # the CA certificate every party trusts (SuperNodes: --root-certificates)
    server_cert: Path  # the SuperLink's certificate, for 127.0.0.1 and localhost (or the hosts given)
    server_key: Path


def make_certificates(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 30) -> Certificates:
    """A CA and a SuperLink certificate it signs (ECDSA P-384), valid for ``hosts``; private keys mode 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedfm deployment CA")).issuer_name(name("fedfm deployment CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA384()))
    out = Certificates(ca=directory / "ca.pem", server_cert=directory / "superlink.pem",
                       server_key=directory / "superlink.key")
    out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(ca_key, directory / "ca.key")
    write_key(key, out.server_key)
    return out


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (ECDSA P-384, OpenSSH format, as Flower reads them): (private, public).
    The public key is what the SuperLink's operator registers; the private key never leaves the node."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


# ---------------------------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, timeout_s: float, what: str, proc: Optional[subprocess.Popen] = None,
                   log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise FedfmError(f"{what} at {host}:{port} exited with code {proc.returncode}:\n{tail}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FedfmError(f"{what} is not listening at {host}:{port} after {timeout_s:g}s")


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, each a process with its own log under ``work``. ``secure``: TLS and
    SuperNode authentication (only registered keys may join); else plain HTTP, any node admitted."""

    work: Path
    secure: bool = True
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)
    certs: Optional[Certificates] = None
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    server_env: dict[str, str] = field(default_factory=dict)  # more environment for the SuperLink and its ServerApp

    def __post_init__(self) -> None:
        # every process runs in ``work`` and is given paths under it: relative ones would resolve twice
        self.work = Path(self.work).resolve()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, cmd: list[str], log_name: str, env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.work / log_name, "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.work, env=env,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_superlink(self, timeout_s: float = 60.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        cmd = [flower_exe("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation", "--database", str(self.work / "superlink.db")]
        if self.secure:
            self.certs = make_certificates(self.work / "certs")
            cmd += ["--ssl-certfile", str(self.certs.server_cert), "--ssl-keyfile", str(self.certs.server_key),
                    "--ssl-ca-certfile", str(self.certs.ca), "--enable-supernode-auth"]
        else:
            cmd += ["--insecure"]
        proc = self._spawn(cmd, "superlink.log", env=flower_env(FLWR_HOME=str(self.work / "superlink-home"),
                                                               **self.server_env))
        wait_listening("127.0.0.1", self.port, timeout_s, "the SuperLink", proc, self.work / "superlink.log")
        write_connection(self.work / "flwr-cli", self.address, self.certs.ca if self.certs else None)

    def register(self, public_key: Path, timeout_s: float = 60.0) -> None:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``)."""
        cmd = [flower_exe("flwr"), "supernode", "register", str(public_key), "fedfm"]
        env = flower_env(FLWR_HOME=str(self.work / "flwr-cli"))
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise FedfmError(f"flwr supernode register: no answer from the SuperLink at {self.address} "
                             f"within {timeout_s:g}s") from None
        if out.returncode != 0:
            raise FedfmError(f"flwr supernode register {public_key}: {out.stdout[-1000:]}{out.stderr[-1000:]}")

    def start_supernode(self, name: str, data: Optional[Path], test_data: Optional[Path] = None,
                        client_id: Optional[int] = None, register: bool = True,
                        private_key: Optional[Path] = None, env: Optional[dict[str, str]] = None,
                        node_config: Optional[dict[str, object]] = None) -> subprocess.Popen:
        """A SuperNode whose node config names its own files. Secure: with its own key pair, the public half
        registered first unless ``register`` is False (then the SuperLink refuses it). ``node_config`` replaces the
        data settings (``data``, ``test_data``, ``client_id``) with its own, e.g. ``{"partition-id": 3,
        "num-partitions": 10}``: that partition of the config's ``data.source``, as the simulation engine gives."""
        if node_config is not None:
            settings = [f'{k}="{v}"' if isinstance(v, (str, Path)) else f"{k}={v}" for k, v in node_config.items()]
        else:
            if data is None:
                raise FedfmError(f"SuperNode {name}: no data and no node_config")
            settings = [f'data="{data}"']
            if test_data is not None:
                settings.append(f'test-data="{test_data}"')
            if client_id is not None:
                settings.append(f"client-id={client_id}")
        cmd = [flower_exe("flower-supernode"), "--superlink", self.address, "--node-config", " ".join(settings),
               "--port", str(free_port()), "--max-wait-time", "60"]
        if self.secure:
            if private_key is None:
                private_key, public = make_node_key(self.work / "keys", name)
                if register:
                    self.register(public)
            cmd += ["--root-certificates", str(self.certs.ca), "--auth-supernode-private-key", str(private_key)]
        else:
            cmd += ["--insecure"]
        proc = self._spawn(cmd, f"supernode-{name}.log",
                           env=flower_env(FLWR_HOME=str(self.work / f"node-{name}"), **(env or {})))
        self.nodes[name] = proc
        return proc

    def run(self, config_yaml: str, resume: bool = False, overwrite: bool = False, timeout_s: float = 1800.0,
            echo: bool = False) -> str:
        """``flwr run`` of fedfm's app with this config (the server side's output goes to ``run.log``, and to this
        process's stdout with ``echo``); its Flower status."""
        with open(self.work / "run.log", "ab") as log:
            return run_app(config_yaml, self.address, self.certs.ca if self.certs else None, self.work, resume,
                           overwrite, timeout_s, log=None if echo else log)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a process and everything it started (a SuperNode's ClientApp processes too)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill(proc)

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- a demo's sites
def write_sites(cfg, directory: Path) -> list[tuple[Path, Optional[Path]]]:
    """Split the config's data as a simulation would (``partition.*``, the same seed) and write each client's
    training and test examples to its own files, ``site<k>/train.jsonl`` and ``site<k>/test.jsonl``: what each
    organisation of a demo federation holds. Returns (train, test or None when empty) per client, in client order."""
    import json

    from ..simulation import prepare

    data = prepare(cfg).data
    ex, d = data.examples, cfg.data
    if ex.texts is None:
        raise FedfmError("fedfm deploy local writes text examples (classification, language modelling); this data "
                         "has none (conversations: give each SuperNode its own file by hand, docs/deployment.md)")

    def row(i: int) -> dict:
        out = {d.text_column: ex.texts[i]}
        if ex.labels is not None:
            out[d.label_column] = ex.label_names[int(ex.labels[i])]
        return out

    sites = []
    for c in data.clients:
        folder = directory / f"site{c.id}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for part, idx in (("train", c.train), ("test", c.test)):
            path = folder / f"{part}.jsonl"
            path.write_text("".join(json.dumps(row(int(i))) + "\n" for i in idx))
            paths.append(path if len(idx) else None)
        sites.append((paths[0], paths[1]))
    return sites


def site_config(cfg):
    """The config the sites' files are read with: every example a site wrote is its own (no ``data.max_examples``);
    the run directory an absolute path, where this command's user asked for it (the SuperLink runs in its own
    folder, where a relative ``output.dir`` would resolve)."""
    from ..config import validate_config

    data = cfg.model_dump(mode="json")
    data["data"]["max_examples"] = None
    data["output"]["dir"] = str(cfg.output_dir().resolve())
    return validate_config(data)
