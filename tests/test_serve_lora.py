"""Several LoRA adapters on one served base (`serve --lora-modules NAME=DIR`): the request's model
name picks the adapter, replies of the base and of every adapter share the batched step, each
reply equals the one `dialogen.load(model, adapter=...)` gives, and kept KV caches never cross
adapters."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import dialogen
from dialogen.cli import main
from dialogen.models.kernels import library
from dialogen.models.lora import Adapter, LoraSettings, default_targets
from dialogen.models.lora_set import read_adapter_set
from dialogen.models.loading import load
from dialogen.serve.batching import step_rows
from dialogen.serve.launch import ServerProcess
from dialogen.training import checkpoint

TOKENS = 16


def _adapter(base_path, out, targets, seed: int, template: str | None = None):
    """A rank-4 adapter with random A and B (B nonzero, so it changes the replies), in PEFT's files;
    with `template`, written as `dialogen train --lora-r` writes its checkpoints (with the tokenizer
    and a dialogen.json naming the template it trained)."""
    loaded = load(str(base_path), "float32")
    cfg = loaded.model.cfg
    adapter = Adapter(cfg, LoraSettings(4, 8.0, 0.0, tuple(targets or default_targets(cfg))), str(base_path)).init(seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for part in adapter.parts.values():
            part.B.copy_(torch.randn(part.B.shape, generator=g) * 0.3)
    if template is not None:
        checkpoint.save(out, loaded.model, loaded.tokenizer, {"template": template}, adapter=adapter)
        return out
    out.mkdir()
    adapter.write(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """Adapters on the tiny llama: one on q and v only, one on every projection, one in a checkpoint
    that trained another template than the base's own."""
    root = tmp_path_factory.mktemp("adapters")
    path = tiny_llama[0]
    return {"tiny-a": _adapter(path, root / "a", ("q_proj", "v_proj"), 1), "tiny-b": _adapter(path, root / "b", None, 2),
            "tiny-c": _adapter(path, root / "c", ("o_proj", "down_proj"), 3, template="llama2")}


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_rows_of_different_adapters_share_one_step(tiny_llama, adapters, dtype):
    """One batched step over conversations of the base, A and B equals each one fed alone on a model
    with its single adapter (up to the rounding of the adapters' products over other row counts)."""
    path = tiny_llama[0]
    served = load(str(path), dtype).model
    aset = read_adapter_set([(n, str(d)) for n, d in adapters.items()], served, path)
    kinds = [type(b).__name__ for b in served.blocks]
    assert ("FusedBlock" in kinds) == (dtype == "int8" and library.enabled())  # kept for the base's calls
    alone = {None: load(str(path), dtype).model, **{n: load(str(path), dtype, adapter=str(d)).model
                                                     for n, d in adapters.items()}}
    prompts = [(None, [1, 50, 300, 7]), ("tiny-a", [1, 50, 300, 7, 9]), ("tiny-b", [1, 50, 300]),
               ("tiny-a", [2, 60]), (None, [5])]
    with torch.inference_mode():
        want = [alone[n].next_logits(torch.tensor([ids]), alone[n].new_cache())[0] for n, ids in prompts]
        caches = [served.new_cache() for _ in prompts]
        seen = []  # the rows of each base product of one Linear: all rows of the step, once
        hook = served.blocks[0].mlp.down.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
        with aset.rows([(n, len(ids)) for n, ids in prompts]):
            got = step_rows(served, [(c, ids) for c, (_, ids) in zip(caches, prompts)])
        hook.remove()
        after = step_rows(served, [(caches[0], [3])])  # outside `rows`: the base
        base_next = alone[None](torch.tensor([[3]]), _fed(alone[None], prompts[0][1]))[0, -1]
    assert (want[1] - want[0]).abs().max() > 1 and (want[2] - want[0]).abs().max() > 1  # the adapters matter
    assert seen == [sum(len(ids) for _, ids in prompts)]
    assert [type(b).__name__ for b in served.blocks] == kinds
    tol = 1e-5 if dtype == "int8" else 1e-4  # float32: prompts as rows against the reference prompt path
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= tol
    assert (after[0] - base_next).abs().max() <= tol


