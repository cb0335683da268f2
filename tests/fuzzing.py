"""Hypothesis strategies and checks shared by tests/test_fuzz.py (a few examples, in CI) and
bench/fuzz.py (ten thousand and more): random JSON for every field of every HTTP route, and
random bytes and JSON for every reader of the CLI.

Each `check_*` function runs one example against the real code and returns what went wrong
("5xx", "traceback", "hang", ...) or None, so the tests can assert and the bench can count.
"""

from __future__ import annotations

import io
import json
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from urllib.parse import quote

from hypothesis import strategies as st

# --- JSON values ----------------------------------------------------------------------------------
# text with the awkward characters: lone surrogates, NUL, controls, a right-to-left mark, astral
TEXT = st.text(alphabet=st.one_of(st.characters(), st.sampled_from("\ud800\udfff\x00\n\u202e\U0001f600 ")),
               max_size=40)
NUMBERS = st.one_of(st.integers(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 0.5, 1e308, -0.0]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)


def dumps(value) -> bytes:
    """JSON as a client would send it: non-ASCII escaped (so lone surrogates become \\udXXX),
    NaN and Infinity written as Python writes them (not JSON: the server must refuse them)."""
    return json.dumps(value, ensure_ascii=True).encode()


WORDS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip)


def bodies(required: dict, optional: dict):
    """A route's bodies: valid ones (so replies get generated), valid ones with one field's value
    replaced by any JSON, and any JSON object."""
    valid = st.fixed_dictionaries(required, optional=optional)
    names = sorted({*required, *optional, "unknown_field"})
    one_bad = st.tuples(valid, st.sampled_from(names), JSON).map(lambda t: {**t[0], t[1]: t[2]})
    return st.one_of(valid, one_bad, one_bad, st.dictionaries(st.sampled_from(names), JSON, max_size=4),
                     st.dictionaries(TEXT, JSON, max_size=3))


TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": WORDS})
CONTENT = st.one_of(WORDS, WORDS, st.lists(TEXT_PART, min_size=1, max_size=3))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                 "content": CONTENT})
LAST = st.fixed_dictionaries({"role": st.just("user"), "content": CONTENT})
DECODE_FIELDS = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 100),
    "repetition_penalty": st.floats(0.5, 3), "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2), "no_repeat_ngram": st.integers(0, 4),
    "seed": st.integers(-(2**63), 2**63 - 1), "stop": st.one_of(WORDS, st.lists(WORDS, min_size=1, max_size=4)),
    "max_tokens": st.integers(1, 4), "num_candidates": st.integers(1, 3), "beam_size": st.integers(1, 3),
    "candidates": st.sampled_from(["beam", "sample"]), "scorer": st.just("logprob"),
    "length_penalty": st.floats(0, 10),
}
CHAT_BODY = bodies({"messages": st.tuples(st.lists(MESSAGE, max_size=2), LAST).map(lambda t: [*t[0], t[1]])}, {
    "model": st.sampled_from(["tiny-chat", "default", "dialogen"]), "n": st.integers(1, 3),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_completion_tokens": st.integers(1, 4), "tools": st.just([]), "tool_choice": st.just("none"),
    "response_format": st.just({"type": "text"}),
    **DECODE_FIELDS})
SESSION_BODY = bodies({}, {"persona": st.one_of(WORDS, st.sampled_from(["pirate", "You are kind."])),
                           "title": WORDS, "settings": st.fixed_dictionaries({}, optional=DECODE_FIELDS)})
TURN_BODY = bodies({"content": CONTENT}, {"stream": st.booleans(), **DECODE_FIELDS})
TEXT_BODY = bodies({"prompt": st.one_of(WORDS, st.lists(WORDS, min_size=1, max_size=2))}, {
    "model": st.sampled_from(["tiny-chat", "gpt-3.5-turbo-instruct"]), "n": st.integers(1, 2),
    "stream": st.booleans(), "logprobs": st.integers(0, 5), "echo": st.just(False),
    **{k: v for k, v in DECODE_FIELDS.items() if k not in ("num_candidates", "beam_size")}})
FEEDBACK_BODY = bodies({"rating": st.sampled_from(["up", "down"])}, {"comment": WORDS, "variant": st.integers(0, 3)})
REGENERATE_BODY = bodies({}, {"stream": st.booleans(), **DECODE_FIELDS})
PICK_BODY = bodies({"chosen": st.integers(0, 3), "rejected": st.integers(0, 3)}, {})

