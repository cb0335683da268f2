"""Serving under load: N concurrent clients x T turns each, vs the same turns sent one by one.

Starts `dialogen serve` (default model unless --model) on a free loopback port with a fresh
session database. Each client opens a session and sends its turns one after another, streamed
(so time to first token is measured too). Phase 1 runs all clients at once; phase 2 sends the
same load one turn at a time; then the same turns once more through `dialogen chat`'s Session in this
process (no server), to compare one served conversation with chat: the two alternate turn by turn,
so the machine's drift hits both alike. Each served phase stops issuing
turns at --phase-limit seconds, so the whole run is bounded; turns not started are reported, not
hidden. Prints one JSON object.

During the concurrent phase /metrics is scraped every --scrape-every seconds; afterwards its
counters are compared with what the clients saw (turns, tokens). (Run once with
--scrape-every 0 for the cost of scraping.) Then --burst N concurrent chat completions: the
server's RSS before (idle), at its peak, and 30 s after the burst, with the KV-cache bytes it
keeps by design.

With --replicas N, N servers share one session store (--db: a postgresql:// URL, or a temp SQLite
file) and each client sends every turn to the next replica (round robin, no affinity), retrying
a turn that gets 409. Afterwards the stored sessions are checked against the turns the clients
saw complete (lost, duplicated), and the same load runs against one replica for the ratio.

    nice .venv/bin/python bench/serve_load.py [--clients 32] [--turns 5] [--max-tokens 24]
    nice .venv/bin/python bench/serve_load.py --metrics-cost 5   # metrics on vs --no-metrics
    nice .venv/bin/python bench/serve_load.py --replicas 2 --db postgresql://postgres@127.0.0.1:5432/bench
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dialogen.serve.launch import ServerProcess
from serve_peer import SYSTEM, TURNS, http_client, open_session, request_json, stream_turn  # this directory


async def turn(client, url: str, sid: str, text: str, max_tokens: int) -> dict:
    body = {"content": text, "stream": True, "max_tokens": max_tokens}
    out = await stream_turn(client, f"{url}/v1/sessions/{sid}/messages", body)
    if out.get("status") == 409:
        return {"conflict": True}
    out.pop("text", None)
    return out


async def conversation(client, urls: list[str], c: int, turns: int, max_tokens: int, deadline: float,
                       results: list, sent: dict):
    sid, error = await open_session(client, urls[0])
    if error:
        results.append({"error": error})
        return
    sent[sid] = []
    for t in range(turns):
        if time.perf_counter() > deadline:
            return
        text = f"{TURNS[(c + t) % len(TURNS)]} ({c}.{t})"  # unique, so the audit can count it
        for _ in range(100):  # a 409 (the session's previous turn still held somewhere): again
            out = await turn(client, urls[(c + t) % len(urls)], sid, text, max_tokens)
            if not out.get("conflict"):
                break
            results.append(out)
            await asyncio.sleep(0.05)
        results.append(out)
        if "error" not in out and not out.get("conflict"):
            sent[sid].append(text)


async def phase(urls: list[str], clients: int, turns: int, max_tokens: int, limit: float, concurrent: bool,
                scrape_every: float = 0.0) -> dict:
    """Clients x turns, all at once or one after another; their summary (with the metrics scrapes'
    when `scrape_every`)."""
    clients = range(clients)
    results: list[dict] = []
    sent: dict[str, list[str]] = {}
    deadline = time.perf_counter() + limit
    t0 = time.perf_counter()
    async with http_client(len(clients) + 8, timeout=600.0) as client:
        before = await scrape(client, urls[0]) if scrape_every else None
        scraper = asyncio.create_task(scrape_loop(client, urls[0], scrape_every)) if scrape_every else None
        if concurrent:
            await asyncio.gather(*(conversation(client, urls, c, turns, max_tokens, deadline, results, sent)
                                   for c in clients))
        else:
            for c in clients:
                await conversation(client, urls, c, turns, max_tokens, deadline, results, sent)
        wall = time.perf_counter() - t0
        out = summarize(results, wall, len(clients) * turns)
        if scraper is not None:
            scraper.cancel()
            times = await asyncio.gather(scraper, return_exceptions=True)
            out["metrics"] = compare_metrics(before, await scrape(client, urls[0]), results,
                                             times[0] if isinstance(times[0], list) else [])
        if len(urls) > 1:
            out.update(await audit(client, urls[-1], sent))
    return out


async def scrape(client, url: str) -> dict:
    """GET /metrics, parsed by prometheus_client: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    async with client.get(url + "/metrics") as r:
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def scrape_loop(client, url: str, every: float) -> list[float]:
    times = []
    try:
        while True:
            await asyncio.sleep(every)
            t0 = time.perf_counter()
            await scrape(client, url)
            times.append(time.perf_counter() - t0)
    except asyncio.CancelledError:
        return times


