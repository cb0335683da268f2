"""`dialogen serve`: the HTTP server (OpenAI-compatible API, sessions, web page)."""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
import re
import socket
from pathlib import Path

from ..chat.personas import resolve_persona
from ..decoding.engine import add_model_args, engine_from_args
from ..decoding.settings import add_decoding_args, add_sampling_args, decoding_from, sampling_from
from ..errors import UserError
# torch, the model code and the extras are imported inside the commands: building `--help` stays torch-free


def register(sub):
    p = sub.add_parser("serve", help="serve the model over HTTP: OpenAI-compatible API, sessions, web chat page",
                       description="Serves POST /v1/chat/completions, /v1/completions, /v1/models, /v1/sessions "
                                   "and a chat page at /. "
                                   "Decoding flags set the server's defaults; requests override them.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 = any free port)")
    g.add_argument("--api-key", action="append", default=[], help="accept this API key (repeatable)")
    g.add_argument("--api-keys-file", default=None, help="file with one API key per line (# comments)")
    g.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without API keys")
    g.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host header names NAME (repeatable); by default only the bound "
                        "address, localhost and loopback addresses, against DNS rebinding")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow cross-origin requests (CORS) from this origin, e.g. http://localhost:3000 "
                        "(repeatable); other origins get 403")
    g.add_argument("--db", default=None, help="session store: an SQLite file, or postgresql://USER@HOST/DB for "
                   "several replicas sharing sessions (pip install 'dialogen[postgres]'); default: "
                   "$XDG_DATA_HOME/dialogen/sessions.sqlite3")
    g.add_argument("--model-name", default=None, help="the model id clients see (default: from the model path)")
    g.add_argument("--model-alias", action="append", default=[], metavar="NAME",
                   help="another name for the served model, listed in /v1/models (repeatable)")
    g.add_argument("--strict-model-names", action="store_true",
                   help="answer only the model's own name and its aliases (404 for others); by default any "
                        "requested name is answered by the one served model, as llama.cpp's server does")
    g.add_argument("--max-active", type=int, default=32, help="replies generated at once (default: %(default)s)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond --max-active before 503 (default: %(default)s)")
    g.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens fed per model step, shared by the prompts waiting, alongside the other "
                        "replies' next tokens: smaller keeps those replies streaming while a long prompt goes in, "
                        "larger feeds prompts sooner (default: %(default)s)")
    g.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="the largest max_tokens a request may ask for (default: %(default)s)")
    g.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body limit (default: %(default)s)")
    g.add_argument("--max-n", type=int, default=4, help="the largest n (choices per request) (default: %(default)s)")
    g.add_argument("--kv-budget-mb", type=float, default=1024,
                   help="memory for kept KV caches: three quarters for live sessions, a quarter for the recent prompts "
                        "of stateless requests; least recently used go first (default: %(default)s)")
    g.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for model steps (default: every core, here %(default)s: the batched model step "
                        "is most of the work)")
    g.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    add_model_args(p)
    add_sampling_args(p)
    add_decoding_args(p)
    p.set_defaults(func=cmd_serve)


