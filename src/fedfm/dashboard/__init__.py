"""A live dashboard of a run, served from its run directory alone (``fedfm dashboard RUN_DIR``, ``fedfm run
--dashboard``; docs/dashboard.md): the same page follows a simulation and the server side of a deployment.

``Dashboard(run_dir, host, port)`` serves it from a background thread (uvicorn) for as long as its ``with`` block
runs; it needs the ``dashboard`` extra (starlette, uvicorn, plotly).
"""
from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from ..errors import FedfmError
from .state import RunState, is_run_dir

__all__ = ["Dashboard", "MissingExtra", "RunState", "check_run_dir", "is_run_dir", "require_extra"]

EXTRA = ("starlette", "uvicorn", "plotly")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8765


class MissingExtra(FedfmError):
    """The dashboard's packages are not installed."""


def require_extra() -> None:
    """Refuse, naming the extra, when starlette, uvicorn or plotly is missing."""
    missing = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"the dashboard needs {', '.join(missing)}: pip install \"fedfm[dashboard]\"")


def check_run_dir(path: Path, wait: bool = False) -> None:
    """Refuse, naming it, a path that is not a run directory: a file, a directory with files but none of a run's, or
    (unless ``wait``: the run has not started yet) nothing at all."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FedfmError(f"fedfm dashboard: {path} is a file, not a run directory")
    if not path.exists() and not wait:
        raise FedfmError(f"fedfm dashboard: run directory {path} does not exist (pass --wait to serve the page before "
                         f"the run starts)")
    if path.is_dir() and any(path.iterdir()) and not is_run_dir(path):
        raise FedfmError(f"fedfm dashboard: {path} is not a run directory (no .fedfm-run, config.yaml or "
                         f"metrics.jsonl in it)")


WILDCARDS = ("0.0.0.0", "::", "")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(host: str) -> Optional[tuple[str, ...]]:
    """The Host header names the dashboard answers: the address it is bound to and, bound to the loopback, the
    loopback's names (an SSH tunnel arrives as 127.0.0.1 or localhost); any, bound to every interface."""
    if host in WILDCARDS:
        return None
    return (host, *LOOPBACK) if host in LOOPBACK or host.startswith("127.") else (host,)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or a FedfmError naming host:port."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise FedfmError(f"dashboard: cannot serve on host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT; never one in use
        sock.bind(addr)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise FedfmError(f"dashboard: cannot listen on {host}:{port} ({e.strerror}); is another program using it? "
                         f"choose another port, or port 0 for any free one") from None
    return sock


class Dashboard:
    """The dashboard of ``run_dir`` on http://host:port/ while the ``with`` block runs (uvicorn in a daemon thread,
    stopped and joined on exit)::

        with Dashboard("runs/bbc-lora") as d:
            print(d.url)
            ...  # run, or wait
    """

    def __init__(self, run_dir: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
        self.run_dir, self.host, self.port = Path(run_dir), host, port
        self._server = self._thread = self._sock = None
        self._error: Optional[BaseException] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "Dashboard":
        require_extra()
        import uvicorn

        from .app import make_app

        app = make_app(self.run_dir, hosts=allowed_hosts(self.host))
        self._sock = _listen(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="fedfm-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise FedfmError(f"dashboard: the server on {self.host}:{self.port} did not start"
                                 + (f" ({self._error})" if self._error else ""))
            time.sleep(0.02)
        return self

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as e:  # uvicorn exits (SystemExit) when it cannot start: start() reports it
            self._error = e

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def wait(self) -> None:
        """Serve until interrupted (Ctrl-C) or the server stops."""
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            pass

    def __enter__(self) -> "Dashboard":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