def compare_metrics(before: dict, after: dict, results: list[dict], times: list[float]) -> dict:
    """The server's counters over the phase against what the clients saw."""
    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    turn_route = (("method", "POST"), ("route", "/v1/sessions/{sid}/messages"))
    ok = [r for r in results if "error" not in r and not r.get("conflict")]
    seen = {"turns_200": len(ok), "turns_409": sum(1 for r in results if r.get("conflict")),
            "tokens": sum(r["tokens"] for r in ok)}
    counted = {"turns_200": delta("dialogen_http_requests_total", turn_route + (("status", "200"),)),
               "turns_409": delta("dialogen_http_requests_total", turn_route + (("status", "409"),)),
               "tokens": delta("dialogen_generated_tokens_total")}
    return {"scrapes": len(times), "scrape_ms_mean": round(1000 * statistics.mean(times), 1) if times else None,
            "clients_saw": seen, "metrics_counted": counted, "agree": seen == counted,
            "ttft_count": delta("dialogen_time_to_first_token_seconds_count")}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


async def burst(url: str, pid: int, n: int, max_tokens: int, settle: float = 30.0) -> dict:
    """n concurrent chat completions: the server's RSS idle before, at its peak, `settle` s after."""
    peak, statuses = [rss_mb(pid)], {}
    before = peak[0]

    async def sample(stop: asyncio.Event):
        while not stop.is_set():
            peak.append(rss_mb(pid))
            await asyncio.sleep(0.1)

    async def one(client, i):
        body = {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": f"{TURNS[i % len(TURNS)]} (burst {i})"}],
                "max_tokens": max_tokens}
        async with client.post(url + "/v1/chat/completions", json=body) as r:
            await r.read()
            statuses[r.status] = statuses.get(r.status, 0) + 1

    stop = asyncio.Event()
    async with http_client(n + 8, timeout=600.0) as client:
        sampler = asyncio.create_task(sample(stop))
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(settle)
        stop.set()
        await sampler
        after = rss_mb(pid)
        kept = await scrape(client, url)
    kv = sum(v for (name, _), v in kept.items() if name == "dialogen_kv_cache_bytes") / 2**20
    return {"requests": n, "statuses": statuses, "wall_s": round(wall, 1), "rss_idle_mb": before,
            "rss_peak_mb": max(peak), f"rss_after_{settle:g}s_mb": after, "after_vs_idle": round(after / before, 2),
            "kv_cache_kept_mb": round(kv, 1)}


def alone_and_chat(url: str, args) -> tuple[dict, dict, float]:
    """The clients one at a time against the server, and the same turns through `dialogen chat`'s
    Session in this process, alternating turn by turn (a served turn, then the same text in chat),
    so the machine's drift hits both alike. (served summary, chat summary, median of the
    conversations' served / chat ratios)."""
    return asyncio.run(_alone_and_chat(url, args, chat_engine(args.threads)))


async def _alone_and_chat(url: str, args, engine) -> tuple[dict, dict, float]:
    from dialogen.chat.session import Session
    from dialogen.decoding.settings import Sampling

    results, ratios, served_s = [], [], 0.0
    chat = {"tokens": 0, "wall_s": 0.0}
    deadline = time.perf_counter() + args.phase_limit
    async with http_client(8, timeout=600.0) as client:
        for c in range(args.clients):
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            sid, error = await open_session(client, url)
            if error:
                results.append({"error": error})
                continue
            walls = [time.perf_counter() - t0, 0.0]  # served, chat: each side's own time
            t0 = time.perf_counter()
            session = Session(engine, system=SYSTEM, sampling=Sampling(max_new_tokens=args.max_tokens))
            walls[1] += time.perf_counter() - t0
            tokens = [0, 0]
            for t in range(args.turns):
                text = f"{TURNS[(c + t) % len(TURNS)]} ({c}.{t})"
                t0 = time.perf_counter()
                out = await turn(client, url, sid, text, args.max_tokens)
                walls[0] += time.perf_counter() - t0
                results.append(out)
                tokens[0] += out.get("tokens", 0)
                t0 = time.perf_counter()
                tokens[1] += len(session.send(text).run().tokens)
                walls[1] += time.perf_counter() - t0
            served_s += walls[0]
            chat["tokens"] += tokens[1]
            chat["wall_s"] += walls[1]
            ratios.append(tokens[0] / walls[0] / (tokens[1] / walls[1]))
    alone = summarize(results, served_s, args.clients * args.turns)
    chat.update(wall_s=round(chat["wall_s"], 1), tokens_per_s=round(chat["tokens"] / max(chat["wall_s"], 1e-9), 2),
                threads=engine.threads)
    return alone, chat, statistics.median(ratios) if ratios else 0.0


