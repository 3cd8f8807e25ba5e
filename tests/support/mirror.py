"""A Fashion-MNIST mirror on 127.0.0.1 for the download tests (no network), and a process that sees
no dataset but the one it downloads from there."""
from __future__ import annotations

import http.server
import threading
from pathlib import Path


class Server:
    """``files`` (URL path -> bytes) served over HTTP on 127.0.0.1; ``short`` paths send half their
    body, then the connection drops."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.short: set[str] = set()
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in outer.short else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fm/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, files: dict[str, bytes]) -> None:
        self.files = {f"/fm/{k}.gz": v for k, v in files.items()}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def isolate(monkeypatch, tmp_path: Path, url: str) -> Path:
    """Lookups see an empty HOME and cache, no HETERO_DATA, no system dataset; downloads go to ``url``."""
    from hetero.data import fashion_mnist as fm

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "home" / ".cache" / "hetero"))
    monkeypatch.delenv("HETERO_DATA", raising=False)
    monkeypatch.setenv(fm.URL_ENV, url)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system")
    return tmp_path / "home"
