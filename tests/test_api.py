"""`dialogen.load(...)`: every method of the Python entry point on a tiny model, against references
(transformers' greedy decoding and its loss), and the README's Python example as written."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dialogen
from dialogen.api import as_messages
from dialogen.errors import UserError

GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return dialogen.load(str(tiny_llama[0]), dtype="float32", template="chatml")


def hf_greedy(hf_model, m, messages, n):
    """transformers' greedy reply to `messages`, stopping at the template's end-of-turn ids."""
    eng = m.engine
    msgs = as_messages(messages)
    ids = eng.template.render(eng.tokenizer, msgs, add_generation_prompt=True)[0]
    stops = sorted(eng.template.stop_ids(eng.tokenizer))
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stops,
                            pad_token_id=stops[0])[0, len(ids):].tolist()
    return eng.tokenizer.decode([t for t in out if t not in stops])


def test_import_stays_light():
    code = "import sys, dialogen; assert callable(dialogen.load); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_chat_stream_and_batch_equal_transformers_greedy(model, tiny_llama):
    _, hf = tiny_llama
    want = hf_greedy(hf, model, CONV, 12)
    assert model.chat(CONV, max_new_tokens=12, **GREEDY) == want
    assert "".join(model.stream(CONV, max_new_tokens=12, **GREEDY)) == want
    assert model.chat("Hello there", max_new_tokens=12, **GREEDY) == hf_greedy(hf, model, "Hello there", 12)
    batch = model.generate_batch([CONV, "Hello there", CONV[:2]], max_new_tokens=12, **GREEDY)
    assert batch == [want, hf_greedy(hf, model, "Hello there", 12), hf_greedy(hf, model, CONV[:2], 12)]
    assert model.generate_batch([]) == []


def test_sampling_is_seeded_and_options_are_checked(model):
    a = model.chat("Hi", temperature=1.0, seed=3, max_new_tokens=8)
    assert a == model.chat("Hi", temperature=1.0, seed=3, max_new_tokens=8)
    with pytest.raises(UserError, match="--top-p must be in"):
        model.chat("Hi", top_p=0)
    with pytest.raises(UserError, match="the last message must have role 'user'"):
        model.chat(CONV[:2] + [{"role": "system", "content": "Be brief."}])
    with pytest.raises(UserError, match=r"messages\[0\]\.role: 'bot'"):
        model.chat([{"role": "bot", "content": "x"}])
    with pytest.raises(UserError, match=r"conversations\[1\]: the last message"):
        model.generate_batch(["Hi", CONV[:3]])


def test_candidates_best_first(model, tiny_llama):
    from dialogen.chat.ranked import RankedSession
    from dialogen.decoding.settings import Decoding, Sampling

    got = model.candidates(CONV, beam_size=3, max_new_tokens=6, repetition_penalty=1.0)
    assert len(got) == 3 and [c["score"] for c in got] == sorted((c["score"] for c in got), reverse=True)
    assert all(set(c) == {"text", "score", "scores", "tokens", "finish_reason"} for c in got)
    # the winner is the reply a ranked session (the CLI's --beam-size 3) gives
    ranked = RankedSession(model.engine, Decoding(beam_size=3, num_candidates=3), system="Be brief.",
                           sampling=Sampling(max_new_tokens=6, repetition_penalty=1.0))
    ranked.messages = as_messages(CONV[1:3])
    assert ranked.send("Tell me a story.").run().text == got[0]["text"]
    # logprob score: the mean log-probability per token of the reply (and its stop token), as transformers has it
    _, hf = tiny_llama
    eng = model.engine
    prompt = eng.template.render(eng.tokenizer, as_messages(CONV), add_generation_prompt=True)[0]
    reply = eng.tokenizer.encode_text(got[0]["text"])
    assert got[0]["finish_reason"] == "length" and len(reply) == got[0]["tokens"]  # so the sum below is its score
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt + reply])).logits[0].float(), -1)
    want = sum(logp[len(prompt) + i - 1, t].item() for i, t in enumerate(reply)) / len(reply)
    assert got[0]["score"] == pytest.approx(want, abs=1e-4)
    sampled = model.candidates("Hi", source="sample", num_candidates=2, temperature=1.0, seed=0, max_new_tokens=4)
    assert len(sampled) == 2


def test_perplexity_equals_transformers_loss(model, tiny_llama):
    from dialogen.chat.messages import Message
    from dialogen.data.dataset import IGNORE_INDEX, build_examples

    _, hf = tiny_llama
    convs = [CONV + [{"role": "assistant", "content": "Once upon a time."}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    got = model.perplexity(convs)
    eng = model.engine
    examples, _ = build_examples([[Message(**m) for m in c] for c in convs], eng.tokenizer, eng.template, 256)
    nll, n = 0.0, 0
    for ex in examples:  # transformers' logits, our labels
        with torch.no_grad():
            logits = hf(torch.tensor([ex.ids])).logits[0].double()
        labels = torch.tensor(ex.labels[1:])
        keep = labels != IGNORE_INDEX
        nll += torch.nn.functional.cross_entropy(logits[:-1][keep], labels[keep], reduction="sum").item()
        n += int(keep.sum())
    assert got["tokens"] == n and got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_perplexity_of_a_data_file(model, tmp_path):
    import json

    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                  {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                         for i in range(4)))
    from_file = model.perplexity(str(f))
    listed = model.perplexity([[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
                               for i in range(4)])
    assert from_file["examples"] == 4 and from_file["ppl"] == pytest.approx(listed["ppl"], rel=1e-9)


def test_session_keeps_history_and_persona(model, tiny_llama):
    from dialogen.chat.personas import PERSONAS

    s = model.session(persona="friendly-chatbot", max_new_tokens=6, **GREEDY)
    assert s.system == PERSONAS["friendly-chatbot"]
    first = s.send("Hello there").run().text
    second = "".join(s.send("And then?"))
    assert [m.role for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert [m.content for m in s.messages] == ["Hello there", first, "And then?", second]
    history = [{"role": "system", "content": PERSONAS["friendly-chatbot"]}] + [m.to_dict() for m in s.messages[:3]]
    assert second == hf_greedy(tiny_llama[1], model, history, 6)


def test_readme_python_example_runs():
    """The five lines that open the README's Python section, run as written (the default model)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("\n## Python\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) == 5 and "dialogen.load(" in code and ".chat(" in code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "the example printed no reply"
