"""A local HTTP server for remote-raster tests: serves a folder, honours ``Range:``, counts what it sends.

:class:`RangeServer` runs ``http.server`` in a thread on 127.0.0.1 (a free port, or a given one so a
restarted server answers the same URLs). A ``Range: bytes=a-b`` request gets ``206 Partial Content``
with just those bytes; ``HEAD`` gets the size, an ``ETag`` and ``Last-Modified``. ``bytes_sent`` and
``requests`` count the body bytes and requests served; ``die_after`` stops serving (the connection is
closed with no answer) after that many ranged ``GET`` requests, as a server that dies mid-build does;
``busy`` answers ``503`` to the ranged ``GET`` requests of those numbers (1-based), as a server under load.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeServer:
    """Serve ``root`` over HTTP with byte ranges; use as a context manager (``with RangeServer(dir) as s``)."""

    def __init__(self, root: Path, port: int = 0, *, die_after: int | None = None,
                 busy: frozenset[int] = frozenset()) -> None:
        self.root = root
        self.bytes_sent = 0
        self.requests: list[str] = []  # "GET /x.tif bytes=0-16383", "HEAD /x.tif"...
        self.die_after = die_after
        self.busy = busy
        self._ranged = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = server.root / self.path.split("?", 1)[0].lstrip("/")
                rng = self.headers.get("Range")
                with server._lock:
                    server.requests.append(f"{self.command} {self.path} {rng or ''}".strip())
                    if body and rng:
                        server._ranged += 1
                        if server.die_after is not None and server._ranged > server.die_after:
                            self.close_connection = True
                            return  # no answer: the client sees the connection closed
                        if server._ranged in server.busy:
                            self.send_error(503)
                            return
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start, end, status = 0, len(data) - 1, 200
                m = _RANGE.match(rng or "")
                if m:
                    start = int(m.group(1))
                    end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                    status = 206
                part = data[start : end + 1]
                self.send_response(status)
                self.send_header("Content-Type", "image/tiff")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
                self.send_header("Last-Modified", email.utils.formatdate(path.stat().st_mtime, usegmt=True))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(len(part) if body or status == 206 else len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(part)
                    with server._lock:
                        server.bytes_sent += len(part)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        """The URL of ``root/name``."""
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
