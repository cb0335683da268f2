"""What keeps a keyless server on loopback safe from the web pages its user visits.

- DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and then reads the
  server as its own origin; its requests carry `Host: evil.example`. Only Host names of the bound
  address, localhost, loopback literals and `--allowed-host` names are served (403 otherwise);
  a server bound to a wildcard address also takes any IP literal, which no rebinding can forge.
- Cross-site requests: a request whose Origin is neither the server itself nor listed with
  `--cors-origin` is refused (403), "simple" requests included: they would run before a browser
  could hide the answer. Listed origins get CORS: preflights are answered, responses carry
  `Access-Control-Allow-Origin`.
- A POST body must be declared JSON (415 otherwise), so no HTML form can send one.

Plain ASGI, like the auth middleware: streamed responses pass through untouched.
"""

from __future__ import annotations

import ipaddress

from fastapi.responses import JSONResponse, Response

from .protocol import error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
METHODS = "GET, HEAD, POST, DELETE, OPTIONS"


def host_name(header: str) -> str:
    """'Example.COM.:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        header = header.rsplit(":", 1)[0]
    return header.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """ASGI middleware: Host and Origin checks, CORS for listed origins, JSON-only POST bodies."""

    def __init__(self, app, bound_host: str = "127.0.0.1", allowed_hosts=(), cors_origins=()):
        self.app = app
        self.any_ip = bound_host in WILDCARDS
        self.hosts = {host_name(h) for h in (*LOOPBACK_NAMES, bound_host, *allowed_hosts) if h not in WILDCARDS}
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    def host_ok(self, header: str) -> bool:
        name = host_name(header)
        return name in self.hosts or (self.any_ip and is_ip(name))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k: v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get(b"host", "")
        if host and not self.host_ok(host):
            return await _refuse(403, f"the Host header '{host[:100]}' is not this server's; start the server with "
                                      "--allowed-host NAME to serve it", "host_not_allowed", scope, receive, send)
        origin = headers.get(b"origin")
        listed = origin is not None and origin.rstrip("/").lower() in self.origins
        if origin is not None and not listed and not _same_origin(origin, host):
            return await _refuse(403, f"cross-origin requests from '{origin[:100]}' are not allowed; start the server "
                                      "with --cors-origin ORIGIN to allow them", "origin_not_allowed",
                                 scope, receive, send)
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")] if listed else []
        if scope["method"] == "OPTIONS":
            return await self._options(headers, cors, scope, receive, send)
        if scope["method"] == "POST" and not _is_json(headers.get(b"content-type", "")):
            return await _refuse(415, "a POST body must be JSON: send 'Content-Type: application/json'",
                                 "unsupported_media_type", scope, receive, send, cors)
        if not cors:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors,
                                                   (b"access-control-expose-headers", b"Retry-After")]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _options(self, headers: dict, cors: list, scope, receive, send):
        """A CORS preflight (for a listed origin) or a plain OPTIONS: which methods there are."""
        extra = {"Allow": METHODS}
        if cors:
            extra.update({"Access-Control-Allow-Methods": METHODS, "Access-Control-Max-Age": "600",
                          "Access-Control-Allow-Headers": headers.get(b"access-control-request-headers",
                                                                      "Authorization, Content-Type")[:1000]})
        response = Response(status_code=204, headers=extra)
        response.raw_headers.extend(cors)
        await response(scope, receive, send)


def _same_origin(origin: str, host: str) -> bool:
    scheme, _, rest = origin.partition("://")
    return scheme.lower() in ("http", "https") and bool(host) and rest.rstrip("/").lower() == host.strip().lower()


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


async def _refuse(status: int, message: str, code: str, scope, receive, send, cors=()):
    response = JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=status)
    response.raw_headers.extend(cors)
    await response(scope, receive, send)
