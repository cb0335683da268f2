"""The OpenAI features apps rely on, through the official `openai` client: logprobs (checked
against a direct forward pass of the same weights in transformers), legacy completions and
structured output. Every response is also validated against the client's own types, with
warnings as errors."""

import json
import warnings

import httpx
import openai
import pytest
import torch
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from dialogen.chat.messages import Message
from dialogen.chat.templates import get_template
from dialogen.models.tokenizer import Tokenizer
from dialogen.serve.launch import ServerProcess

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    """float32 decode weights, so a direct float32 forward pass is the reference for logprobs."""
    db = tmp_path_factory.mktemp("openai") / "sessions.db"
    args = ["--model", str(tiny_llama[0]), "--template", "chatml", "--dtype", "float32", "--api-key", KEY,
            "--db", str(db), "--model-name", "tiny", "--max-tokens-limit", "300"]
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def typed(cls, obj):
    """`obj` (a response of the client) validated as `cls` from its JSON, warnings as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cls.model_validate_json(obj.model_dump_json(exclude_unset=True))


def typed_chunk(obj):
    """A streamed legacy completion chunk validated as `Completion`. The client types its chunks as
    `Completion`, whose `finish_reason` cannot be null, yet OpenAI's own stream sends null until a
    choice ends: only that field is let through as null."""
    data = obj.model_dump(exclude_unset=True)
    open_choices = [c["index"] for c in data["choices"] if c["finish_reason"] is None]
    for c in data["choices"]:
        c["finish_reason"] = c["finish_reason"] or "stop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = Completion.model_validate_json(json.dumps(data))
    for c in out.choices:
        if c.index in open_choices:
            c.finish_reason = None
    return out


def _byte_ids(path) -> dict[bytes, int]:
    """Token bytes -> id, from the tokenizer file and transformers' own GPT-2 byte table."""
    from tokenizers import Tokenizer as HF
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    back = {c: b for b, c in bytes_to_unicode().items()}
    hf = HF.from_file(str(path / "tokenizer.json"))
    out = {}
    for piece, i in hf.get_vocab(with_added_tokens=False).items():
        out[bytes(back[c] for c in piece)] = i
    return out


def _reference(model, prompt: list[int], reply: list[int], temperature: float, rep: float, freq: float,
               pres: float, window: int = 64) -> torch.Tensor:
    """(len(reply), V) log-softmax of each step's logits after the penalties and the temperature,
    from one forward pass of the transformers model."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1: len(prompt) + len(reply) - 1]
    rows = []
    for t, row in enumerate(logits.float()):
        row = row.clone()
        seen = sorted(set((prompt + reply[:t])[-window:]))
        row[seen] = torch.where(row[seen] > 0, row[seen] / rep, row[seen] * rep)
        counts = torch.bincount(torch.tensor(reply[:t], dtype=torch.long), minlength=row.shape[0]).float()
        row = row - freq * counts - pres * (counts > 0).float()
        rows.append(torch.log_softmax(row / temperature, dim=-1))
    return torch.stack(rows)


def _check_logprobs(content, ids, ref, k):
    reply = [ids[bytes(item.bytes)] for item in content]
    for t, item in enumerate(content):
        assert abs(item.logprob - float(ref[t, reply[t]])) < 1e-4
        assert len(item.top_logprobs) == k
        for alt in item.top_logprobs:
            assert abs(alt.logprob - float(ref[t, ids[bytes(alt.bytes)]])) < 1e-4
        best = torch.topk(ref[t], k).values
        assert max(abs(a.logprob - float(b)) for a, b in zip(item.top_logprobs, best)) < 1e-4
    return reply


def test_logprobs_equal_a_direct_forward_pass(client, tiny_llama):
    """Two choices decoded together in the server's batched step; plain and streamed."""
    path, hf_model = tiny_llama
    tok = Tokenizer.from_dir(path)
    prompt = get_template("chatml", tok).render(tok, [Message("user", "Tell me a story.")],
                                                add_generation_prompt=True)[0]
    ids = _byte_ids(path)
    settings = dict(temperature=0.7, frequency_penalty=0.4, presence_penalty=-0.3, seed=11, max_tokens=12)
    extra = {"repetition_penalty": 1.3}
    args = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}], logprobs=True,
                top_logprobs=5, n=2, extra_body=extra, **settings)
    r = typed(ChatCompletion, client.chat.completions.create(**args))
    replies = []
    for choice in r.choices:
        content = choice.logprobs.content
        assert len(content) == r.usage.completion_tokens // 2 or choice.finish_reason == "stop"
        reply = [ids[bytes(item.bytes)] for item in content]
        ref = _reference(hf_model, prompt, reply, 0.7, 1.3, 0.4, -0.3)
        _check_logprobs(content, ids, ref, 5)
        assert "".join(bytes(i.bytes).decode("utf-8", "replace") for i in content).startswith(
            choice.message.content[:1])
        replies.append(reply)
    assert replies[0] != replies[1]  # seed + index: the rows differ
    chunks = [typed(ChatCompletionChunk, c) for c in client.chat.completions.create(stream=True, **args)]
    for index, choice in enumerate(r.choices):
        streamed = [item for c in chunks for ch in c.choices if ch.index == index and ch.logprobs
                    for item in ch.logprobs.content]
        plain = choice.logprobs.content  # the streamed request reuses the kept prompt cache: equal up to rounding
        assert [i.bytes for i in streamed] == [i.bytes for i in plain]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, plain)) < 1e-4


