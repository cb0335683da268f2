"""`dialogen serve`: the HTTP server (OpenAI-compatible API, sessions, web page)."""

from __future__ import annotations

import importlib.util
import argparse
import ipaddress
import os
import re
import socket
import threading
from pathlib import Path

from ..chat.personas import resolve_persona
from ..decoding.engine import adapter_engine, add_model_args, engine_from_args
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
    g.add_argument("--lora-modules", action="extend", nargs="+", default=[], metavar="NAME=DIR",
                   help="serve the LoRA adapter in DIR (PEFT's files) on the model as the model NAME (repeatable, "
                        "as vLLM's flag): a request naming NAME gets replies with that adapter, one naming the model "
                        "gets none; replies of every adapter share the batched step")
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
    g.add_argument("--max-header-bytes", type=int, default=16384,
                   help="request line and headers limit; larger gets 431 (default: %(default)s)")
    g.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request's headers must arrive within this time, else 408 (default: %(default)s)")
    g.add_argument("--max-connections", type=int, default=0,
                   help="open connections at most; past it the oldest idle one is closed (default: 0, as many as "
                        "the open-file limit allows, less a reserve)")
    g.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, stop taking requests and let running replies finish for this long; "
                        "a reply still running then ends with an error event (default: %(default)s)")
    g.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                   help="serve Prometheus metrics at GET /metrics, behind the API keys (default: on)")
    g.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="info adds an access line per request (default: %(default)s)")
    g.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="log lines as text or as JSON objects; each carries the request id (default: %(default)s)")
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
                        ("--threads", args.threads, 1), ("--shutdown-grace", args.shutdown_grace, 0),
                        ("--max-header-bytes", args.max_header_bytes, 1024), ("--header-timeout", args.header_timeout, 0.1),
                        ("--max-connections", args.max_connections, 0)):
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
    lora_modules(args)
    for name in args.allowed_host:
        if not re.fullmatch(r"[A-Za-z0-9.:\[\]_-]+", name):
            raise UserError(f"--allowed-host {name!r}: expected a host name or address, without scheme or path")
    keys = read_keys(args)
    if not keys and not is_loopback(args.host) and not args.insecure:
        raise UserError(f"--host {args.host} is not a loopback address and no API key is set: anyone who can "
                        "reach it could use the server; give --api-key/--api-keys-file, or --insecure")
    for mod in ("fastapi", "uvicorn", "prometheus_client"):
        if importlib.util.find_spec(mod) is None:
            raise UserError(f"the server needs {mod.replace('_', '-')}: pip install 'dialogen[serve]'")
    return keys


def lora_modules(args) -> list[tuple[str, str]]:
    """The (name, directory) pairs of --lora-modules; a malformed, repeated or taken name is refused."""
    out, taken = [], set(args.model_alias) | {args.model_name}
    for item in args.lora_modules:
        name, eq, directory = item.partition("=")
        name = name.strip()
        if not eq or not name or not directory or len(name) > 200:
            raise UserError(f"--lora-modules {item[:80]!r}: expected NAME=DIR (a name of 1 to 200 characters)")
        if name in taken:
            raise UserError(f"--lora-modules {name!r}: the name is given twice (or is the model's own or an alias)")
        taken.add(name)
        out.append((name, directory))
    if out and args.adapter is not None:
        raise UserError("--adapter and --lora-modules: give every adapter a name with --lora-modules")
    return out


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
    from .logs import setup as setup_logs

    setup_logs(args.log_level, args.log_format)
    sock = bind(args.host, args.port)
    # every admitted turn may hold a connection (its claim), plus a few for reads
    store = open_store(str(args.db or default_db()), args.max_active + args.max_queue + 8)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit, max_n=args.max_n,
                    kv_budget_bytes=int(args.kv_budget_mb * 2**20))

    def start():
        engine = engine_from_args(args)
        name = args.model_name or re.sub(r"-[0-9a-f]{12}$", "", engine.name)
        adapters = chats = None
        if args.lora_modules:  # each checked against the base now: a mistake stops the start, naming its directory
            from ..models.loading import model_path
            from ..models.lora_set import read_adapter_set

            named = lora_modules(args)
            if getattr(engine.model, "adapter", None) is not None:
                raise UserError(f"--model {args.model}: a LoRA adapter; with --lora-modules give the base as --model")
            if name in dict(named):
                raise UserError(f"--lora-modules {name!r}: the name is the model's own; give --model-name another")
            adapters = read_adapter_set(named, engine.model, model_path(args.model))
            chats = {n: adapter_engine(engine, d, args.template) for n, d in named}
        return Service(engine, store, Keys(keys), limits, sampling, name, args.max_active, args.max_queue,
                       decoding, args.model_alias, args.strict_model_names, prefill_chunk=args.prefill_chunk,
                       metrics=args.metrics, adapters=adapters, adapter_engines=chats)

    svc = in_passing_thread(start)  # the loads leave no OpenMP pool: the model thread's is the only one
    svc.default_persona = resolve_persona(args.system)  # for sessions and requests without a system message
    return run(svc, sock, args)


def open_store(db: str, connections: int = 100):
    """The session store a --db value names: a postgresql:// URL (replicas sharing sessions, see
    pgstore.py; a pool of up to `connections`) or an SQLite file."""
    from .pgstore import PgStore, is_postgres
    from .store import Store

    return PgStore(db, connections) if is_postgres(db) else Store(db)


def run(svc, sock: socket.socket, args) -> int:
    """Serve until SIGTERM/SIGINT (see `graceful_server`), with the connection limits of conns.py."""
    import uvicorn

    from .app import create_app
    from .conns import connection_cap, http_protocol

    app = create_app(svc, sock.getsockname()[0], [args.host, *args.allowed_host], args.cors_origin)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    pool = args.max_active + args.max_queue + 8 if str(args.db or "").startswith("postgres") else 0
    protocol = http_protocol(args.max_header_bytes, args.header_timeout, connection_cap(args.max_connections, pool))
    print(f"dialogen serve: {svc.model_name} on http://{shown}:{port}/ (OpenAI API at /v1)", flush=True)
    # uvicorn waits for the responses a little past the grace period: a reply cut at its end still
    # sends its error event and the end of its stream
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_grace + 5,
                            http=protocol, h11_max_incomplete_event_size=args.max_header_bytes,
                            log_config=None, access_log=False)  # logs.py: one handler, access lines with ids
    server = graceful_server(config, lambda: svc.begin_shutdown(args.shutdown_grace),
                             lambda: svc.worker.wait_idle(args.shutdown_grace + 5))
    try:
        server.run(sockets=[sock])
    finally:
        svc.close()
    return 0


def graceful_server(config, on_signal, wait_idle):
    """uvicorn's server, draining at the first SIGTERM/SIGINT: `on_signal()` makes new work get 503
    and starts the grace period, and the socket keeps answering until `wait_idle()` returns (no
    reply left). Only then does uvicorn close the socket: a connection that arrived during the
    drain gets its 503 instead of a reset. A second signal stops at once. The exit code is 0 after
    a shutdown that was asked for (uvicorn re-raises the signal, for an exit code of -15)."""
    import uvicorn

    class Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame):
            if not self.draining:
                self.draining = True
                on_signal()
                threading.Thread(target=self._exit_when_idle, name="dialogen-drain", daemon=True).start()
            else:
                self.should_exit = self.force_exit = True

        def _exit_when_idle(self):
            wait_idle()
            self.should_exit = True

    return Server(config)
