"""`dialogen serve` on a tiny model, driven by the official `openai` client (raw httpx where the
client cannot send the malformed body): completions, streaming, sessions, auth, bad input."""

import json

import httpx
import openai
import pytest

from dialogen.chat.messages import Message
from dialogen.chat.templates import get_template
from dialogen.models.tokenizer import Tokenizer
from dialogen.serve.launch import ServerProcess

K1, K2 = "key-one", "key-two"
BODY_LIMIT = 20_000
ORIGIN = "http://app.example:3000"


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    db = tmp_path_factory.mktemp("serve") / "sessions.db"
    args = ["--model", str(tiny_llama[0]), "--template", "chatml", "--api-key", K1, "--api-key", K2,
            "--db", str(db), "--model-name", "tiny-chat", "--model-alias", "tiny-alias", "--max-body-bytes", str(BODY_LIMIT),
            "--max-tokens-limit", "200",
            "--allowed-host", "chat.internal", "--cors-origin", ORIGIN]
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=K1, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def _prompt_tokens(path, messages):
    tok = Tokenizer.from_dir(path)
    return len(get_template("chatml", tok).render(tok, messages, add_generation_prompt=True)[0])


def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-chat", "tiny-alias"] and models[0].owned_by == "dialogen"
    health = server.health()
    assert health["status"] == "ok" and health["context_length"] == 256


def test_plain_completion_with_usage(client, model_id, tiny_llama):
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hello there!"}]
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=7, temperature=0)
    assert r.object == "chat.completion" and r.model == model_id and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.index == 0
    want = _prompt_tokens(tiny_llama[0], [Message("system", "Be nice."), Message("user", "Hello there!")])
    assert r.usage.prompt_tokens == want
    assert c.finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 7
    assert r.usage.total_tokens == want + r.usage.completion_tokens


def test_streaming_equals_plain(client, model_id):
    args = dict(model=model_id, messages=[{"role": "user", "content": "Tell me about cats."}], max_tokens=25,
                temperature=0)
    plain = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(chunks) > 5 and text == plain.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stateless_turns_reuse_the_kept_prompt_cache(client, model_id):
    """A client resending the whole conversation: the second turn's usage says the first turn's
    prompt came from the kept KV cache."""
    msgs = [{"role": "system", "content": "You are a sailor."}, {"role": "user", "content": "Ahoy there, sailor!"}]
    first = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=5, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    msgs += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "Where to?"}]
    second = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=5, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens


def test_raw_stream_is_server_sent_events_ending_with_done(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {K1}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_n_choices_and_seed(client, model_id):
    args = dict(model=model_id, messages=[{"role": "user", "content": "Pick a word."}], max_tokens=8,
                temperature=1.0, seed=123, n=2)
    a = client.chat.completions.create(**args)
    b = client.chat.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # a seed repeats
    assert a.choices[0].message.content != a.choices[1].message.content  # choices differ
    assert 2 <= a.usage.completion_tokens <= 16  # counted over both choices


def test_stop_string_cuts_the_reply(client, model_id):
    args = dict(model=model_id, messages=[{"role": "user", "content": "Say something long."}], max_tokens=30,
                temperature=0)
    full = client.chat.completions.create(**args).choices[0].message.content
    word = full.split()[3]
    cut = client.chat.completions.create(stop=[word], **args).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(word)]


@pytest.mark.parametrize("search", [{"num_candidates": 3, "candidates": "sample", "temperature": 1.0, "seed": 5},
                                    {"num_candidates": 2, "beam_size": 2}])
def test_candidates_with_scores(client, model_id, search):
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi!"}], max_tokens=6,
                                       extra_body=search)
    choice = r.choices[0]
    cands = choice.model_extra["candidates"]
    assert len(cands) == search["num_candidates"]
    best = max(cands, key=lambda c: c["score"])
    assert best["winner"] and sum(c["winner"] for c in cands) == 1
    assert best["text"] == choice.message.content and best["score"] == best["scores"]["score"]
    assert r.usage.completion_tokens == best["tokens"]


def _session(client, path, body=None, method="post"):
    fn = getattr(client, method)
    return fn(f"/sessions{path}", cast_to=object, **({"body": body} if method == "post" else {}))