def _fed(model, ids):
    cache = model.new_cache()
    model(torch.tensor([ids]), cache)
    return cache


@pytest.fixture(scope="module")
def server(tiny_llama, adapters, tmp_path_factory):
    db = tmp_path_factory.mktemp("serve_lora") / "sessions.db"
    mods = [f"{n}={d}" for n, d in adapters.items()]
    args = ["--model", str(tiny_llama[0]), "--db", str(db), "--model-name", "tiny",
            "--strict-model-names", "--lora-modules", *mods, "--max-tokens-limit", "64", "--threads", "1"]
    with ServerProcess(args) as srv:
        yield srv


def _chat(url, model, messages, **extra):
    body = {"messages": messages, "max_tokens": TOKENS, "temperature": 0, **extra}
    if model is not None:
        body["model"] = model
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _offline(path, adapter, messages):
    chat = dialogen.load(str(path), adapter=None if adapter is None else str(adapter))
    return chat.chat(messages, temperature=0, max_new_tokens=TOKENS)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]


def test_models_lists_the_base_and_every_adapter(server):
    r = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in r] == ["tiny", "tiny-a", "tiny-b", "tiny-c"]
    assert "parent" not in r[0] and r[1]["parent"] == r[2]["parent"] == r[3]["parent"] == "tiny"
    assert httpx.get(server.url + "/v1/models/tiny-b").json()["id"] == "tiny-b"
    bad = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-x", "messages": MSGS})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
    bad = httpx.post(server.url + "/v1/sessions", json={"model": "tiny-x"})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"


