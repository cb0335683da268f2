"""The server's HTTP connections: limits against slow and greedy clients, on uvicorn's protocol.

- a request's head (request line and headers) must arrive within `header_timeout` seconds (408)
  and stay within `max_header_bytes` (431); uvicorn has neither for its httptools parser (its
  h11 parser has a size limit, `h11_max_incomplete_event_size`, answered with 400);
- at most `max_connections` connections are open, below the process's file limit: a connection
  past the cap closes the oldest one that has no request running (a half-sent head, an idle
  keep-alive), so a new client such as a health check is always served; when every connection
  has a request running the newcomer gets 503. (uvicorn's `limit_concurrency` answers 503 to
  every request past its limit, health checks included, and does not close a connection.)
- a request uvicorn cannot parse is answered with OpenAI's JSON error instead of plain text.
"""

from __future__ import annotations

import json
import os
import time

from .protocol import error_body

RESERVED_FILES = 32  # descriptors kept free beyond the open connections: model files, logs, the store


def connection_cap(wanted: int, other_files: int = 0) -> int:
    """The connections to allow: `wanted` (0: as many as fit), below the file limit less the files
    open now, `other_files` more (a database pool) and a reserve."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError):
        return wanted or 1000
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    fits = soft - open_now - other_files - RESERVED_FILES if soft != getattr(resource, "RLIM_INFINITY", -1) else 10**6
    return max(1, min(wanted, fits) if wanted else fits)


def _answer(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason.encode(), len(body)) + body)


def http_protocol(max_header_bytes: int = 16384, header_timeout: float = 10.0, max_connections: int = 1000):
    """uvicorn's HTTP protocol class with the limits above."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # h11 only: uvicorn's own header size limit (Config.h11_max_incomplete_event_size)
        HttpToolsProtocol = None
    heads = HttpToolsProtocol is not None and issubclass(AutoHTTPProtocol, HttpToolsProtocol)

    class Protocol(AutoHTTPProtocol):
        _head: int | None = 0  # bytes of the request head read so far; None once it is complete
        _tail = b""  # the last bytes read, for a head end split across reads
        _timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._opened = time.monotonic()
            if heads:
                self._timer = self.loop.call_later(header_timeout, self._too_slow)
            if len(self.connections) > max_connections:
                self._make_room()

        def connection_lost(self, exc):
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _make_room(self):
            live = [c for c in self.connections if not c.transport.is_closing()]  # closed ones leave soon
            if len(live) <= max_connections:
                return
            idle = [c for c in live if c is not self and getattr(c, "_idle", lambda: False)()]
            if idle:
                oldest = min(idle, key=lambda c: c._opened)
                oldest._close(503, "Service Unavailable", "too many open connections; this idle one was closed",
                              "too_many_connections")
            else:
                self._close(503, "Service Unavailable", f"the server has {max_connections} connections open, each "
                            "with a request running; retry shortly", "too_many_connections")

        def _close(self, status: int, reason: str, message: str, code: str):
            if not self.transport.is_closing():
                self.transport.write(_answer(status, reason, message, code))
                self.transport.close()

        def _too_slow(self):
            if self._head is not None:
                self._close(408, "Request Timeout", f"the request headers did not arrive within {header_timeout:g} s",
                            "header_timeout")

        def data_received(self, data: bytes):
            if heads and self._head is not None and not self._head_fits(data):
                self._close(431, "Request Header Fields Too Large",
                            f"the request headers are over the limit of {max_header_bytes} bytes", "headers_too_large")
                return
            super().data_received(data)

        def _head_fits(self, data: bytes) -> bool:
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            if end >= 0:  # the head ends here; the parser takes it from now (on_headers_complete)
                return self._head + end + 4 - len(self._tail) <= max_header_bytes
            self._head += len(data)
            self._tail = seen[-3:]
            return self._head <= max_header_bytes

        def on_message_begin(self):
            super().on_message_begin()
            if self._timer is None:
                self._timer = self.loop.call_later(header_timeout, self._too_slow)

        def on_headers_complete(self):
            self._head, self._tail = None, b""
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().on_headers_complete()

        def on_message_complete(self):
            super().on_message_complete()
            self._head = 0  # the next request's head, on a kept-alive connection

        def send_400_response(self, msg: str):
            self._close(400, "Bad Request", f"malformed HTTP request: {msg}", "invalid_http")

    return Protocol