def test_session_over_several_turns(client, server):
    s = _session(client, "", {"persona": "You are a pirate.", "settings": {"temperature": 0, "max_tokens": 6}})
    assert s["object"] == "session" and s["messages"] == [] and s["persona"] == "You are a pirate."
    replies, cached = [], []
    for text in ["Ahoy!", "Where is the treasure?", "Thanks, matey."]:
        t = _session(client, f"/{s['id']}/messages", {"content": text})
        assert t["object"] == "session.turn" and t["session_id"] == s["id"]
        replies.append(t["message"]["content"])
        cached.append(t["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == 0 and cached[1] > 10 and cached[2] > cached[1]  # later turns reuse the KV cache
    stream = client.post(f"/sessions/{s['id']}/messages", body={"content": "Bye", "stream": True},
                         cast_to=object, stream=True, stream_cls=openai.Stream[object])
    streamed = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in stream if ch.get("choices"))
    got = _session(client, f"/{s['id']}", method="get")
    assert [(m["role"], m["content"]) for m in got["messages"]] == [
        ("user", "Ahoy!"), ("assistant", replies[0]), ("user", "Where is the treasure?"), ("assistant", replies[1]),
        ("user", "Thanks, matey."), ("assistant", replies[2]), ("user", "Bye"), ("assistant", streamed)]
    ranked = _session(client, f"/{s['id']}/messages", {"content": "Pick one.", "num_candidates": 2,
                                                         "candidates": "sample", "temperature": 1.0})
    assert len(ranked["candidates"]) == 2 and ranked["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    got = _session(client, f"/{s['id']}", method="get")
    assert got["messages"][-1]["content"] == ranked["message"]["content"]
    assert got["messages"][-1]["candidates"] == ranked["candidates"]  # stored with the turn
    listed = _session(client, "", method="get")["data"]
    assert any(x["id"] == s["id"] and x["message_count"] == 10 and x["title"] == "Ahoy!" for x in listed)
    assert _session(client, f"/{s['id']}", method="delete")["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        _session(client, f"/{s['id']}", method="get")


def test_auth_required_and_sessions_belong_to_their_key(server, client, model_id):
    msgs = [{"role": "user", "content": "hi"}]
    for key in ("wrong-key", ""):
        other = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            other = other.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            other.chat.completions.create(model=model_id, messages=msgs, max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    s = _session(client, "", {"persona": "secret persona"})
    second = openai.OpenAI(base_url=server.url + "/v1", api_key=K2, max_retries=0)
    for path, method, body in [("", "get", None), ("/messages", "post", {"content": "hi"}), ("", "delete", None)]:
        with pytest.raises(openai.NotFoundError) as e:
            _session(second, f"/{s['id']}{path}", body, method)
        assert "secret" not in str(e.value.body)
    assert all(x["id"] != s["id"] for x in _session(second, "", method="get")["data"])
    assert _session(client, f"/{s['id']}", method="get")["persona"] == "secret persona"  # untouched


BAD = [
    ("missing messages", {"model": "tiny-chat"}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("empty content", {"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ("blank content", {"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
    ("number content", {"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ("object content", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ("last a system message", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "messages[1].role"),
    ("max_tokens zero", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
    ("max_tokens over limit", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, "max_tokens"),
    ("max_tokens string", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}, "max_tokens"),
    ("context over limit", {"messages": [{"role": "user", "content": "hello " * 400}]}, "messages"),
    ("prompt + max_tokens over", {"messages": [{"role": "user", "content": "hello " * 100}], "max_tokens": 200},
     "messages"),
    ("temperature", {"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ("top_p zero", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ("penalty below -2", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -2.5},
     "presence_penalty"),
    ("penalty above 2", {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.01},
     "frequency_penalty"),
    ("tool_choice required", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     "tool_choice"),
    ("grammar", {"messages": [{"role": "user", "content": "hi"}], "grammar": "root ::= \"yes\""}, "grammar"),
    ("logit_bias beyond the vocabulary", {"messages": [{"role": "user", "content": "hi"}],
                                          "logit_bias": {"99999999": 5}}, "logit_bias"),
    ("logit_bias above 100", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"42": 101}},
     "logit_bias.42"),
    ("n too big", {"messages": [{"role": "user", "content": "hi"}], "n": 50}, "n"),
    ("stop not strings", {"messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}, "stop"),
    ("a tool without its function", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "tools[0].function"),
    ("num_candidates zero", {"messages": [{"role": "user", "content": "hi"}], "num_candidates": 0}, "num_candidates"),
    ("unknown scorer", {"messages": [{"role": "user", "content": "hi"}], "scorer": "vibes"}, "scorer"),
    ("mmi without a reverse model", {"messages": [{"role": "user", "content": "hi"}], "num_candidates": 2,
                                     "scorer": "mmi"}, "scorer"),
    ("role an object", {"messages": [{"role": {"name": "user"}, "content": "hi"}]}, "messages[0].role"),
    ("role a list", {"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role"),
    ("message a string", {"messages": ["hi"]}, "messages[0]"),
    ("seed beyond 64 bits", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, "seed"),
    ("seed a float", {"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, "seed"),
    ("n a boolean", {"messages": [{"role": "user", "content": "hi"}], "n": True}, "n"),
    ("stream a number", {"messages": [{"role": "user", "content": "hi"}], "stream": 1}, "stream"),
    ("stream_options a list", {"messages": [{"role": "user", "content": "hi"}], "stream_options": []},
     "stream_options"),
    ("five stops", {"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, "stop"),
    ("model a number", {"messages": [{"role": "user", "content": "hi"}], "model": 3}, "model"),
]


@pytest.mark.parametrize("name,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_400(client, name, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body=body, cast_to=object)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"] and "\n" not in err["message"]
    if name.startswith(("context", "prompt")):
        assert err["code"] == "context_length_exceeded"


def test_bad_input_through_the_typed_client(client, model_id):
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=model_id, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError, match="only text content is supported") as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": image}])
    assert e.value.body["param"] == "messages[0].content"


def test_any_model_name_is_answered_by_the_served_model(client):
    """langchain's default name, for one: the reply says which model answered."""
    for name in ("gpt-3.5-turbo", "tiny-alias"):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.model == "tiny-chat" and r.choices[0].message.content is not None
    assert client.models.retrieve("gpt-4o").id == "tiny-chat"
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"


def test_strict_model_names_restore_the_404(tiny_llama, tmp_path):
    from inprocess import InProcessServer

    srv = InProcessServer(tiny_llama[0], tmp_path / "s.db", aliases=["chat-alias"], strict_model_names=True)
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        r = srv.request("POST", "/v1/chat/completions", json={**body, "model": "gpt-4o"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "'tiny-chat', 'chat-alias'" in r.json()["error"]["message"]
        assert srv.request("GET", "/v1/models/gpt-4o").status_code == 404
        for name in ("tiny-chat", "chat-alias"):
            ok = srv.request("POST", "/v1/chat/completions", json={**body, "model": name})
            assert ok.status_code == 200 and ok.json()["model"] == "tiny-chat"
        assert [m["id"] for m in srv.request("GET", "/models").json()["data"]] == ["tiny-chat", "chat-alias"]
    finally:
        srv.close()


def test_a_base_url_without_v1_works(server, model_id):
    bare = openai.OpenAI(base_url=server.url, api_key=K1, max_retries=0, timeout=60)
    assert [m.id for m in bare.models.list().data] == ["tiny-chat", "tiny-alias"]
    r = bare.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.object == "chat.completion" and r.choices[0].message.content is not None
    streamed = list(bare.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True))
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")
    assert httpx.post(server.url + "/chat/completions", json={}).status_code == 401  # they need the key too
    assert httpx.get(server.url + "/models").status_code == 401


def test_unknown_fields_are_ignored_and_named_in_a_header(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "mirostat": 2, "user": "u1",
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none",
            "presence_penalty": -2, "frequency_penalty": -0.5}
    for stream in (False, True):
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": stream},
                       headers={"Authorization": f"Bearer {K1}"}, timeout=60)
        assert r.status_code == 200
        assert r.headers["x-dialogen-ignored-fields"] == "mirostat, user"  # tools are read (not called: "none")
    plain = httpx.post(server.url + "/v1/chat/completions", json={"messages": body["messages"], "max_tokens": 1},
                       headers={"Authorization": f"Bearer {K1}"}, timeout=60)
    assert plain.status_code == 200 and "x-dialogen-ignored-fields" not in plain.headers


def _raw(server, content: bytes, headers=None):
    h = {"Authorization": f"Bearer {K1}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + "/v1/chat/completions", content=content, headers=h, timeout=30)


@pytest.mark.parametrize("raw,code", [
    (b'{"messages": [{"role": "user", "content": "hi"}', "invalid_json"),
    (b"", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8"),
])
def test_malformed_bodies(server, raw, code):
    r = _raw(server, raw)
    assert r.status_code == 400 and r.json()["error"]["code"] == code


HI = b'"messages": [{"role": "user", "content": "hi"}]'
EDGE = [
    ("surrogate in content", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content",
     "invalid_string"),
    ("surrogate in a text part", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text", "invalid_string"),
    ("surrogate in stop", b'{' + HI + b', "stop": ["a", "\\udc00"]}', "stop[1]", "invalid_string"),
    ("surrogate in a key", b'{' + HI + b', "\\ud83d": 1}', None, "invalid_string"),
    ("NaN", b'{' + HI + b', "temperature": NaN}', None, "invalid_json"),
    ("Infinity", b'{' + HI + b', "top_p": -Infinity}', None, "invalid_json"),
    ("overflowing float", b'{' + HI + b', "temperature": 1e400}', "temperature", None),
    ("5000-digit integer", b'{' + HI + b', "seed": ' + b"9" * 5000 + b'}', None, "invalid_json"),
    ("nested 40 deep", b'{' + HI + b', "x": ' + b"[" * 40 + b"]" * 40 + b'}', None, "invalid_json"),
    ("nested 5000 deep", b'{' + HI + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b'}', None, "invalid_json"),
]


@pytest.mark.parametrize("name,raw,param,code", EDGE, ids=[e[0] for e in EDGE])
def test_bad_values_rejected_at_the_edge(server, name, raw, param, code):
    """Lone surrogates, non-finite numbers, huge integers and deep nesting: a 400 naming the field."""
    r = _raw(server, raw)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and "\n" not in err["message"]
    assert err["param"] == param and err["code"] == code


def test_bad_content_length_gets_a_json_error(server):
    import socket

    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 12x\r\n\r\n{}")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "invalid_http"
    assert server.health()["status"] == "ok"


def test_oversize_body_is_413_and_server_keeps_serving(server, client, model_id):
    big = {"model": model_id, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}
    with pytest.raises(openai.APIStatusError) as e:
        client.post("/chat/completions", body=big, cast_to=object)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(BODY_LIMIT // 1000 + 1):
            yield b"y" * 1000
        yield b'"}]}'
    r = _raw(server, chunked())
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    ok = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "still there?"}],
                                        max_tokens=3)
    assert ok.choices[0].message.content is not None and server.health()["status"] == "ok"


def test_web_page_and_unknown_routes(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("app.js", "style.css"):
        assert f"/static/{asset}" in page.text
        assert httpx.get(f"{server.url}/static/{asset}").status_code == 200
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {K1}"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    listed = r.json()["error"]["message"]
    for route in ("POST /v1/chat/completions", "POST /chat/completions", "GET /v1/models", "GET /models",
                  "POST /v1/sessions", "GET /health"):
        assert route in listed


def test_cli_refuses_public_host_without_keys_and_bad_key_files(tmp_path, capsys):
    from dialogen.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--insecure" in err and len(err.strip().splitlines()) == 1
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\ngood-key\nbad key\n")
    assert main(["serve", "--api-keys-file", str(keys)]) == 2
    assert f"{keys}:3" in capsys.readouterr().err
    assert main(["serve", "--max-active", "0"]) == 2
    assert "--max-active" in capsys.readouterr().err


def test_cli_without_fastapi_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from dialogen.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve"]) == 2
    assert "pip install 'dialogen[serve]'" in capsys.readouterr().err


SESSION_BAD = [
    ("missing content", {}, "content"),
    ("seed beyond 64 bits", {"content": "hi", "seed": 2**70}, "seed"),
    ("content an object", {"content": {"text": "hi"}}, "content"),
    ("empty content", {"content": ""}, "content"),
    ("list content", {"content": ["a", "b"]}, "content"),
    ("max_tokens zero", {"content": "hi", "max_tokens": 0}, "max_tokens"),
    ("over the context", {"content": "hello " * 400}, "content"),
]


@pytest.mark.parametrize("name,body,param", SESSION_BAD, ids=[b[0] for b in SESSION_BAD])
def test_session_turn_bad_input(client, name, body, param):
    s = _session(client, "", {})
    with pytest.raises(openai.BadRequestError) as e:
        _session(client, f"/{s['id']}/messages", body)
    assert e.value.body["param"] == param
    assert _session(client, f"/{s['id']}", method="get")["messages"] == []  # nothing stored


@pytest.mark.parametrize("body,param", [({"settings": {"temperature": -1}}, "settings.temperature"),
                                        ({"settings": {"colour": "red"}}, "settings.colour"),
                                        ({"settings": {"seed": -(2**63) - 1}}, "settings.seed"),
                                        ({"settings": {"stop": [""]}}, "settings.stop"),
                                        ({"settings": []}, "settings"),
                                        ({"persona": 7}, "persona"),
                                        ({"persona": ["a"]}, "persona"),
                                        ({"title": {"a": 1}}, "title")])
def test_session_create_bad_input(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        _session(client, "", body)
    assert e.value.body["param"] == param


def test_session_persona_with_a_lone_surrogate_is_refused_and_sessions_still_work(server, client):
    r = httpx.post(server.url + "/v1/sessions", content=b'{"persona": "pirate \\ud800"}',
                   headers={"Authorization": f"Bearer {K1}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "persona"
    s = _session(client, "", {"settings": {"seed": 2**63 - 1, "max_tokens": 3}})  # the largest seed is fine
    for text in ("one", "two"):
        assert _session(client, f"/{s['id']}/messages", {"content": text})["finish_reason"] in ("stop", "length")


def _get(server, path, headers=None, method="GET"):
    return httpx.request(method, server.url + path, headers=headers or {}, timeout=30)


@pytest.mark.parametrize("path", ["/health", "/", "/v1/models"])
def test_foreign_host_gets_403(server, path):
    """DNS rebinding: a page whose name now points at 127.0.0.1 sends its own name as Host."""
    port = server.url.rsplit(":", 1)[1]
    auth = {"Authorization": f"Bearer {K1}"}
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        r = _get(server, path, {"Host": host, **auth})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "chat.internal", f"CHAT.internal:{port}"):
        assert _get(server, path, {"Host": host, **auth}).status_code == 200


def test_cross_origin_requests_refused_unless_listed(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    auth = {"Authorization": f"Bearer {K1}"}
    for origin in ("http://evil.example", "null", "http://app.example:3001", "https://app.example:3000"):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Origin": origin, **auth}, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in r.headers
    same = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Origin": server.url, **auth},
                      timeout=60)
    assert same.status_code == 200  # the page's own origin
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert pre.headers["access-control-allow-headers"] == "authorization, content-type"
    listed = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Origin": ORIGIN, **auth}, timeout=60)
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == ORIGIN
    unauthorized = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN})
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   None])
def test_post_bodies_must_be_json(server, ctype):
    """A form or a text/plain fetch (which needs no preflight) cannot reach the API."""
    h = {"Authorization": f"Bearer {K1}", **({"Content-Type": ctype} if ctype else {})}
    raw = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    for path in ("/v1/chat/completions", "/v1/sessions"):
        r = httpx.post(server.url + path, content=raw, headers=h, timeout=30)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(server.url + "/v1/sessions", content=b"{}", headers={
        "Authorization": f"Bearer {K1}", "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_head_and_options_answer_and_health_hides_activity_without_a_key(server):
    assert _get(server, "/health", method="HEAD").status_code == 200
    assert _get(server, "/v1/models", {"Authorization": f"Bearer {K1}"}, "HEAD").status_code == 200
    assert _get(server, "/v1/models", method="HEAD").status_code == 401
    plain = _get(server, "/v1/sessions", method="OPTIONS")
    assert plain.status_code == 204 and "POST" in plain.headers["allow"]
    public = _get(server, "/health").json()
    assert public["status"] == "ok" and public["model"] == "tiny-chat"
    assert not {"worker", "live_sessions", "kv_cache_bytes", "evictions"} & set(public)
    wrong = _get(server, "/health", {"Authorization": "Bearer nope"}).json()
    assert "worker" not in wrong
    full = _get(server, "/health", {"Authorization": f"Bearer {K2}"}).json()
    assert full["worker"]["max_active"] == 32 and "live_sessions" in full


def test_cli_checks_cors_origins_and_allowed_hosts(capsys):
    from dialogen.cli import main

    for flags in (["--cors-origin", "app.example"], ["--cors-origin", "http://app.example/page"],
                  ["--allowed-host", "http://x"]):
        assert main(["serve", *flags]) == 2
        err = capsys.readouterr().err
        assert flags[0] in err and len(err.strip().splitlines()) == 1
