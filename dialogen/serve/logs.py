"""Request ids and logs: every request gets an id (the client's `x-request-id` when it sends a
sane one), returned in the `x-request-id` header and carried by every log record made while
the request runs, in its job thread too; an access line per request; text or JSON lines."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_log = logging.getLogger("dialogen.access")
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id(scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if _SANE.fullmatch(given):
                return given
    return "req_" + secrets.token_hex(8)


class Observe:
    """ASGI middleware around the whole app (inside it, the 500 handler): the request id, the
    access line, the request counts of `metrics`."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope)
        token = REQUEST_ID.set(rid)
        status, t0 = 500, time.perf_counter()  # 500 unless a response starts

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # a template: bounded labels
            self.metrics.request(scope["method"], route, status)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                access_log.info("%s %s %s %d %.1f ms", client[0], scope["method"], scope["path"], status,
                                (time.perf_counter() - t0) * 1000,
                                extra={"http": {"client": client[0], "method": scope["method"], "path": scope["path"],
                                                "status": status, "ms": round((time.perf_counter() - t0) * 1000, 1)}})
            REQUEST_ID.reset(token)


class _WithRequestId(logging.Filter):
    def filter(self, record):
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, request_id, message (and http, exception)."""

    def format(self, record):
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname.lower(), "logger": record.name,
               "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        if hasattr(record, "http"):
            out["http"] = record.http
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str, fmt: str = "text"):
    """The process's logging: one stderr handler on the root logger (uvicorn's loggers included)."""
    handler = logging.StreamHandler()
    handler.addFilter(_WithRequestId())
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
