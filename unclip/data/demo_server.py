"""The demo's local image host: a static file server on 127.0.0.1 plus a few misbehaving routes.

``unclip.data.demo_source`` writes the demo's images and bodies under a folder; this server serves them
to the real img2dataset download path, so the ingest stage meets the failures of the web (dead links,
server errors, opt-out headers, redirects to forbidden addresses, slow and endless bodies) without an
internet. A route is chosen by the URL's first path segment:

- ``/<path>``: the file ``root/<path>``, Content-Type from its suffix (a missing file: 404);
- ``/status/<code>/<anything>``: answers ``<code>`` with a short text body;
- ``/redirect/<anything>?to=<url>``: 302 with ``Location: <url>``;
- ``/optout/<path>``: the file ``root/<path>`` with ``X-Robots-Tag: noai``;
- ``/slow/<anything>?interval=S&seconds=T``: Content-Length T/S, then one byte every S seconds;
- ``/big/<anything>?bytes=N``: N bytes chunked (HTTP/1.1) without Content-Length, from one 64 KiB
  buffer, until done or the client hangs up.

Every request is counted per path and per route (``hits``, ``route_hits``), so tests can check that an
incremental re-run fetched only the new files. The handler stays lean (HTTP/1.0, one ``sendall`` per
small file, no per-request logging) because img2dataset opens dozens of connections at once and a
benchmark drives it at thousands of requests per second.

Standalone: ``python -m unclip.data.demo_server --root DIR --port N``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import posixpath
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
    ".gif": "image/gif", ".html": "text/html; charset=utf-8", ".txt": "text/plain; charset=utf-8",
    ".json": "application/json", ".parquet": "application/octet-stream",
}
_CHUNK = bytes(64 * 1024)
_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)
_REASONS = {200: "OK", 302: "Found", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            410: "Gone", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable"}


class PortInUseError(OSError):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "unclip-demo"
    sys_version = ""
    timeout = 60  # a client that stalls mid-request frees its thread after this
    server: "_Server"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: no line per request
        pass

    def _send(self, code: int, headers: list[tuple[str, str]], body: bytes = b"", head_only: bool = False) -> None:
        lines = [f"HTTP/1.0 {code} {_REASONS.get(code, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(data if head_only else data + body)

    def do_HEAD(self) -> None:
        self._dispatch(head_only=True)

    def do_GET(self) -> None:
        self._dispatch(head_only=False)

    def _dispatch(self, head_only: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        first = path.lstrip("/").split("/", 1)[0]
        route = first if first in ("status", "redirect", "optout", "slow", "big") else "static"
        self.server.count(route, path)
        try:
            if route == "static":
                self._static(path, [], head_only)
            elif route == "optout":
                self._static(path[len("/optout"):], [("X-Robots-Tag", "noai")], head_only)
            elif route == "status":
                seg = path.split("/")
                code = seg[2] if len(seg) > 2 else ""
                code = int(code) if code.isdigit() and 100 <= int(code) <= 599 else 400
                self._send(code, [("Content-Type", "text/plain; charset=utf-8")],
                           f"{code} {_REASONS.get(code, 'Status')}\n".encode(), head_only)
            elif route == "redirect":
                to = parse_qs(parts.query).get("to", [None])[0]
                if not to:
                    self._send(400, [("Content-Type", "text/plain")], b"redirect needs ?to=<url>\n", head_only)
                else:
                    self._send(302, [("Location", to), ("Content-Type", "text/plain")], b"", head_only)
            elif route == "slow":
                q = parse_qs(parts.query)
                self._slow(float(q.get("interval", ["0.5"])[0]), float(q.get("seconds", ["30"])[0]), head_only)
            else:
                self._big(int(parse_qs(parts.query).get("bytes", [str(64 * 2**20)])[0]), head_only)
        except _DISCONNECTED:
            pass  # the client gave up (the point of the slow and big routes)

    def _static(self, path: str, extra: list[tuple[str, str]], head_only: bool) -> None:
        rel = posixpath.normpath(path).lstrip("/")
        if rel.startswith("..") or "\x00" in rel or rel in ("", "."):
            self._send(404, [("Content-Type", "text/plain")], b"not found\n", head_only)
            return
        try:
            with open(os.path.join(self.server.root, rel), "rb") as f:
                body = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self.server.count("missing", path)
            self._send(404, [("Content-Type", "text/plain")], b"not found\n", head_only)
            return
        ctype = CONTENT_TYPES.get(posixpath.splitext(rel)[1].lower(), "application/octet-stream")
        self._send(200, [("Content-Type", ctype), *extra], body, head_only)

    def _slow(self, interval: float, seconds: float, head_only: bool) -> None:
        n = max(1, int(seconds / interval))
        body = (_JPEG_HEAD * (n // len(_JPEG_HEAD) + 1))[:n]
        head = f"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {n}\r\n\r\n".encode()
        self.wfile.write(head)
        if head_only:
            return
        for i in range(n):
            self.wfile.write(body[i:i + 1])
            time.sleep(interval)

    def _big(self, nbytes: int, head_only: bool) -> None:
        chunked = self.request_version != "HTTP/1.0"
        proto = "HTTP/1.1" if chunked else "HTTP/1.0"
        head = f"{proto} 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else "\r\n"
        self.wfile.write(head.encode())
        if head_only:
            return
        sent, first = 0, True
        while sent < nbytes:  # one fixed 64 KiB buffer, never the whole body
            k = min(len(_CHUNK), nbytes - sent)
            data = (_JPEG_HEAD + _CHUNK[len(_JPEG_HEAD):k]) if first else _CHUNK[:k]
            first = False
            self.wfile.write(b"%x\r\n%s\r\n" % (k, data) if chunked else data)
            sent += k
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], root: str):
        self.root = root
        self._lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.route_hits: Counter[str] = Counter()
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def count(self, route: str, path: str) -> None:
        with self._lock:
            self.route_hits[route] += 1
            if route != "missing":
                self.hits[path] += 1

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _DISCONNECTED):
            return
        log.warning("demo server: error serving %s", client_address, exc_info=True)


class DemoServer:
    """Serve ``root`` on ``host:port`` from a daemon thread; ``port=0`` picks a free port.

    ``with DemoServer(root, port=p) as srv: urlopen(srv.base_url + "/img/...")``
    """

    def __init__(self, root: str, host: str = "127.0.0.1", port: int = 0):
        self.root = os.path.abspath(root)
        self.host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def hits(self) -> Counter:
        """Requests per URL path (query string left out), a snapshot."""
        if self._server is None:
            return Counter()
        with self._server._lock:
            return Counter(self._server.hits)

    @property
    def route_hits(self) -> Counter:
        """Requests per route: static, missing (a static 404), status, redirect, optout, slow, big."""
        if self._server is None:
            return Counter()
        with self._server._lock:
            return Counter(self._server.route_hits)

    def reset_hits(self) -> None:
        if self._server is not None:
            with self._server._lock:
                self._server.hits.clear()
                self._server.route_hits.clear()

    def start(self) -> "DemoServer":
        if self._server is not None:
            return self
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"demo server root {self.root} is not a directory")
        try:
            self._server = _Server((self.host, self._port), self.root)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                err = PortInUseError(
                    f"port {self._port} is in use; another demo server (or another program) holds {self.host}:"
                    f"{self._port}: stop it, or generate the demo into a new directory to get a new port")
                err.errno = errno.EADDRINUSE
                raise err from None
            raise
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"demo-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._port = self._server.server_address[1]
        self._server = None
        self._thread = None

    def __enter__(self) -> "DemoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Serve a demo image folder (unclip.data.demo_source's www/).")
    ap.add_argument("--root", required=True, help="folder to serve (a demo's out_dir/www)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    a = ap.parse_args(argv)
    try:
        srv = DemoServer(a.root, host=a.host, port=a.port).start()
    except (PortInUseError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {srv.root} at {srv.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
