"""The coordinator's HTTP endpoints: Prometheus ``/metrics`` and the read-only dashboard
(docs/daemons.md, "Metrics and dashboard").

Both are standard-library servers (``http.server.ThreadingHTTPServer``) in daemon threads
of the coordinator process, each off unless its ``port`` is set and bound to loopback
unless ``host`` says otherwise. They read the state folder read-only, as ``fedcoe status``
does (:mod:`coordinator.status`, :mod:`coordinator.metrics`): nothing a request does can
write, and the daemon's handlers are never waited on.

Bounded, since the dashboard has no login and anyone who can reach the port can ask:
only ``GET``/``HEAD`` of a fixed set of paths (anything else 404, other methods 405); at
most ``MAX_CLIENTS`` connections served at once (more are closed at once, not queued in
threads); a socket timeout on every connection (a client that sends nothing is dropped);
the status document is built at most once per ``STATUS_MAX_AGE_S`` whatever the request
rate, and the refusal list is the newest ``REFUSALS_SHOWN`` rows by primary key.

The assets ship in the package (``coordinator/dashboard_assets``, package data): the page
loads nothing from anywhere else, and its Content-Security-Policy says so.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from coordinator.config import CoordinatorConfig
from coordinator.status import DB_NAME, _connect, iso, read_status
from fedcoe_edge.errors import ConfigError, FedCoEError

log = logging.getLogger("fedcoe.coordinator.http")

MAX_CLIENTS = 16  # connections served at once, per server
SOCKET_TIMEOUT_S = 10.0  # a connection idle this long is closed
STATUS_MAX_AGE_S = 1.0  # the status document is rebuilt at most this often ...
STATUS_COST_SHARE = 0.1  # ... and building it takes at most this share of the time
REFUSALS_SHOWN = 50  # newest refusal/failure/decline rows on the dashboard
ASSETS: dict[str, str] = {  # URL path -> (file in coordinator/dashboard_assets)
    "/": "index.html",
    "/index.html": "index.html",
    "/static/dashboard.js": "dashboard.js",
    "/static/dashboard.css": "dashboard.css",
}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[], Response]


def asset(name: str) -> bytes:
    """One file of the dashboard, from the installed package."""
    return (resources.files("coordinator") / "dashboard_assets" / name).read_bytes()


def _json(doc: Any, status: int = 200) -> Response:
    return status, "application/json", (json.dumps(doc, indent=1) + "\n").encode()


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of the server's fixed routes; everything else is refused without work."""

    server: _Server
    timeout = SOCKET_TIMEOUT_S
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _refuse_method(self) -> None:
        self._send(405, "text/plain; charset=utf-8", b"read-only: GET and HEAD only\n",
                   body=True, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

    def _answer(self, body: bool) -> None:
        route = self.server.routes.get(urlsplit(self.path).path)
        if route is None:
            self._send(404, "text/plain; charset=utf-8", b"not found\n", body)
            return
        try:
            status, ctype, data = route()
        except Exception as exc:  # a bad state folder must not kill the server thread
            log.warning("%s %s: %s: %s", self.command, self.path[:100], type(exc).__name__,
                        str(exc)[:200])
            status, ctype, data = _json({"error": str(exc)[:500]}, 503)
        self._send(status, ctype, data, body)

    def _send(self, status: int, ctype: str, data: bytes, body: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose threads are bounded: a connection past ``MAX_CLIENTS``
    is closed at once instead of getting a thread."""

    daemon_threads = True
    request_queue_size = MAX_CLIENTS

    def __init__(self, addr: tuple[str, int], routes: dict[str, Route]) -> None:
        self.routes = routes
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        if ":" in addr[0]:  # an IPv6 host ("::1", "::")
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _StatusCache:
    """``read_status`` of the state folder, rebuilt at most once per STATUS_MAX_AGE_S and
    at most STATUS_COST_SHARE of the time: a build reads the whole round log (seconds for
    a large fleet's history), and it runs in the coordinator's own process, so the reuse
    interval grows with the last build's cost. Concurrent requests share one build."""

    def __init__(self, state_dir: Path, rounds: int | None, federation: str | None,
                 allowed: Callable[[], list[str]] | None = None) -> None:
        self.state_dir, self.rounds, self.federation = state_dir, rounds, federation
        self.allowed = allowed  # the live allowed_devices (re-read by the coordinator)
        self._lock = threading.Lock()
        self._doc: bytes | None = None
        self._at = float("-inf")
        self.max_age_s = STATUS_MAX_AGE_S

    def __call__(self) -> Response:
        with self._lock:
            now = time.monotonic()
            if self._doc is None or now - self._at >= self.max_age_s:
                doc = read_status(self.state_dir, rounds=self.rounds, federation=self.federation,
                                  allowed=None if self.allowed is None else list(self.allowed()))
                self._doc, self._at = _json(doc)[2], now
                cost = time.monotonic() - now
                self.max_age_s = max(STATUS_MAX_AGE_S, cost / STATUS_COST_SHARE)
            return 200, "application/json", self._doc


def recent_refusals(state_dir: Path, limit: int = REFUSALS_SHOWN) -> dict[str, Any]:
    """The newest ``limit`` refusal, failure and decline rows (newest first), each with its
    reason class as ``/metrics`` labels it."""
    from coordinator.metrics import reason_class

    path = Path(state_dir) / DB_NAME
    if not path.is_file():
        raise ConfigError(f"no {DB_NAME} in {state_dir}")
    db = _connect(path)
    try:
        rows = db.execute("SELECT round, device, kind, reason, ts, count FROM events "
                          "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    finally:
        db.close()
    return {"refusals": [{"round": r["round"], "device": r["device"], "kind": r["kind"],
                          "reason_class": reason_class(str(r["reason"])),
                          "reason": str(r["reason"])[:300], "count": r["count"],
                          "time": iso(r["ts"])} for r in rows]}


def dashboard_routes(state_dir: Path, rounds: int | None, federation: str | None,
                     allowed: Callable[[], list[str]] | None = None) -> dict[str, Route]:
    """Path -> answer of the dashboard server."""
    def static(name: str) -> Route:
        data = asset(name)  # read once: the files ship with the package and do not change
        ctype = CONTENT_TYPES[Path(name).suffix]
        return lambda: (200, ctype, data)

    routes: dict[str, Route] = {path: static(name) for path, name in ASSETS.items()}
    routes["/api/status"] = _StatusCache(state_dir, rounds, federation, allowed)
    routes["/api/refusals"] = lambda: _json(recent_refusals(state_dir))
    return routes


def metrics_routes(state_dir: Path, rounds: int | None, federation: str) -> dict[str, Route]:
    """Path -> answer of the metrics server (``/metrics`` only)."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    except ModuleNotFoundError:
        raise ConfigError("[metrics] port is set but prometheus_client is not installed "
                          "(pip install 'fedcoe-edge[train]', or pip install prometheus-client)"
                          ) from None
    from coordinator.metrics import registry_for

    registry = registry_for(state_dir, federation, rounds)
    lock = threading.Lock()

    def scrape() -> Response:
        with lock:  # one scrape at a time: each reads the store's tail once
            return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
    return {"/metrics": scrape}


def _bind(key: str, host: str, port: int, routes: dict[str, Route]) -> _Server:
    """A server listening on (host, port), or ConfigError: one line naming the port and
    the config key (the caller exits 2 before joining the broker)."""
    try:
        return _Server((host, port), routes)
    except OSError as exc:
        why = {errno.EADDRINUSE: "is in use by another process",
               errno.EACCES: "needs privileges (ports below 1024)",
               errno.EADDRNOTAVAIL: "is not an address of this machine"}.get(
                   exc.errno or 0, f"cannot be bound ({exc.strerror or exc})")
        if isinstance(exc, socket.gaierror):
            why = f"host does not resolve ({exc.strerror or exc})"
        raise ConfigError(f"[{key}] port {port} on {host} {why}: set another [{key}] port "
                          f"(FEDCOE_{key.upper()}_PORT) or 0 to turn it off") from None


class HttpEndpoints:
    """The metrics and dashboard servers of one coordinator: bound in ``__init__`` (so a
    busy port fails before anything else starts), served from daemon threads by
    :meth:`start`, closed by :meth:`stop`."""

    def __init__(self, cfg: CoordinatorConfig, state_dir: Path | None = None) -> None:
        state = Path(state_dir) if state_dir is not None else cfg.state_dir
        fed = cfg.federation
        self.servers: dict[str, _Server] = {}
        self._threads: list[threading.Thread] = []
        try:
            if cfg.metrics.port:
                self.servers["metrics"] = _bind("metrics", cfg.metrics.host, cfg.metrics.port,
                                                metrics_routes(state, fed.rounds, fed.id))
            if cfg.dashboard.port:
                self.servers["dashboard"] = _bind(
                    "dashboard", cfg.dashboard.host, cfg.dashboard.port,
                    dashboard_routes(state, fed.rounds, fed.id,
                                     lambda: fed.allowed_devices))
        except FedCoEError:
            self.stop()
            raise

    def url(self, key: str) -> str:
        host, port = self.servers[key].server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/" + ("metrics" if key == "metrics" else "")

    def start(self) -> None:
        for key, srv in self.servers.items():
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.5},
                                 name=f"http-{key}", daemon=True)
            t.start()
            self._threads.append(t)
            host = str(srv.server_address[0])
            if host in ("127.0.0.1", "::1", "localhost") or host.startswith("127."):
                log.info("%s on %s", key, self.url(key))
            else:
                log.warning("%s on %s: reachable from other machines, with no login "
                            "(docs/daemons.md, \"Metrics and dashboard\")", key, self.url(key))

    def stop(self) -> None:
        for srv in self.servers.values():
            if self._threads:
                srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self.servers, self._threads = {}, []