async def audit(client, url: str, sent: dict) -> dict:
    """Stored sessions against the turns the clients saw complete: lost and duplicated turns."""
    lost = duplicated = 0
    for sid, texts in sent.items():
        stored = (await request_json(client, "GET", f"{url}/v1/sessions/{sid}"))[1]["messages"]
        users = [m["content"] for m in stored if m["role"] == "user"]
        lost += sum(1 for t in texts if t not in users)
        duplicated += len(users) - len(set(users)) + sum(1 for u in users if u not in texts)
    return {"lost_turns": lost, "duplicated_turns": duplicated}


def chat_engine(threads: int | None):
    import torch

    from dialogen.chat.session import load_engine

    if threads:
        torch.set_num_threads(threads)
    engine = load_engine(None, "auto", "auto")
    engine.threads = torch.get_num_threads()
    return engine


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def summarize(results: list[dict], wall: float, planned: int) -> dict:
    conflicts = sum(1 for r in results if r.get("conflict"))
    results = [r for r in results if not r.get("conflict")]
    ok = [r for r in results if "error" not in r]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"turns_planned": planned, "turns_done": len(ok), "errors": len(results) - len(ok), "conflicts_409": conflicts,
            "error_samples": [r["error"] for r in results if "error" in r][:3],
            "latency_p50_s": _pct(lat, 0.5), "latency_p95_s": _pct(lat, 0.95),
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p95_s": _pct(ttft, 0.95),
            "tokens": tokens, "wall_s": round(wall, 1), "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
            "mean_latency_s": round(statistics.mean(lat), 3) if lat else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model for the server (default: the embedded default model)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=24, help="reply length limit per turn")
    ap.add_argument("--phase-limit", type=float, default=300.0, help="seconds each phase may start turns for")
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own default)")
    ap.add_argument("--max-active", type=int, default=None, help="the server's --max-active (default: --clients)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="the server's --prefill-chunk (default: its own)")
    ap.add_argument("--replicas", type=int, default=1, help="servers sharing one session store, turns sent round robin")
    ap.add_argument("--db", default=None, help="the session store (a postgresql:// URL or SQLite file; default: a temp "
                                               "SQLite file)")
    ap.add_argument("--scrape-every", type=float, default=1.0,
                    help="seconds between /metrics scrapes during the concurrent phase (0: none)")
    ap.add_argument("--metrics-cost", type=int, default=0, metavar="ROUNDS",  # an even number
                    help="only measure what metrics cost: the concurrent phase against a server with metrics "
                         "(scraped every --scrape-every s) and one with --no-metrics, alternated ROUNDS times")
    ap.add_argument("--burst", type=int, default=200,
                    help="concurrent chat completions of the memory burst, after the phases (0: none)")
    ap.add_argument("--settle", type=float, default=30.0, help="seconds after the burst before RSS is read again")
    args = ap.parse_args(argv)
    if args.replicas > 1:
        print(json.dumps(replicas(args)))
        return 0
    if args.metrics_cost:
        print(json.dumps(metrics_cost(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        server_args = ["--db", str(Path(tmp) / "bench.db"), "--max-active", str(args.max_active or max(args.clients, 1)),
                       "--max-queue", str(max(args.clients * 2, args.burst))]
        if args.prefill_chunk:
            server_args += ["--prefill-chunk", str(args.prefill_chunk)]
        if args.model:
            server_args += ["--model", args.model]
        if args.threads:
            server_args += ["--threads", str(args.threads)]
        with ServerProcess(server_args) as srv:
            together = asyncio.run(phase([srv.url], args.clients, args.turns, args.max_tokens, args.phase_limit, True,
                                         args.scrape_every))
            worker = srv.health()["worker"]
            alone = chat = None
            if not args.skip_sequential:
                alone, chat, paired = alone_and_chat(srv.url, args) if not args.model else (
                    asyncio.run(phase([srv.url], args.clients, args.turns, args.max_tokens, args.phase_limit, False)),
                    None, None)
            health = srv.health()
            bursted = (asyncio.run(burst(srv.url, srv.proc.pid, args.burst, args.max_tokens, args.settle))
                       if args.burst else None)
    out = {"model": health["model"], "clients": args.clients, "turns_per_client": args.turns,
           "max_tokens": args.max_tokens, "concurrent": together, "one_by_one": alone,
           "largest_decode_batch": worker["max_batch"], "mean_decode_batch": round(
               worker["decode_rows"] / max(1, worker["rounds"]), 1)}
    if bursted:
        out["burst"] = bursted
    if alone and alone["tokens_per_s"]:
        out["throughput_ratio"] = round(together["tokens_per_s"] / alone["tokens_per_s"], 2)
    if chat and chat["tokens_per_s"]:  # the same turns through chat in this process, turn by turn
        out["chat_in_process"] = chat
        out["one_by_one_vs_chat"] = round(alone["tokens_per_s"] / chat["tokens_per_s"], 2)
        out["one_by_one_vs_chat_paired"] = round(paired, 2)
    print(json.dumps(out))
    return 0


def metrics_cost(args) -> dict:
    """Tokens/s of the concurrent phase with metrics on (and scraped) over off, in rounds (on then
    off, then off then on, ...) so the machine's drift and the order hit both alike; the geometric
    mean of the rounds' ratios (the phase that goes first in a round runs a little slower, so an even
    number of rounds weighs both orders alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        def server(name, extra):
            return ServerProcess(["--db", str(Path(tmp) / f"{name}.db"), "--max-active", str(args.clients),
                                  "--max-queue", str(args.clients * 2), *(["--model", args.model] if args.model else []),
                                  *(["--threads", str(args.threads)] if args.threads else []), *extra])

        with server("on", []) as on, server("off", ["--no-metrics"]) as off:
            rounds = []
            for r in range(args.metrics_cost):
                def with_m():
                    return asyncio.run(phase([on.url], args.clients, args.turns, args.max_tokens, args.phase_limit,
                                             True, args.scrape_every))["tokens_per_s"]

                def without():
                    return asyncio.run(phase([off.url], args.clients, args.turns, args.max_tokens, args.phase_limit,
                                             True))["tokens_per_s"]
                if r % 2:  # which goes first alternates too
                    b = without()
                    rounds.append((with_m(), b))
                else:
                    rounds.append((with_m(), without()))
    ratios = [a / b for a, b in rounds if b]
    mean = statistics.geometric_mean(ratios) if ratios else None
    return {"clients": args.clients, "turns_per_client": args.turns, "max_tokens": args.max_tokens,
            "scrape_every_s": args.scrape_every, "tokens_per_s_on_off": rounds,
            "on_first_ratios": [round(x, 4) for x in ratios[0::2]], "off_first_ratios": [round(x, 4) for x in ratios[1::2]],
            "on_over_off": round(mean, 4) if mean else None}  # the geometric mean: each order weighs alike


def replicas(args) -> dict:
    """N servers on one store, clients round robin across them; then the same load on one of them."""
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--db", args.db or str(Path(tmp) / "bench.db"), "--max-active", str(max(args.clients, 1)),
                  "--max-queue", str(max(args.clients * 2, args.burst))]
        common += (["--model", args.model] if args.model else []) + (["--threads", str(args.threads)] if args.threads else [])
        servers = []
        try:
            for _ in range(args.replicas):
                servers.append(ServerProcess(common).start())
            urls = [s.url for s in servers]
            many = asyncio.run(phase(urls, args.clients, args.turns, args.max_tokens, args.phase_limit, True))
            one = asyncio.run(phase(urls[:1], args.clients, args.turns, args.max_tokens, args.phase_limit, True))
        finally:
            for s in servers:
                s.stop()
    store = "postgresql" if str(args.db or "").startswith(("postgresql://", "postgres://")) else "sqlite"
    return {"store": store, "replicas": args.replicas, "clients": args.clients, "turns_per_client": args.turns,
            "max_tokens": args.max_tokens, "round_robin": many, "one_replica": one,
            "tokens_per_s_ratio_vs_one": round(many["tokens_per_s"] / max(one["tokens_per_s"], 1e-9), 2)}


if __name__ == "__main__":
    sys.exit(main())
