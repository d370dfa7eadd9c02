"""The dashboard's ASGI app (starlette): the page, its script and style, plotly.js from the installed ``plotly``
package, ``/api/state`` (the run's state as JSON, polled by the page) and the run's report and adapter files.

Read-only by construction: GET and HEAD only (anything else is 405), files only under ``report/`` and ``adapter/``
that fedfm writes (``tracking.owned``) and that resolve inside the run directory, a strict Content-Security-Policy
(scripts and styles from this server only, nothing inline) and ``X-Content-Type-Options: nosniff`` on every response.
"""
from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..tracking import owned
from .state import LINKED, RunState

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}

# plotly.js puts its own style rules into an empty <style> element through the CSSOM: the hash is that of the empty
# string, which lets the empty element in and nothing else (no inline script, no inline style with content).
EMPTY_STYLE = "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
CSP = (f"default-src 'self'; script-src 'self'; style-src 'self' {EMPTY_STYLE}; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cross-Origin-Resource-Policy": "same-origin"}
READ_METHODS = ("GET", "HEAD")

# How a linked file is sent: images as images, text as plain text (never as HTML), anything else as a download.
_TEXT = {".md": "text/plain; charset=utf-8", ".json": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8",
         ".jsonl": "text/plain; charset=utf-8"}
_IMAGES = {".png": "image/png"}


def plotly_js() -> Path:
    """plotly.js as the ``plotly`` Python package ships it (``package_data/plotly.min.js``): served from here,
    never fetched from a CDN."""
    return Path(str(resources.files("plotly").joinpath("package_data", "plotly.min.js")))


def hostname(host_header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8765`` → ``::1``, ``localhost:8765`` → ``localhost``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class ReadOnly:
    """ASGI middleware: GET and HEAD pass, any other method is answered 405; a Host header not among ``hosts`` (when
    given) is answered 421, so a page elsewhere that rebinds its DNS name to 127.0.0.1 cannot read the dashboard;
    every response gets ``HEADERS``."""

    def __init__(self, app, hosts: Optional[frozenset[str]] = None):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.hosts is not None and hostname(Headers(scope=scope).get("host", "")) not in self.hosts:
            response = PlainTextResponse("unknown Host: open the dashboard by the address it printed\n",
                                         status_code=421)
            return await response(scope, receive, self._secured(send))
        if scope["method"] not in READ_METHODS:
            response = PlainTextResponse("read-only: GET and HEAD only\n", status_code=405,
                                         headers={"Allow": ", ".join(READ_METHODS)})
            return await response(scope, receive, self._secured(send))
        return await self.app(scope, receive, self._secured(send))

    @staticmethod
    def _secured(send):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items() if k.lower().encode() not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
        return wrapped


def run_file(run_dir: Path, relative: str) -> Path | None:
    """``run_dir/relative`` when it is a file fedfm wrote under ``report/`` or ``adapter/`` and resolves inside the
    run directory (no ``..``, no link out, no hidden or temporary file); None otherwise."""
    root = run_dir.resolve()
    try:
        path = (root / relative).resolve(strict=True)
        rel = path.relative_to(root).as_posix()
    except (OSError, ValueError, RuntimeError):
        return None
    parts = rel.split("/")
    if parts[0] not in LINKED or any(p.startswith(".") for p in parts) or not owned(rel) or not path.is_file():
        return None
    return path


def make_app(run_dir: str | Path, hosts: Optional[Iterable[str]] = None) -> Starlette:
    """The dashboard of one run directory (which need not exist yet: the page then says it waits for the run).
    ``hosts``: the names a request's Host header may give (None: any)."""
    run_dir = Path(run_dir)
    state, lock = RunState(run_dir), threading.Lock()
    plotly = plotly_js()

    def page(request):
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    def static(request):
        name = request.path_params["name"]
        if name == "plotly.min.js":
            return FileResponse(plotly, media_type="text/javascript; charset=utf-8",
                                headers={"Cache-Control": "max-age=86400"})
        if name not in PAGE_FILES:
            return PlainTextResponse("not found\n", status_code=404)
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"})

    def api_state(request):
        with lock:  # one reader of metrics.jsonl at a time: it reads on from where the last read stopped
            body = state.read()
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    def files(request):
        path = run_file(run_dir, request.path_params["path"])
        if path is None:
            return PlainTextResponse("not found\n", status_code=404)
        suffix = path.suffix.lower()
        if suffix in _IMAGES or suffix in _TEXT:
            return FileResponse(path, media_type=_IMAGES.get(suffix) or _TEXT[suffix])
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    def favicon(request):
        return Response(status_code=204)

    routes = [Route("/", page, methods=list(READ_METHODS)),
              Route("/static/{name}", static, methods=list(READ_METHODS)),
              Route("/api/state", api_state, methods=list(READ_METHODS)),
              Route("/files/{path:path}", files, methods=list(READ_METHODS)),
              Route("/favicon.ico", favicon, methods=list(READ_METHODS))]
    app = Starlette(routes=routes)
    app.add_middleware(ReadOnly, hosts=None if hosts is None else frozenset(h.lower() for h in hosts))
    return app
