"""What the routes share: reading a body, the channel from job threads to the request, submitting
jobs (all or none; 503 when the queue is full), and turning a job's failure into an API error."""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request

from ..errors import UserError
from .protocol import ApiError, parse_json_body
from .service import Service
from .jobs import Busy, ServerShutdown
from .logs import REQUEST_ID
from .store import StoreUnavailable

log = logging.getLogger("dialogen.serve")
STORE_RETRY_AFTER = 2  # seconds a client is told to wait while the session database is unreachable


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past `limit` bytes (checked while reading, not only the header)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        parts.append(part)
    return parse_json_body(b"".join(parts))


class Channel:
    """Events from job threads into this request's event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def sender(self, index: int):
        def emit(event):
            kind, payload = event
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, payload))
        return emit

    async def get(self, request: Request | None = None, poll: float = 0.5):
        """The next event; with `request`, raises ClientGone when the client left (checked every
        `poll` seconds). A streamed response needs no check: the server cancels it when the client
        goes."""
        if request is None:
            return await self.queue.get()
        while True:
            try:
                async with asyncio.timeout(poll):
                    return await self.queue.get()
            except TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone() from None


class ClientGone(Exception):
    pass


def submit_all(svc: Service, fns: list, channel: Channel) -> list:
    """Submit one job per function; all or none (503 when the queue is full or the server is
    shutting down)."""
    if svc.draining:
        raise ApiError(503, "the server is shutting down; send the request again (to another replica)",
                       code="server_shutdown", type="server_error", headers={"Retry-After": "1"})
    jobs, rid = [], REQUEST_ID.get()
    try:
        for i, fn in enumerate(fns):
            jobs.append(svc.worker.submit(_with_request_id(fn, rid), svc.metrics.emitter(channel.sender(i))))
    except Busy:
        for j in jobs:
            j.cancel()
        load = svc.worker.load()
        raise ApiError(503, f"the server is busy ({load['running']} replies running, {load['queued']} queued); "
                            "retry shortly", code="server_busy", type="server_error",
                       headers={"Retry-After": str(retry_after(svc))}) from None
    return jobs


def _with_request_id(fn, rid: str):
    def run(job):
        REQUEST_ID.set(rid)  # left set: the worker's own log of this job's failure carries it too
        return fn(job)

    return run


def retry_after(svc: Service) -> int:
    load = svc.worker.load()
    return max(1, min(30, 1 + load["queued"] // max(1, load["max_active"])))


def job_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UserError):
        return ApiError(400, str(e))
    if isinstance(e, StoreUnavailable):
        return store_error(e)
    if isinstance(e, ServerShutdown):
        return ApiError(503, str(e), code="server_shutdown", type="server_error", headers={"Retry-After": "1"})
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


def store_error(e: StoreUnavailable) -> ApiError:
    log.warning("%s", e)  # with the request's id, as every log line of a request
    return ApiError(503, f"{e}; retry shortly", code="store_unavailable", type="server_error",
                    headers={"Retry-After": str(STORE_RETRY_AFTER)})