# a body: a route's fields, any JSON at all, or bytes that may not be JSON (or UTF-8) at all
RAW = st.one_of(st.binary(max_size=60), st.sampled_from([b"", b"{", b"[]", b'{"a": NaN}', b"[" * 5000,
                                                         b'{"seed": 1' + b"0" * 5000 + b"}"]))


def body_for(fields):
    return st.one_of(fields.map(dumps), fields.map(dumps), fields.map(dumps), JSON.map(dumps), RAW)


CONTENT_TYPES = st.sampled_from(["application/json"] * 6 + ["application/json; charset=utf-8", "text/plain",
                                                           "application/x-www-form-urlencoded", ""])
SESSION_ID = st.one_of(st.just("{sid}"), st.just("{sid}"), st.just("sess_0123"), st.just("..%2F..%2Fhealth"),
                       TEXT.map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")))
MESSAGE_INDEX = st.one_of(st.sampled_from(["0", "1", "2", "3", "5", "0x1", "-1", "99999999999", "1.0"]),
                          TEXT.map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")))


def _feedback_route(what: str, fields):
    """POST /v1/sessions/{id}/messages/{n}/{what}: a rating, a regenerated reply or a pick."""
    return st.tuples(st.just("POST"), st.tuples(SESSION_ID, MESSAGE_INDEX).map(
        lambda t: f"/v1/sessions/{t[0]}/messages/{t[1]}/{what}"), body_for(fields), CONTENT_TYPES)


REQUEST = st.one_of(
    st.tuples(st.just("POST"), st.sampled_from(["/v1/chat/completions", "/chat/completions"]), body_for(CHAT_BODY),
              CONTENT_TYPES),
    st.tuples(st.just("POST"), st.sampled_from(["/v1/completions", "/completions"]), body_for(TEXT_BODY),
              CONTENT_TYPES),
    st.tuples(st.just("POST"), st.just("/v1/sessions"), body_for(SESSION_BODY), CONTENT_TYPES),
    st.tuples(st.just("POST"), SESSION_ID.map(lambda s: f"/v1/sessions/{s}/messages"), body_for(TURN_BODY),
              CONTENT_TYPES),
    st.tuples(st.sampled_from(["GET", "DELETE", "HEAD", "OPTIONS", "PUT"]),
              st.one_of(SESSION_ID.map(lambda s: f"/v1/sessions/{s}"), st.sampled_from(
                  ["/v1/sessions", "/v1/models", "/models", "/v1/models/tiny-chat", "/health", "/", "/v1/nothing"])),
              st.just(b""), st.just("")),
    _feedback_route("feedback", FEEDBACK_BODY),
    _feedback_route("regenerate", REGENERATE_BODY),
    _feedback_route("preference", PICK_BODY),
)


def check_request(server, sid: str, req, timeout: float = 60.0) -> str | None:
    """One request against the in-process app: None, or "5xx"/"hang"/"not json"/"error shape"."""
    method, path, body, ctype = req
    if method == "DELETE" and "{sid}" in path:  # delete a session of its own: the others' turns need theirs
        sid = server.request("POST", "/v1/sessions", json={}).json()["id"]
    path = path.replace("{sid}", sid)
    headers = {"Content-Type": ctype} if ctype else {}
    try:
        r = server.request(method, path, timeout=timeout, content=body or None, headers=headers)
    except TimeoutError:
        return "hang"
    if r.status_code >= 500:
        return f"5xx: {r.status_code} {r.text[:200]}"
    if r.status_code >= 400 and method != "HEAD":
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"not json: {r.status_code} {r.text[:200]}"
        if set(err) != {"message", "type", "param", "code"} or "\n" in err["message"]:
            return f"error shape: {err}"
    return None


# --- the CLI's readers ----------------------------------------------------------------------------
def _mutated(raw: bytes):
    """Good input with a few bytes spliced in: bad UTF-8, surrogate escapes, structure breakers."""
    inserts = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\ud800", b"\\udfff", b'"', b"\t", b"\n",
                               b"{", b"]", b" EOS ", b"\x00", b"0.5 "])
    return st.tuples(st.integers(0, len(raw)), inserts).map(lambda p: raw[:p[0]] + p[1] + raw[p[0]:])


GOOD_MESSAGES = dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
MESSAGES_FILE = st.one_of(_mutated(GOOD_MESSAGES), _mutated(GOOD_MESSAGES), JSON.map(dumps),
                          st.lists(MESSAGE, max_size=3).map(dumps), RAW)
