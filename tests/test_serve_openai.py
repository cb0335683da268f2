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
from openai.types import Completion
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
