"""The master's status page and metrics over HTTP: ``http.server`` in a thread.

Served (GET and HEAD only):

* ``/`` and the static files in ``web/`` (HTML, CSS, JavaScript; nothing is
  fetched from elsewhere): the page, which refreshes itself from
* ``/api/status``: health, masters, nodes, repair, damaged files, recent
  events (JSON, docs/JSON.md);
* ``/api/files?prefix=P``: the file browser, one directory level under P
  with sizes and versions;
* ``/metrics``: Prometheus text format (metrics.py, docs/METRICS.md).

The page shows names and sizes, never file contents: nothing here reads
from a node.

Access follows the cluster's protected mode.  On loopback the page is open
(and requests must name a loopback host in ``Host:``, so a web page in the
operator's browser cannot reach it through DNS rebinding).  Beyond
loopback it is served only with a token: ``[http] token``, or one derived
from the shared secret (``http_token``; ``client.py http-token`` prints
it), sent as ``Authorization: Bearer TOKEN``; the static files carry no
data and are served to anyone, so the page can ask for the token.  Without
a secret or a token, a non-loopback address is refused unless
``--insecure``.  ``[http] token`` also protects a loopback page.

A request handler never takes a master lock for long: it reads the
monitor's facts (built from Master.status and the lock-free namespace).
"""

from __future__ import annotations

import hmac
import hashlib
import http.server
import ipaddress
import json
import logging
import os
import sys
import threading
import urllib.parse

import health
import history
import metrics
import monitor as monitor_module
import security as security_module
import transport
import views