GOOD_LINE = dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
FORMAT_FILES = {
    "jsonl": st.one_of(st.lists(st.one_of(st.just(GOOD_LINE), _mutated(GOOD_LINE), JSON.map(dumps)), max_size=6)
                       .map(b"\n".join), RAW),
    "tsv": st.one_of(st.lists(st.one_of(st.just(b"hi EOS hello\thow are you"), _mutated(b"1.0 hi EOS 0.0 yo\tok"),
                                        st.binary(max_size=30)), max_size=6).map(b"\n".join), RAW),
    "text": st.one_of(st.lists(st.one_of(st.just(b"hi"), st.just(b""), _mutated(b"hello there"),
                                         st.binary(max_size=20)), max_size=8).map(b"\n".join), RAW),
    "chitchat": st.one_of(JSON.map(dumps), _mutated(dumps({"c1": {"messages": [[{"sender": "a", "text": "hi"}],
                                                                               [{"sender": "b", "text": "yo"}]]}})),
                          RAW),
}
DATA_FILE = st.one_of(*[st.tuples(st.just(fmt), files) for fmt, files in FORMAT_FILES.items()])


def run_cli(argv: list[str], stdin: bytes = b"") -> tuple[int | None, str]:
    """`dialogen ARGV` in this process: (exit code, stderr); code None and the traceback when it raised."""
    from dialogen.cli import main

    err = io.StringIO()
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="surrogateescape")
    try:
        with redirect_stderr(err):
            code = main(argv)
    except BaseException:  # noqa: BLE001 (the point: anything escaping main is a finding)
        return None, traceback.format_exc()
    finally:
        sys.stdin = saved
    return code, err.getvalue()


def check_cli(argv: list[str], stdin: bytes, where: str) -> str | None:
    """A run that should fail on its input (or on the missing model after it): exit 2, one line,
    naming `where` when the input is what was wrong."""
    code, err = run_cli(argv, stdin)
    if code is None:
        return f"traceback: {err.strip().splitlines()[-1]}"
    lines = err.strip().splitlines()  # notes first (--skip-bad's count of skipped lines), then the error
    notes_ok = all(line.startswith("dialogen: skipped ") for line in lines[:-1])
    if code != 2 or not lines or not notes_ok or not lines[-1].startswith("dialogen: error: "):
        return f"exit {code}: {err[:300]!r}"
    if "no such model" not in lines[-1] and where not in lines[-1]:
        return f"does not name {where}: {lines[-1]}"
    return None


def check_messages_file(tmp: Path, raw: bytes, via_stdin: bool) -> str | None:
    path = tmp / "messages.json"
    path.write_bytes(raw)
    missing = str(tmp / "no-such-model")
    if via_stdin:
        return check_cli(["generate", "-", "--model", missing], raw, "<stdin>")
    return check_cli(["generate", str(path), "--model", missing], b"", str(path))


def check_data_file(tmp: Path, fmt: str, raw: bytes, skip_bad: bool) -> str | None:
    path = tmp / f"data.{fmt}"
    path.write_bytes(raw)
    out = tmp / "run"
    argv = ["train", "--data", str(path), "--format", fmt, "--out", str(out), "--init", str(tmp / "no-such-model"),
            "--no-progress", *(["--skip-bad"] if skip_bad else [])]
    found = check_cli(argv, b"", str(path))
    if found is None and out.exists():
        return f"left {out} behind"
    return found


def check_chat_stdin(session, raw: bytes) -> str | None:
    """The piped chat loop on `raw`: exit 0, or 2 with one error line (e.g. `<stdin>:2: not valid
    UTF-8`, or a turn too long for the context), never an exception."""
    from dialogen.chat.repl import run

    err = io.StringIO()
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="surrogateescape")
    session.reset()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = run(session, interactive=False)
    except BaseException:  # noqa: BLE001
        return f"traceback: {traceback.format_exc().strip().splitlines()[-1]}"
    finally:
        sys.stdin = saved
    lines = err.getvalue().strip().splitlines()
    if code not in (0, 2) or (code == 2 and not (len(lines) == 1 and lines[0].startswith("dialogen: error: "))):
        return f"exit {code}: {err.getvalue()[:200]!r}"
    return None


CHAT_STDIN = st.one_of(st.lists(st.one_of(st.just(b"hello"), _mutated(b"how are you"), st.binary(max_size=20)),
                                max_size=3).map(b"\n".join), RAW)