def read_keys(args) -> list[str]:
    keys = [k.strip() for k in args.api_key]
    if any(not k for k in keys):
        raise UserError("--api-key: an API key cannot be empty")
    if args.api_keys_file:
        path = Path(args.api_keys_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--api-keys-file {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        for i, line in enumerate(lines, 1):
            key = line.split("#", 1)[0].strip()
            if key and not re.fullmatch(r"[\x21-\x7e]+", key):
                raise UserError(f"{path}:{i}: an API key must be printable ASCII without spaces")
            if key:
                keys.append(key)
        if not keys:
            raise UserError(f"--api-keys-file {path}: no keys in the file")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args):
    for flag, v, lo in (("--port", args.port, 0), ("--max-active", args.max_active, 1), ("--max-queue", args.max_queue, 0),
                        ("--prefill-chunk", args.prefill_chunk, 1),
                        ("--max-tokens-limit", args.max_tokens_limit, 1), ("--max-body-bytes", args.max_body_bytes, 64),
                        ("--max-n", args.max_n, 1), ("--kv-budget-mb", args.kv_budget_mb, 0),
                        ("--threads", args.threads, 1)):
        if v < lo:
            raise UserError(f"{flag} must be >= {lo}, got {v}")
    if args.port > 65535:
        raise UserError(f"--port must be <= 65535, got {args.port}")
    for origin in args.cors_origin:
        if not re.fullmatch(r"https?://[^/\s]+", origin.rstrip("/")):
            raise UserError(f"--cors-origin {origin!r}: expected an origin such as http://localhost:3000 "
                            "(scheme, host and optional port; no path)")
    for name in args.model_alias:
        if not name.strip() or len(name) > 200:
            raise UserError(f"--model-alias {name[:50]!r}: expected a name of 1 to 200 characters")
    for name in args.allowed_host:
        if not re.fullmatch(r"[A-Za-z0-9.:\[\]_-]+", name):
            raise UserError(f"--allowed-host {name!r}: expected a host name or address, without scheme or path")
    keys = read_keys(args)
    if not keys and not is_loopback(args.host) and not args.insecure:
        raise UserError(f"--host {args.host} is not a loopback address and no API key is set: anyone who can "
                        "reach it could use the server; give --api-key/--api-keys-file, or --insecure")
    for mod in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(mod) is None:
            raise UserError(f"the server needs {mod}: pip install 'dialogen[serve]'")
    return keys


def default_db() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "dialogen" / "sessions.sqlite3"


def bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails fast and --port 0 can be reported."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot bind ({e.strerror})") from None
    return sock


def cmd_serve(args) -> int:
    keys = check_args(args)  # before the slow imports and the model load
    import torch

    from ..models.kernels.threads import in_passing_thread
    from .service import Keys, Limits, Service

    sampling = sampling_from(args)
    decoding = decoding_from(args, strict=False)  # the default search; requests may ask for one without it
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sock = bind(args.host, args.port)
    store = open_store(str(args.db or default_db()))
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit, max_n=args.max_n,
                    kv_budget_bytes=int(args.kv_budget_mb * 2**20))

    def start():
        engine = engine_from_args(args)
        name = args.model_name or re.sub(r"-[0-9a-f]{12}$", "", engine.name)
        return Service(engine, store, Keys(keys), limits, sampling, name, args.max_active, args.max_queue,
                       decoding, args.model_alias, args.strict_model_names, prefill_chunk=args.prefill_chunk)

    svc = in_passing_thread(start)  # the loads leave no OpenMP pool: the model thread's is the only one
    svc.default_persona = resolve_persona(args.system)  # for sessions and requests without a system message
    return run(svc, sock, args.log_level, [args.host, *args.allowed_host], args.cors_origin)


def open_store(db: str):
    """The session store a --db value names: a postgresql:// URL (replicas sharing sessions, see
    pgstore.py) or an SQLite file."""
    from .pgstore import PgStore, is_postgres
    from .store import Store

    return PgStore(db) if is_postgres(db) else Store(db)


def run(svc, sock: socket.socket, log_level: str = "warning", allowed_hosts=(), cors_origins=()) -> int:
    import uvicorn

    from .app import create_app

    app = create_app(svc, sock.getsockname()[0], allowed_hosts, cors_origins)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"dialogen serve: {svc.model_name} on http://{shown}:{port}/ (OpenAI API at /v1)", flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, http=json_error_protocol())
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        svc.close()
    return 0


def json_error_protocol():
    """uvicorn's HTTP protocol, answering a request it cannot parse (a bad Content-Length, a
    malformed header) with OpenAI's JSON error instead of plain text."""
    import json

    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from .protocol import error_body

    class Protocol(AutoHTTPProtocol):
        def send_400_response(self, msg: str):
            body = json.dumps(error_body(f"malformed HTTP request: {msg}", "invalid_request_error", None,
                                         "invalid_http")).encode()
            head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
            self.transport.write(head + body)
            self.transport.close()

    return Protocol
