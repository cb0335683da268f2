"""OpenAI's logit_bias and an assistant prefill, through the official `openai` client against
`dialogen serve` on the default model; logit_bias in beam search, in process."""

import openai
import pytest

from dialogen.api import ChatModel
from dialogen.chat.messages import Message
from dialogen.decoding.beam import BeamSettings, beam_search
from dialogen.serve.launch import ServerProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("bias") / "sessions.db"
    with ServerProcess(["--dtype", "float32", "--temperature", "0", "--db", str(db)]) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client, messages, **kw):
    return client.chat.completions.create(model="default", messages=messages, temperature=0, **kw)


def test_logit_bias_bans_and_forces(client, default_engine):
    tok = default_engine.tokenizer
    plain = _ask(client, QUESTION, max_tokens=6).choices[0].message.content
    first = tok.encode_text(plain)[0]
    banned = _ask(client, QUESTION, max_tokens=6, logit_bias={str(first): -100}).choices[0].message.content
    assert banned and tok.encode_text(banned)[0] != first and not banned.startswith(tok.decode([first]))
    forced_id = tok.encode_text(" banana")[0]
    forced = _ask(client, QUESTION, max_tokens=3, logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == tok.decode([forced_id] * 3)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        _ask(client, QUESTION, max_tokens=2, logit_bias={str(tok.vocab_size): 5})


def test_a_prefill_is_continued(client, default_engine):
    prefill = "The capital of France is"
    messages = QUESTION + [{"role": "assistant", "content": prefill}]
    r = _ask(client, messages, max_tokens=8)
    content = r.choices[0].message.content
    assert content and not content.lstrip().startswith("The capital")  # extended, not restarted
    assert "Paris" in prefill + content
    # the same continuation in Python, which keeps the whole message (prefill and continuation)
    model = ChatModel(default_engine)
    assert model.chat(messages, temperature=0, max_new_tokens=8) == content
    session = model._session
    assert session.messages[-1] == Message("assistant", prefill + content)
    # the prompt ends with the prefill's text: no end of turn, no new assistant header
    ids = default_engine.template.render(default_engine.tokenizer, session.messages[:-1] + [Message(
        "assistant", prefill)], continue_final=True)[0]
    assert default_engine.tokenizer.decode(ids).endswith("<|im_start|>assistant\n" + prefill)
    assert r.usage.prompt_tokens == len(ids)


def test_logit_bias_in_beam_search(default_engine):
    eng = default_engine
    prompt = eng.template.render(eng.tokenizer, [Message("user", "Say hello.")], add_generation_prompt=True)[0]
    stops = eng.template.stop_ids(eng.tokenizer)
    plain = beam_search(eng.model, prompt, BeamSettings(beam_size=3, max_new_tokens=4), stops)
    first = plain[0].tokens[0]
    biased = beam_search(eng.model, prompt, BeamSettings(beam_size=3, max_new_tokens=4, logit_bias={first: -100}),
                         stops)
    assert biased and all(c.tokens[:1] != [first] for c in biased)
    forced = beam_search(eng.model, prompt, BeamSettings(beam_size=2, max_new_tokens=3, logit_bias={first: 100}),
                         stops)
    assert forced[0].tokens == [first] * 3
