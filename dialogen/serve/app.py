"""The FastAPI application: auth, body limits, OpenAI-shaped errors, health, models, the web page.

Endpoints are added by `completions.py` (POST /v1/chat/completions), `text.py` (POST
/v1/completions), `sessions.py` (/v1/sessions...) and `feedback.py` (ratings, regenerated replies
and picks of a session's replies). The OpenAI routes also answer without the
`/v1` prefix (`UNPREFIXED`), for clients whose base URL lacks it. Every error leaves as
`{"error": {"message", "type", "param", "code"}}`; a 404 lists the routes that exist.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import Guard
from .logs import Observe
from .protocol import ApiError, error_body, model_not_found
from .service import Service
from .store import StoreUnavailable

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("dialogen.serve")
UNPREFIXED = ("/chat/completions", "/completions", "/models")  # also served without /v1, as llama.cpp does


def needs_key(path: str) -> bool:
    """The API's paths: /v1/..., the unprefixed OpenAI routes and /metrics (not the page, /static,
    /health, /ready)."""
    return (path.startswith("/v1/") or path == "/metrics"
            or any(path == p or path.startswith(p + "/") for p in UNPREFIXED))


class App(FastAPI):
    """FastAPI with `Observe` (request ids, access log, request counts) around everything, the
    500 handler included."""

    def build_middleware_stack(self):
        return Observe(super().build_middleware_stack(), self.state.svc.metrics)


def create_app(svc: Service, bound_host: str = "127.0.0.1", allowed_hosts=(), cors_origins=()) -> FastAPI:
    """The app; `bound_host`, `allowed_hosts` and `cors_origins` set which Host and Origin headers
    are served (see guard.py)."""
    app = App(title="dialogen", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.svc = svc
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, e: StoreUnavailable):
        from .channel import store_error

        err = store_error(e)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code == 404:
            msg += "; the routes are: " + ", ".join(route_list(app))
        return JSONResponse(error_body(msg, "invalid_request_error", None, code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    app.add_middleware(AuthMiddleware, keys=svc.keys)
    app.add_middleware(Guard, bound_host=bound_host, allowed_hosts=allowed_hosts, cors_origins=cors_origins)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request):
        out = {"status": "ok", "model": svc.model_name, "context_length": svc.context_length,
               "defaults": svc.defaults()}
        if svc.keys.owner(request.headers.get("authorization")) is not None:  # what the clients are doing:
            out.update({"worker": svc.worker.load(), "live_sessions": len(svc.sessions),  # for key holders only
                        "kv_cache_bytes": svc.sessions.nbytes(), "evictions": svc.sessions.evictions})
        return out

    @app.api_route("/ready", methods=["GET", "HEAD"])
    async def ready():
        """Readiness, for a load balancer: 503 while the session database is unreachable or the
        server is shutting down (/health stays the liveness check)."""
        if svc.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        try:
            await run_in_threadpool(svc.store.ping)
        except StoreUnavailable as e:
            return JSONResponse({"status": "unavailable", "store": str(e)}, status_code=503,
                                headers={"Retry-After": "2"})
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        if not svc.metrics.enabled:
            raise ApiError(404, "metrics are off (dialogen serve --no-metrics)", code="not_found")
        body = await run_in_threadpool(svc.metrics.render, svc)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models():
        return {"object": "list", "data": [_model_card(n, svc, started) for n in svc.model_names()]}

    async def model(name: str):
        if not svc.accepts_model(name):
            raise model_not_found(svc.model_names(), name)
        return _model_card(name if name in svc.model_names() else svc.model_name, svc, started)

    for prefix in ("/v1", ""):
        app.add_api_route(prefix + "/models", models, methods=["GET", "HEAD"])
        app.add_api_route(prefix + "/models/{name:path}", model, methods=["GET"])

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    from .completions import add_routes as completion_routes
    from .feedback import add_routes as feedback_routes
    from .sessions import add_routes as session_routes
    from .text import add_routes as text_routes

    completion_routes(app, svc)
    text_routes(app, svc)
    session_routes(app, svc)
    feedback_routes(app, svc)
    return app


class AuthMiddleware:
    """Every API request (/v1/..., or an unprefixed OpenAI route) needs a known API key (when keys are configured);
    sets state.owner.

    Plain ASGI rather than a decorator middleware, so streamed responses and client
    disconnects pass through untouched.
    """

    def __init__(self, app, keys):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and needs_key(scope["path"]):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            owner = self.keys.owner(header)
            if owner is None:
                msg = ("no API key given: send 'Authorization: Bearer YOUR_KEY'" if not header
                       else "incorrect API key")
                body = error_body(msg, "invalid_request_error", None, "invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
            scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)


def _model_card(name: str, svc: Service, created: int) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "dialogen",
            "context_length": svc.context_length}
    if name in svc.adapter_engines:  # a LoRA adapter on the base model (vLLM's `parent`)
        card["parent"] = svc.model_name
    return card


def route_list(app: FastAPI) -> list[str]:
    """'GET /v1/models', 'POST /v1/chat/completions', ...: the routes a client can call."""
    out = []
    for r in app.routes:
        methods = sorted(getattr(r, "methods", None) or ())
        path = getattr(r, "path", "")
        if methods and path:
            out += [f"{m} {path}" for m in methods if m != "HEAD"]
    return list(dict.fromkeys(out))
