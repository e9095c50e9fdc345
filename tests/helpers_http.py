"""A loopback HTTP server for tests: serves a folder on 127.0.0.1 on a free port, in a thread, with some
URLs broken on purpose.

    with serve_folder(tmp_path / "www") as srv:
        srv.url("cat.jpg")            # served from the folder
        srv.broken("404")             # HTTP 404
        srv.broken("500")             # HTTP 500
        srv.broken("notimage")        # 200, image/jpeg header, HTML bytes
        srv.broken("truncated")       # 200, first third of a real JPEG
        srv.broken("reset")           # headers then the connection dropped mid-body
        srv.broken("slow", 3)         # answers after 3 s (for timeout tests)
        refused_url()                 # a port nothing listens on: connection refused
    srv.requests                      # Counter of request paths seen

Usable from any test module (`from helpers_http import serve_folder, refused_url`); tests/ is on
sys.path under pytest's default rootdir-relative import mode.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from PIL import Image


def _jpeg_bytes(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class _Handler(http.server.SimpleHTTPRequestHandler):
    server_version = "simvlg-test/1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.requests[self.path] += 1
        if self.path.startswith("/broken/"):
            kind, _, arg = self.path[len("/broken/") :].partition("/")
            kind = kind.split(".")[0]
            if kind in ("404", "500", "403"):
                self.send_error(int(kind))
                return
            if kind == "empty":  # 200 with a zero-byte body
                return self._send(b"", "image/jpeg")
            if kind == "notimage":
                return self._send(b"<html><body>not an image</body></html>" * 20, "image/jpeg")
            if kind == "truncated":
                data = srv.truncated_source
                return self._send(data[: len(data) // 3], "image/jpeg")
            if kind == "reset":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"\xff\xd8\xff" + b"\0" * 100)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if kind == "slow":
                time.sleep(float(arg.split(".")[0] or 3))
                return self._send(srv.truncated_source, "image/jpeg")
            self.send_error(404)
            return
        super().do_GET()

    def _send(self, data: bytes, ctype: str):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LoopbackServer:
    def __init__(self, httpd: http.server.ThreadingHTTPServer):
        self.httpd = httpd
        self.port = httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> Counter:
        return self.httpd.requests

    def url(self, relpath: str) -> str:
        return f"{self.base}/{relpath.lstrip('/')}"

    def broken(self, kind: str, arg=None) -> str:
        suffix = f"/{arg}" if arg is not None else ""
        return f"{self.base}/broken/{kind}{suffix}.jpg"


@contextlib.contextmanager
def serve_folder(folder: str | Path, truncated_source: bytes | None = None):
    """Serve `folder` on 127.0.0.1:<free port> until the with-block ends."""
    folder = str(folder)

    class Handler(_Handler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=folder, **kw)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.requests = Counter()
    httpd.truncated_source = truncated_source or _jpeg_bytes((400, 300))
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        yield LoopbackServer(httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused_url(path: str = "img.jpg") -> str:
    """A URL on a loopback port with nothing listening (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/{path}"