logger = logging.getLogger("master.http")

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
STATIC_FILES = {  # URL path -> (file in web/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Entries per /api/files answer: a directory of a million files must not
# make one answer of a hundred megabytes.
MAX_BROWSE_ENTRIES = 1000
# Damaged files and detail lines listed by /api/status.
MAX_DAMAGED_LISTED = 100
# Connections served at once, and how long one may sit idle: a page, a
# scraper and a few curls need a handful; a flood must not cost the master
# a thread per connection.
MAX_HTTP_CONNECTIONS = 32
HTTP_IDLE_TIMEOUT_S = 30.0
# The page's scripts and styles come from us only; no frames, no plugins.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_TOKEN_LABEL = b"backup status page token v1"


def http_token(secret: bytes) -> str:
    """The page's token derived from the cluster's shared secret (HMAC-SHA256, hex).

    One-way: the token opens the status page only, and reveals nothing of
    the secret, which is what lets a cluster's storage nodes and clients in.
    """
    return hmac.new(secret, _TOKEN_LABEL, hashlib.sha256).hexdigest()


def page_token(config, security, host: str, insecure: bool) -> str | None:
    """The token the page at ``host`` requires, or None for an open page.

    Raises ValueError (a configuration error) for a non-loopback ``host``
    with neither ``[http] token`` nor a shared secret, unless ``insecure``.
    """
    if config.http_token:
        return config.http_token
    if security_module.is_loopback(host):
        return None
    if security.secret:
        return http_token(security.secret)
    if insecure:
        logger.warning("status page on %s is open to anyone who can reach it (--insecure, no token)", host)
        return None
    raise ValueError(f"refusing to serve the status page on {host or '*'} without a token: it lists every "
                     f"file name. Set [http] token, or a shared secret (the token is then derived from it: "
                     f"`client.py http-token`), or keep [http] host on loopback")


class StatusServer(transport.ConnectionSlots, http.server.ThreadingHTTPServer):
    """One thread per request; ``monitor`` supplies every answer."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, monitor: monitor_module.Monitor, token: str | None, master_address: str,
                 web_dir: str = WEB_DIR):
        self.monitor = monitor
        self.token = token
        self.master_address = master_address
        self.web_dir = web_dir
        self.loopback = security_module.is_loopback(address[0])
        self.connection_slots = threading.BoundedSemaphore(MAX_HTTP_CONNECTIONS)
        super().__init__(address, StatusHandler)

    def _refuse_connection(self, request, client_address) -> None:
        logger.debug("status page: %s refused, %d connections open", client_address[0], MAX_HTTP_CONNECTIONS)
        self.shutdown_request(request)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a browser tab closed: routine
            logger.debug("status page: %s went away", client_address[0])
            return
        logger.exception("status page: unhandled error serving %s", client_address[0])

    def start(self) -> None:
        # A short poll so stop() (shutdown waits for one poll) is quick.
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="http", daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class StatusHandler(http.server.BaseHTTPRequestHandler):
    server: StatusServer
    server_version = "backup-master"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = HTTP_IDLE_TIMEOUT_S  # an idle keep-alive connection is closed after this

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        logger.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head: bool = False):
        url = urllib.parse.urlsplit(self.path)
        if not self._host_allowed():
            return self._send_text(403, "forbidden: not a loopback host name\n", head)
        if url.path in STATIC_FILES:
            return self._send_static(*STATIC_FILES[url.path], head=head)
        if not self._authorized():
            return self._send_json(401, {"error": "AUTH_FAILED", "message": "a token is required"}, head,
                                   {"WWW-Authenticate": 'Bearer realm="backup status"'})
        query = urllib.parse.parse_qs(url.query)
        monitor = self.server.monitor
        if url.path == "/api/status":
            return self._send_json(200, status_document(monitor, self.server.master_address), head)
        if url.path == "/api/files":
            prefix = query.get("prefix", [""])[0]
            return self._send_json(200, browse(monitor.master.namespace, prefix), head)
        if url.path == "/metrics":
            body = metrics.render(monitor.facts(), monitor.stats.snapshot(), monitor.started)
            return self._send(200, body.encode("utf-8"), metrics.CONTENT_TYPE, head)
        return self._send_text(404, "not found\n", head)

    # --- access ---------------------------------------------------------------------------------
    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def _host_allowed(self) -> bool:
        """On an open loopback page, only loopback Host names (no DNS rebinding)."""
        if not self.server.loopback or self.server.token is not None:
            return True
        host = urllib.parse.urlsplit("//" + self.headers.get("Host", "")).hostname or ""
        return host == "localhost" or host.endswith(".localhost") or _is_loopback_literal(host)

    # --- replies --------------------------------------------------------------------------------
    def _send_static(self, filename: str, content_type: str, head: bool) -> None:
        try:
            with open(os.path.join(self.server.web_dir, filename), "rb") as f:
                body = f.read()
        except OSError:
            return self._send_text(404, "not found\n", head)
        self._send(200, body, content_type, head, {"Cache-Control": "no-cache"})

    def _send_json(self, code: int, document: dict, head: bool, headers: dict | None = None) -> None:
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self._send(code, body, "application/json; charset=utf-8", head,
                   {"Cache-Control": "no-store", **(headers or {})})

    def _send_text(self, code: int, text: str, head: bool) -> None:
        self._send(code, text.encode("utf-8"), "text/plain; charset=utf-8", head)

    def _send(self, code: int, body: bytes, content_type: str, head: bool, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _is_loopback_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- documents ---------------------------------------------------------------------------------
def status_document(monitor: monitor_module.Monitor, master_address: str) -> dict:
    """/api/status: see docs/JSON.md."""
    facts = monitor.facts()
    now = facts["time"]
    census: health.Census = facts["census"]
    nodes = [views.node_document(n, n["state"], now) for n in facts["nodes"]]
    repair = dict(facts["repair"])
    repair["degraded_chunks"] = census.degraded_chunks
    repair["degraded_bytes"] = census.degraded_bytes
    done, remaining = repair["episode_repaired_chunks"], census.degraded_chunks
    repair["progress"] = done / (done + remaining) if remaining else 1.0
    repair["summary"] = health.repair_progress_text(facts) if remaining else "every chunk has all its copies"
    damaged = ([{"name": name, "reason": "lost"} for name in census.lost_files] +
               [{"name": name, "reason": "unavailable"} for name in census.unavailable_files])[:MAX_DAMAGED_LISTED]
    chunks_by_copies = {str(k): v for k, v in sorted(census.copies.items())}
    events = [{**e, "time_iso": views.iso_time(e["time"])} for e in monitor.events.recent()]
    events.reverse()  # newest first
    return views.status_document(facts["health"], nodes, facts["totals"], now, {
        "masters": monitor_module.master_views(monitor.master, monitor, master_address),
        "refused": facts["refused"],
        "repair": repair,
        "chunks_by_copies": chunks_by_copies,
        "damaged_files": damaged,
        "damaged_file_count": census.lost_file_count + census.unavailable_file_count,
        "events": events,
    })


def browse(namespace, prefix: str) -> dict:
    """/api/files: the directories and files one level below ``prefix`` (names split at '/').

    A directory entry sums the files below it.  Sorted by name; at most
    MAX_BROWSE_ENTRIES entries (``truncated`` says when more exist).
    """
    dirs: dict[str, dict] = {}
    files = []
    older = namespace.versions
    for name, entry in namespace.listing(prefix):
        rest = name[len(prefix):]
        head, slash, _ = rest.partition("/")
        if slash:
            d = dirs.setdefault(head, {"name": prefix + head + "/", "files": 0, "size": 0, "mtime": 0.0})
            d["files"] += 1
            d["size"] += entry["size"]
            d["mtime"] = max(d["mtime"], entry["mtime"])
        else:
            files.append({"name": name, "size": entry["size"], "chunks": entry["chunks"],
                          "version": entry["version"], "version_id": history.version_id(entry),
                          "versions": 1 + len(older.get(name, ())), **views.stamped("mtime", entry["mtime"])})
    directories = [{**d, **views.stamped("mtime", d["mtime"])} for _, d in sorted(dirs.items())]
    entries = len(directories) + len(files)
    return {"prefix": prefix, "directories": directories[:MAX_BROWSE_ENTRIES],
            "files": files[:max(0, MAX_BROWSE_ENTRIES - len(directories))],
            "truncated": entries > MAX_BROWSE_ENTRIES}


def start(monitor: monitor_module.Monitor, host: str, port: int, token: str | None,
          master_address: str) -> StatusServer:
    """Bind (port -1 = any free port) and serve in a daemon thread; raises OSError if it cannot bind."""
    server = StatusServer((host, max(port, 0)), monitor, token, master_address)
    server.start()
    return server