def test_logprobs_greedy_and_without_alternatives(client, tiny_llama):
    """At temperature 0 the values are the penalised logits at temperature 1; top_logprobs 0 lists none."""
    path, hf_model = tiny_llama
    tok = Tokenizer.from_dir(path)
    prompt = get_template("chatml", tok).render(tok, [Message("user", "hi")], add_generation_prompt=True)[0]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                       temperature=0, max_tokens=6, extra_body={"repetition_penalty": 1.0})
    content = typed(ChatCompletion, r).choices[0].logprobs.content
    ids = _byte_ids(path)
    reply = [ids[bytes(item.bytes)] for item in content]
    ref = _reference(hf_model, prompt, reply, 1.0, 1.0, 0.0, 0.0)
    for t, item in enumerate(content):
        assert item.top_logprobs == [] and abs(item.logprob - float(ref[t].max())) < 1e-4
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("body,param", [({"top_logprobs": 3}, "top_logprobs"),
                                        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                        ({"logprobs": 1}, "logprobs"),
                                        ({"logprobs": True, "beam_size": 2}, "logprobs")])
def test_bad_logprobs_requests(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body={"messages": [{"role": "user", "content": "hi"}], **body},
                    cast_to=object)
    assert e.value.body["param"] == param


def test_legacy_completion_plain_and_streamed(client, tiny_llama):
    """A plain prompt, no template: greedy tokens equal transformers' own greedy generation."""
    path, hf_model = tiny_llama
    prompt = "Once upon a time, in a land far away,"
    ids = Tokenizer.from_dir(path).encode_template(prompt)
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)[0, len(ids):].tolist()
    args = dict(model="gpt-3.5-turbo-instruct", prompt=prompt, max_tokens=10, temperature=0,
                extra_body={"repetition_penalty": 1.0})
    r = typed(Completion, client.completions.create(**args))
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert r.choices[0].text == Tokenizer.from_dir(path).decode(want) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    chunks = [typed_chunk(c) for c in client.completions.create(stream=True, stream_options={
        "include_usage": True}, **args)]
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10


def test_legacy_completion_stop_prompts_and_logprobs(client, server):
    full = client.completions.create(model="tiny", prompt="The cat", max_tokens=12, temperature=0).choices[0].text
    word = full.split()[2]
    cut = client.completions.create(model="tiny", prompt="The cat", max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].text == full[: full.index(word)] and cut.choices[0].finish_reason == "stop"
    many = typed(Completion, client.completions.create(model="tiny", prompt=["The cat", "A dog"], n=2, max_tokens=4,
                                                       temperature=1.0, seed=7, logprobs=3))
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text != many.choices[1].text  # seed + index
    lp = many.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 3 and max(t.values()) >= v for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == many.choices[0].text
    bare = httpx.post(server.url + "/completions", json={"prompt": "hi", "max_tokens": 2},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert bare.status_code == 200 and bare.json()["object"] == "text_completion"


@pytest.mark.parametrize("body,param", [({}, "prompt"), ({"prompt": ""}, "prompt[0]"), ({"prompt": 5}, "prompt"),
                                        ({"prompt": "hi", "echo": True}, "echo"),
                                        ({"prompt": "hi", "best_of": 3}, "best_of"),
                                        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
                                        ({"prompt": "hello " * 300}, "prompt")])
def test_legacy_completion_bad_input(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/completions", body=body, cast_to=object)
    assert e.value.body["param"] == param and "\n" not in e.value.body["message"]


def test_response_format_on_completions_and_session_turns(client, server):
    """A random tiny model never closes JSON on its own: the budget's closing path does."""
    for max_tokens in (5, 17):
        r = client.completions.create(model="tiny", prompt="JSON:", max_tokens=max_tokens, temperature=1.0, seed=2,
                                      extra_body={"response_format": {"type": "json_object"}})
        assert isinstance(json.loads(r.choices[0].text), dict) and r.choices[0].finish_reason == "stop"
    for search in ({"beam_size": 2}, {"num_candidates": 2, "candidates": "sample", "temperature": 1.0}):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON?"}],
                                           max_tokens=9, response_format={"type": "json_object"}, extra_body=search)
        assert all(isinstance(json.loads(c["text"]), dict) for c in r.choices[0].model_extra["candidates"])
    schema = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "flag", "schema": schema}}
    s = client.post("/sessions", body={"settings": {"response_format": fmt, "max_tokens": 12}}, cast_to=object)
    for text in ("Is it on?", "And now?"):
        turn = client.post(f"/sessions/{s['id']}/messages", body={"content": text, "temperature": 1.0},
                           cast_to=object)
        assert isinstance(json.loads(turn["message"]["content"])["ok"], bool)
    plain = client.post(f"/sessions/{s['id']}/messages", body={"content": "Say hi.", "max_tokens": 4,
                                                               "response_format": {"type": "text"}}, cast_to=object)
    assert plain["finish_reason"] == "length" and not plain["message"]["content"].startswith("{")


def test_models_and_streamed_usage_match_the_client_types(client):
    assert [typed(Model, m).id for m in client.models.list().data] == ["tiny"]
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True, stream_options={"include_usage": True}))
    typed_chunks = [typed(ChatCompletionChunk, c) for c in chunks]
    assert typed_chunks[-1].choices == [] and typed_chunks[-1].usage.completion_tokens >= 1
