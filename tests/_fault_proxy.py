"""A small real HTTP fault proxy for S3 tests: it sits in front of the local S3 server (moto) on 127.0.0.1 and,
for a window of time, answers 503 SlowDown or drops connections (mid-body for reads), like a throttling or
flaky object store. Outside a window every request is forwarded unchanged.

    with FaultProxy(moto_endpoint) as proxy:      # proxy.endpoint -> AWS_ENDPOINT_URL
        proxy.fault("slowdown", seconds=4)        # or "reset"; proxy.counts says how many requests it hit
        proxy.arm("reset", 3, "PUT", "/checkpoint_")  # the window opens at the first checkpoint upload
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
)
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port
        self.mode = "pass"
        self.until = 0.0
        self.counts: Counter[str] = Counter()  # "slowdown", "reset", "pass" -> requests
        self.methods: Counter[tuple[str, str]] = Counter()  # (fault, HTTP method) -> requests
        self._lock = threading.Lock()
        self._armed: list[tuple[str, float, str, str]] = []  # (mode, seconds, method, path part)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self._read_body()
                fault = proxy.current_fault(self.command, self.path)
                with proxy._lock:
                    proxy.counts[fault] += 1
                    proxy.methods[fault, self.command] += 1
                if fault == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN_BODY)
                    return
                status, headers, payload = proxy.forward(self.command, self.path, self.headers, body)
                if fault == "reset" and (self.command != "GET" or len(payload) < 2):
                    return self._reset()
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_HEADERS:
                        self.send_header(name, value)
                upstream_length = next((v for k, v in headers if k.lower() == "content-length"), "0")
                self.send_header("Content-Length", upstream_length if self.command == "HEAD" else str(len(payload)))
                self.end_headers()
                if fault == "reset":  # a read dropped halfway through the body
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    return self._reset()
                self.wfile.write(payload)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                # SO_LINGER 0: close sends a TCP RST, the client sees "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fault(self, mode: str, seconds: float) -> None:
        """Answer every request with `mode` ("slowdown" or "reset") for the next `seconds`."""
        if mode not in ("slowdown", "reset"):
            raise ValueError(f"fault mode must be 'slowdown' or 'reset', got {mode!r}")
        self.mode, self.until = mode, time.monotonic() + seconds

    def arm(self, mode: str, seconds: float, method: str, path_contains: str) -> None:
        """Start a `fault(mode, seconds)` window at the first `method` request whose path contains
        `path_contains` (that request is the window's first victim): an outage that begins while shards are read,
        or while a checkpoint is written, whenever that happens."""
        if mode not in ("slowdown", "reset"):
            raise ValueError(f"fault mode must be 'slowdown' or 'reset', got {mode!r}")
        with self._lock:
            self._armed.append((mode, seconds, method, path_contains))

    def current_fault(self, method: str = "", path: str = "") -> str:
        with self._lock:
            for trigger in self._armed:
                mode, seconds, want_method, part = trigger
                if method == want_method and part in path:
                    self._armed.remove(trigger)
                    self.mode, self.until = mode, time.monotonic() + seconds
                    break
        return self.mode if time.monotonic() < self.until else "pass"

    def forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
