"""dialogen serve against llama.cpp's own server (llama-server), on the same GGUF file and threads.

The workload is that of an OpenAI client that keeps no server state. Every turn resends the whole
history as a chat completion and streams the reply, greedy, with keep-alive off. It runs as
N clients x T turns, first with 1 client and then with --clients at once. dialogen also runs the
same turns through its sessions API (the history kept on the server). The servers run one after
the other, each alone on the machine.

Prints one JSON line: tok/s, p50/p95 latency, time to first token and errors for each server and
workload, and dialogen's ratios against llama-server.

    make bench-peers     # builds .venv/bin/llama-server once (bench/build_llama_server.sh)
    nice .venv/bin/python bench/serve_peer.py [--clients 32] [--turns 5] [--max-tokens 24] [--threads 2]
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from dialogen.models.loading import default_model_path
from dialogen.serve.launch import ServerProcess

SYSTEM = "You are a friendly, concise assistant."
TURNS = ["Hi! How is your day going?", "Can you recommend a good book to read?", "Why do you like it?",
         "What should I cook for dinner tonight?", "Thanks! Any tips for sleeping better?",
         "What is your favourite season?", "Tell me a fun fact.", "Goodbye!"]


def _pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None


def http_client(connections: int, keep_alive: bool = True, timeout: float = 900.0) -> aiohttp.ClientSession:
    """The benchmark's HTTP client. It runs on the server's 2 cores, so its CPU per streamed token is
    taken from the server's: aiohttp (a C parser) spends 0.29-0.35 ms of CPU a token here, httpx 0.72 ms."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                 connector=aiohttp.TCPConnector(limit=connections, force_close=not keep_alive))


async def request_json(client, method: str, url: str, **kw) -> tuple[int, object]:
    """(status, parsed JSON body) of one request."""
    async with client.request(method, url, **kw) as r:
        return r.status, await r.json(content_type=None)


async def open_session(client, base: str) -> tuple[str | None, str | None]:
    """A new session with the benchmark's persona: (its id, None), or (None, the error)."""
    status, row = await request_json(client, "POST", f"{base}/v1/sessions", json={"persona": SYSTEM})
    return (row["id"], None) if status == 200 else (None, f"create session: {status}")


async def stream_turn(client, url: str, body: dict) -> dict:
    """One streamed request; latency, time to first token, tokens, text, or an error."""
    t0, first, text, tokens = time.perf_counter(), None, [], 0
    try:
        async with client.post(url, json=body) as r:
            if r.status != 200:
                return {"error": f"{r.status} {(await r.text())[:200]}", "status": r.status}
            async for line in r.content:  # one SSE line at a time
                if not line.startswith(b"data: {"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return {"error": str(ev["error"].get("message", ev["error"]))[:200]}
                for ch in ev.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        first = first if first is not None else time.perf_counter() - t0
                        text.append(piece)
                if ev.get("usage"):
                    tokens = ev["usage"].get("completion_tokens", tokens)
    except (aiohttp.ClientError, TimeoutError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens, "text": "".join(text)}


async def stateless_client(client, base: str, c: int, turns: int, max_tokens: int, out: list):
    model = (await request_json(client, "GET", f"{base}/v1/models"))[1]["data"][0]["id"]
    history = [{"role": "system", "content": SYSTEM}]
    for t in range(turns):
        history.append({"role": "user", "content": TURNS[(c + t) % len(TURNS)]})
        body = {"model": model, "messages": history, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                "stream_options": {"include_usage": True}}
        r = await stream_turn(client, f"{base}/v1/chat/completions", body)
        out.append(r)
        if "error" in r:
            return
        history.append({"role": "assistant", "content": r["text"]})


async def session_client(client, base: str, c: int, turns: int, max_tokens: int, out: list):
    sid, error = await open_session(client, base)
    if error:
        out.append({"error": error})
        return
    for t in range(turns):
        body = {"content": TURNS[(c + t) % len(TURNS)], "stream": True, "max_tokens": max_tokens, "temperature": 0}
        r = await stream_turn(client, f"{base}/v1/sessions/{sid}/messages", body)
        out.append(r)
        if "error" in r:
            return


async def workload(base: str, client_fn, clients: int, turns: int, max_tokens: int) -> dict:
    out: list[dict] = []
    async with http_client(4) as client:  # warm up: one short turn, not counted
        await stateless_client(client, base, 0, 1, 4, [])
    t0 = time.perf_counter()
    async with http_client(clients + 4, keep_alive=False) as client:
        await asyncio.gather(*(client_fn(client, base, c, turns, max_tokens, out) for c in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in out if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "turns_done": len(ok), "turns_planned": clients * turns,
            "errors": len(out) - len(ok), "error_samples": [r["error"] for r in out if "error" in r][:3],
            "tokens": tokens, "wall_s": round(wall, 1), "tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": _pct([r["latency"] for r in ok], 0.5),
            "latency_p95_s": _pct([r["latency"] for r in ok], 0.95),
            "ttft_p50_s": _pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.5)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, binary: str, model: Path, threads: int, slots: int, ctx: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [binary, "-m", str(model), "-t", str(threads), "-tb", str(threads), "-np", str(slots),
                    "-c", str(ctx), "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = None

    def __enter__(self):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError("llama-server exited:\n" + self.log.read().decode(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("llama-server did not become healthy")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-server", default=str(Path(sys.executable).parent / "llama-server"),
                    help="the llama-server binary (default: the venv's, from make bench-peers)")
    args = ap.parse_args(argv)
    if not os.access(args.llama_server, os.X_OK):
        print(f"serve_peer: no llama-server at {args.llama_server}; run `make bench-peers`", file=sys.stderr)
        return 2
    model = default_model_path()
    out = {"model": model.name, "threads": args.threads, "turns_per_client": args.turns, "max_tokens": args.max_tokens}
    shapes = [("one_client", 1), (f"{args.clients}_clients", args.clients)]
    with LlamaServer(args.llama_server, model, args.threads, args.clients, 512 * args.clients) as peer:
        for name, n in shapes:
            out[f"llama_server_{name}"] = asyncio.run(workload(peer.url, stateless_client, n, args.turns,
                                                               args.max_tokens))
    with ServerProcess(["--threads", str(args.threads), "--max-active", str(args.clients), "--max-queue",
                        str(4 * args.clients), "--db", str(Path(tempfile.mkdtemp()) / "s.db")]) as ours:
        for name, n in shapes:
            out[f"dialogen_{name}"] = asyncio.run(workload(ours.url, stateless_client, n, args.turns, args.max_tokens))
            out[f"dialogen_sessions_{name}"] = asyncio.run(workload(ours.url, session_client, n, args.turns,
                                                                    args.max_tokens))
    for name, _ in shapes:
        peer_rate = out[f"llama_server_{name}"]["tokens_per_s"] or 1e-9
        out[f"ratio_{name}"] = round(out[f"dialogen_{name}"]["tokens_per_s"] / peer_rate, 2)
        out[f"ratio_sessions_{name}"] = round(out[f"dialogen_sessions_{name}"]["tokens_per_s"] / peer_rate, 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
