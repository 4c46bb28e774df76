"""A small HTTP proxy in front of the test S3 server that injects failures and delays.

Not a test module. Every request is forwarded to the real server unless the fault plan
says otherwise: ``fail_every=n`` answers every n-th request with the next status of
``statuses`` (503 SlowDown, 429, 500 ... with S3's XML error body) without forwarding it,
so the client must retry; ``lose_answer_of`` forwards a PUT and then answers it with a
failure anyway (the write happened, the answer was lost); ``delay_s`` holds each request
that long first (a slow link, so that a process can be killed in the middle of an
upload). It listens on 127.0.0.1 only and stops with its context.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_REASONS = {
    403: ("AccessDenied", "Access Denied"),
    429: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}
# Headers that describe one hop, not the message: never relayed.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class FaultPlan:
    fail_every: int = 0
    statuses: tuple[int, ...] = (503,)
    delay_s: float = 0.0
    # PUTs whose path ends with this are forwarded, and then answered with
    # ``lost_status`` instead of the server's answer: a request that reached the store
    # although its answer never came back.
    lose_answer_of: str | None = None
    lost_status: int = 403
    # What happened, for the test to look at.
    requests: int = 0
    injected: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _cycle: Iterator[int] | None = None

    def decide(self) -> int | None:
        """The status to answer instead of forwarding, or None to forward."""
        with self.lock:
            self.requests += 1
            if not self.fail_every or self.requests % self.fail_every:
                return None
            if self._cycle is None:
                self._cycle = itertools.cycle(self.statuses)
            status = next(self._cycle)
            self.injected.append(status)
            return status


def _handler(upstream: str, plan: FaultPlan) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if plan.delay_s:
                time.sleep(plan.delay_s)
            status = plan.decide()
            if status is not None:
                self._fail(status)
                return
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                lost = plan.lose_answer_of
                if self.command == "PUT" and lost and self.path.split("?")[0].endswith(lost):
                    with plan.lock:
                        plan.injected.append(plan.lost_status)
                    self._fail(plan.lost_status)
                    return
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP:
                        self.send_header(name, value)
                # A HEAD's answer has no body but the length of the object.
                length = response.getheader("Content-Length") or "0"
                self.send_header(
                    "Content-Length", length if self.command == "HEAD" else str(len(data))
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                connection.close()

        def _fail(self, status: int) -> None:
            code, message = _REASONS.get(status, ("InternalError", "injected"))
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client killed mid-request (the crash test's point) is no proxy failure


@contextlib.contextmanager
def fault_proxy(upstream: str, plan: FaultPlan) -> Iterator[str]:
    """A proxy to ``upstream`` on a free port of 127.0.0.1; its URL until the end."""
    server = _Server(("127.0.0.1", 0), _handler(upstream, plan))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
