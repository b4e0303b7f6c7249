"""A small mediarithmics gateway stand-in on 127.0.0.1: Basic auth checked, envelopes as the platform sends them."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FIXTURES = json.loads((Path(__file__).parent.parent / "fixtures" / "gateway.json").read_text())


class GatewayStandIn:
    def __init__(self, worker_id: str = "Calavera", token: str = "Manny"):
        self.expected = "Basic " + base64.b64encode(f"{worker_id}:{token}".encode()).decode()
        self.calls: list[tuple[str, str]] = []
        self.fail_next: dict[str, int] = {}  # path -> number of 500 answers to give
        self.delay = 0.0
        self.routes = dict(FIXTURES)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                outer.calls.append(("GET", self.path))
                if self.headers.get("authorization") != outer.expected:
                    self._send(401, {"status": "error", "error": "unauthorized"})
                    return
                if outer.delay:
                    time.sleep(outer.delay)
                if outer.fail_next.get(self.path, 0) > 0:
                    outer.fail_next[self.path] -= 1
                    self._send(500, {"status": "error"})
                    return
                body = outer.routes.get(f"GET {self.path}")
                if body is None:
                    self._send(404, {"status": "error", "error": "not found"})
                else:
                    self._send(200, body)

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, path: str) -> int:
        return sum(1 for _, p in self.calls if p == path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