def test_concurrent_replies_of_base_and_adapters_batch_together_and_match_offline(server, tiny_llama, adapters):
    names = [None, "tiny", "tiny-a", "tiny-b", "tiny-c"]
    alone = {n: _chat(server.url, n, MSGS) for n in names}
    texts = {n: r["choices"][0]["message"]["content"] for n, r in alone.items()}
    assert [alone[n]["model"] for n in names] == ["tiny", "tiny", "tiny-a", "tiny-b", "tiny-c"]
    assert texts[None] == texts["tiny"] and len({texts[n] for n in names}) == 4
    # tiny-c's prompt is rendered with the template it trained (llama2), the others' with the base's own
    assert alone["tiny-c"]["usage"]["prompt_tokens"] != alone["tiny"]["usage"]["prompt_tokens"]
    for n, d in [("tiny", None), *adapters.items()]:
        assert texts[n] == _offline(tiny_llama[0], d, MSGS), n
    order = ["tiny-a", "tiny", "tiny-b", "tiny-c"] * 2
    with ThreadPoolExecutor(len(order)) as pool:
        got = list(pool.map(lambda n: _chat(server.url, n, MSGS)["choices"][0]["message"]["content"], order))
    assert got == [texts[n] for n in order]
    worker = server.health()["worker"]
    assert worker["max_batch"] >= 3, worker  # replies of different adapters shared steps
    # a search runs on the adapter too: beam search's winner is the one dialogen.load(adapter=...) ranks first
    beam = _chat(server.url, "tiny-b", MSGS, beam_size=3)["choices"][0]["message"]["content"]
    offline = dialogen.load(str(tiny_llama[0]), adapter=str(adapters["tiny-b"]))
    assert beam == offline.candidates(MSGS, beam_size=3, max_new_tokens=TOKENS)[0]["text"]
    assert beam != _chat(server.url, "tiny", MSGS, beam_size=3)["choices"][0]["message"]["content"]
    # the legacy completions route picks the adapter too
    prompt = {"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "max_tokens": 8, "temperature": 0}
    outs = {n: httpx.post(server.url + "/v1/completions", json={**prompt, "model": n}, timeout=60).json()
            for n in ("tiny", "tiny-a")}
    assert outs["tiny-a"]["model"] == "tiny-a" and outs["tiny"]["choices"][0]["text"] != outs["tiny-a"]["choices"][0]["text"]


def test_kept_caches_never_cross_adapters(server, tiny_llama, adapters):
    """The same prompt to A then B gets B's own reply, from no cached tokens of A's; a conversation
    continued under another adapter is re-encoded; a session follows its model name."""
    msgs = [{"role": "user", "content": "Which colour is the sky at noon?"}]
    want_b = _offline(tiny_llama[0], adapters["tiny-b"], msgs)
    _chat(server.url, "tiny-a", msgs)
    b = _chat(server.url, "tiny-b", msgs)
    assert b["choices"][0]["message"]["content"] == want_b
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = _chat(server.url, "tiny-b", msgs)  # B's own kept cache serves B
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["choices"][0]["message"]["content"] == want_b
    # A's reply, continued by B: the pool holds A's cache of this conversation, B must not take it
    a_reply = _chat(server.url, "tiny-a", msgs)["choices"][0]["message"]["content"]
    longer = msgs + [{"role": "assistant", "content": a_reply}, {"role": "user", "content": "And at night?"}]
    b2 = _chat(server.url, "tiny-b", longer)
    assert b2["choices"][0]["message"]["content"] == _offline(tiny_llama[0], adapters["tiny-b"], longer)

    # sessions: created with A, a turn under B re-encodes the history for B
    sid = httpx.post(server.url + "/v1/sessions", json={"model": "tiny-a"}).json()["id"]
    turn = {"content": msgs[0]["content"], "max_tokens": TOKENS, "temperature": 0}
    first = httpx.post(f"{server.url}/v1/sessions/{sid}/messages", json=turn, timeout=60).json()
    assert first["message"]["content"] == _offline(tiny_llama[0], adapters["tiny-a"], msgs)
    turn2 = {"content": "And at night?", "max_tokens": TOKENS, "temperature": 0, "model": "tiny-b"}
    second = httpx.post(f"{server.url}/v1/sessions/{sid}/messages", json=turn2, timeout=60).json()
    convo = msgs + [{"role": "assistant", "content": first["message"]["content"]},
                    {"role": "user", "content": "And at night?"}]
    assert second["message"]["content"] == _offline(tiny_llama[0], adapters["tiny-b"], convo)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    stored = httpx.get(f"{server.url}/v1/sessions/{sid}").json()
    assert stored["settings"]["model"] == "tiny-a" and len(stored["messages"]) == 4
    streamed = httpx.post(f"{server.url}/v1/sessions/{sid}/messages", timeout=60,  # the session's own: A
                          json={"content": "Why?", "max_tokens": 4, "temperature": 0, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert chunks and {c["model"] for c in chunks} == {"tiny-a"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    regen = httpx.post(f"{server.url}/v1/sessions/{sid}/messages/5/regenerate", timeout=60,
                       json={"max_tokens": 4, "temperature": 0}).json()  # again with A: the same greedy reply
    assert regen["message"]["content"] == text and text


def test_bad_lora_modules_are_refused_in_one_line(tiny_llama, tiny_gpt2, adapters, tmp_path, capsys):
    foreign = _adapter(tiny_gpt2[0], tmp_path / "gpt2", None, 3)  # records the gpt2 base's path
    unnamed = _adapter(tiny_gpt2[0], tmp_path / "gpt2-hub", None, 3)  # names a hub base: its modules tell
    config = json.loads((unnamed / "adapter_config.json").read_text())
    (unnamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    base = ["serve", "--model", str(tiny_llama[0]), "--port", "0", "--db", str(tmp_path / "s.db")]
    cases = [(["--lora-modules", "x"], "expected NAME=DIR"),
             (["--lora-modules", f"x={adapters['tiny-a']}", f"x={adapters['tiny-b']}"], "given twice"),
             (["--lora-modules", f"x={tmp_path / 'none'}"], "not an adapter directory"),
             (["--lora-modules", f"x={foreign}"], "is for the base"),
             (["--lora-modules", f"ok={adapters['tiny-a']}", f"x={unnamed}"], "another base"),
             (["--lora-modules", f"x={adapters['tiny-a']}", "--adapter", str(adapters["tiny-b"])], "--adapter"),
             (["--lora-modules", f"x={adapters['tiny-a']}", "--model", str(adapters["tiny-c"])], "give the base")]
    for extra, words in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        if words in ("not an adapter directory", "is for the base", "another base"):
            assert extra[-1].partition("=")[2] in err  # the directory is named
