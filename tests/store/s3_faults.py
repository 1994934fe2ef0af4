"""A fault-injecting HTTP proxy in front of the loopback S3 server: it answers the next requests
with a chosen S3 error (throttling, 5xx, bad credentials) and forwards the rest unchanged, so the
store's retry policy is tested against real HTTP responses parsed by the real SDK."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_BODY = ("<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message>"
              "<Resource>{path}</Resource><RequestId>fault</RequestId></Error>")


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream_host, port = upstream.split(":")
        self.upstream_port = int(port)
        self.faults: list[tuple[int, str]] = []  # (status, S3 error code) for the next requests
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                proxy.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.faults:
                    status, code = proxy.faults.pop(0)
                    payload = ERROR_BODY.format(code=code, path=self.path).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
