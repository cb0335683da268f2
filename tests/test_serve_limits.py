"""A real server process told to stop, and slow or greedy clients: SIGTERM during long streams
(running replies finish within --shutdown-grace, the others end with an error event, only whole
turns are stored, exit code 0); half-sent headers, oversized headers, more connections than
the file limit allows."""

import json
import signal
import threading
import time

import httpx

from dialogen.serve.launch import ServerProcess
from dialogen.serve.store import Store


def _stream_turn(url, sid, max_tokens, out, began, started):
    """Stream one session turn; out gets {"deltas", "last"} (the last event: "[DONE]" or the error),
    or {"status"} when the turn is refused. `began` is set at its first event, `started` at its first text."""
    deltas, last = [], None
    with httpx.stream("POST", f"{url}/v1/sessions/{sid}/messages", timeout=120,
                      json={"content": "hi", "max_tokens": max_tokens, "stream": True}) as r:
        if r.status_code != 200:
            out.update(status=r.status_code)
            return
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            began.set()
            data = line[6:]
            last = data if data == "[DONE]" else json.loads(data)
            if data != "[DONE]" and "choices" in last:
                deltas.append(last["choices"][0]["delta"].get("content") or "")
                started.set() if deltas[-1] else None
    out.update(deltas=deltas, last=last)  # iter_lines ends cleanly only on a well-formed end of body


def _sigterm_during_streams(tiny_llama, tmp_path, grace: str, max_tokens: list[int], args=(), late=False):
    """Stream one turn per entry of `max_tokens` (admitted in that order, one running at a time),
    freeze the server while the first streams, send SIGTERM; with `late`, one more turn is sent
    during the shutdown. Checks that every stream ends well-formed and only whole turns are stored;
    returns (outs, the late turn's out, server output, the first request's id)."""
    db = tmp_path / "s.db"
    srv = ServerProcess(["--model", str(tiny_llama[0]), "--template", "chatml", "--db", str(db),
                         "--max-active", "1", "--shutdown-grace", grace, *args]).start()
    try:
        made = [httpx.post(srv.url + "/v1/sessions", json={}) for _ in range(len(max_tokens) + late)]
        sids = [r.json()["id"] for r in made]
        outs, began, started = [{} for _ in sids], [threading.Event() for _ in sids], threading.Event()
        threads = [threading.Thread(target=_stream_turn, args=(srv.url, sid, n, out, b, started if i == 0 else b))
                   for i, (sid, n, out, b) in enumerate(zip(sids, max_tokens + [8] * late, outs, began))]
        for t, b in zip(threads[:len(max_tokens)], began):  # each admitted (its stream begun) before the next
            t.start()
            assert b.wait(60)
        # the first reply is streaming: the server is frozen there, so no reply can finish before the signal
        assert started.wait(60)
        srv.proc.send_signal(signal.SIGSTOP)
        srv.proc.send_signal(signal.SIGTERM)
        if late:  # reaches the frozen server's socket; answered once it runs again
            threads[-1].start()
            time.sleep(0.3)
        srv.proc.send_signal(signal.SIGCONT)
        for t in threads:
            t.join(timeout=60)
        code = srv.proc.wait(timeout=60)
    finally:
        srv.stop()
    assert code == 0, "".join(srv.output)
    store = Store(db)
    try:
        stored = [store.get(sid, "")["messages"] for sid in sids]
    finally:
        store.close()
    for out, msgs in zip(outs, stored):
        if "status" in out:  # arrived while the server was stopping: refused, nothing stored
            assert out["status"] == 503 and msgs == []
            continue
        assert "last" in out, "the stream did not end well-formed"
        if out["last"] == "[DONE]":  # finished in time: the whole turn is stored
            assert [m["content"] for m in msgs] == ["hi", "".join(out["deltas"])]
        else:
            assert out["last"]["error"]["code"] == "server_shutdown", out["last"]
            assert "grace period" in out["last"]["error"]["message"] and msgs == []
    return outs[:len(max_tokens)], (outs[-1] if late else None), srv.output, made[0].headers["x-request-id"]


def test_sigterm_lets_a_running_reply_finish(tiny_llama, tmp_path):
    """The running reply and the one queued behind it finish within the grace period; a request
    sent during the shutdown gets 503, not a reset connection (the socket answers until the
    replies are done)."""
    outs, late, output, rid = _sigterm_during_streams(tiny_llama, tmp_path, "30", [12, 12],
                                                      ["--log-format", "json", "--log-level", "info"], late=True)
    assert [o["last"] for o in outs] == ["[DONE]", "[DONE]"]
    assert late == {"status": 503}
    logged = [json.loads(line) for line in output if line.startswith("{")]
    access = [r for r in logged if r["logger"] == "dialogen.access" and r["request_id"] == rid]
    assert len(access) == 1 and access[0]["http"]["path"] == "/v1/sessions" and access[0]["http"]["status"] == 200


def test_sigterm_past_the_grace_period_cuts_replies_with_an_error_event(tiny_llama, tmp_path):
    """The reply streaming when the signal comes and the two queued behind it are cut with the
    error event; nothing of them is stored."""
    outs, _, _, _ = _sigterm_during_streams(tiny_llama, tmp_path, "0", [200, 200, 200])
    assert [o["last"]["error"]["code"] for o in outs] == ["server_shutdown"] * 3


def test_half_sent_headers_cannot_starve_the_server(tiny_llama, tmp_path):
    """1,100 connections that send half a header, against a server with the common limit of 1,024
    open files: /health still answers within 1 s (the oldest idle connections make room), a
    header over the limit gets 431, and a head that does not arrive in time gets 408."""
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # inherited by the server
    try:
        srv = ServerProcess(["--model", str(tiny_llama[0]), "--template", "chatml", "--db", str(tmp_path / "s.db"),
                             "--header-timeout", "4"]).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))  # room for the clients
    host, port = srv.url.removeprefix("http://").split(":")
    slow = []
    try:
        for _ in range(1100):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(s)
        closed = 0
        for s in slow[:100]:  # the oldest were closed to make room, with a 503
            s.settimeout(10)
            closed += s.recv(100).startswith(b"HTTP/1.1 503")
        assert closed == 100
        with socket.create_connection((host, int(port))) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            s.settimeout(5)
            head = s.recv(100)
            took = time.monotonic() - t0
        assert head.startswith(b"HTTP/1.1 200") and took < 1.0, (head, took)
        r = httpx.get(srv.url + "/health", headers={"X-Big": "a" * 20_000}, timeout=5)
        assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
        assert httpx.get(srv.url + "/health", headers={"X-Fits": "a" * 10_000}, timeout=5).status_code == 200
        slow[-1].settimeout(15)  # the newest half-sent head runs out of time
        assert slow[-1].recv(100).startswith(b"HTTP/1.1 408")
    finally:
        for s in slow:
            s.close()
        srv.stop()
