"""Sessions: KV cache kept across turns, token budget, persona, save/load."""

import json

import pytest
import torch

from dialogen.chat.messages import Message
from dialogen.chat.session import Session, load_engine
from dialogen.decoding.settings import Sampling
from dialogen.errors import UserError

GREEDY = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return load_engine(str(tiny_llama[0]), "chatml", torch.float32)


def test_second_turn_feeds_only_new_tokens(engine):
    s = Session(engine, system="Be brief.", sampling=GREEDY)
    first = s.send("Hello there")
    first.run()
    second = s.send("Tell me more")
    prompt = s.prompt_ids()
    # what the model is fed is the new user turn, not the history
    assert len(second.feed) < len(prompt) // 2
    assert second.feed == prompt[len(prompt) - len(second.feed):]
    second.run()
    # and the reply equals what a fresh session computes from the full history
    fresh = Session(engine, system="Be brief.", sampling=GREEDY)
    fresh.messages = s.messages[:-2]
    again = fresh.send("Tell me more").run()
    assert again.tokens == second.tokens
    assert len(again.feed) == len(prompt)


def test_persona_and_history(engine):
    s = Session(engine, system="You are a pirate.", sampling=GREEDY)
    s.send("Ahoy").run()
    conv = s.conversation()
    assert [m.role for m in conv] == ["system", "user", "assistant"]
    assert conv[0].content == "You are a pirate."
    s.reset()
    assert [m.role for m in s.conversation()] == ["system"]
    s.set_persona(None)
    assert s.conversation() == []


def test_budget_drops_oldest_whole_turns(engine):
    s = Session(engine, system="persona", sampling=GREEDY, max_context_tokens=120)
    for i in range(12):
        s.send(f"message number {i} with a few more words").run()
        ids = s.prompt_ids()
        assert len(ids) <= 120
        conv = s.conversation()
        assert conv[0] == Message("system", "persona")
        assert conv[1].role == "user"  # whole turns only
    assert s.window_start > 0
    assert s.messages[-2].content == "message number 11 with a few more words"


def test_newest_turn_too_long_is_a_clear_error(engine):
    s = Session(engine, sampling=GREEDY, max_context_tokens=30)
    with pytest.raises(UserError, match="max-context-tokens"):
        s.send("word " * 100)
    assert s.messages == []  # the turn that did not fit is not kept


def test_save_and_load_round_trip(engine, tmp_path):
    s = Session(engine, system="persona", sampling=GREEDY)
    s.send("hi").run()
    path = tmp_path / "chat.json"
    s.save(path)
    t = Session(engine, sampling=GREEDY)
    t.load(path)
    assert t.to_dict() == s.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temp file left behind


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), "messages[0].content"),
])
def test_load_bad_file_keeps_session(engine, tmp_path, content, message):
    s = Session(engine, sampling=GREEDY)
    s.messages = [Message("user", "kept")]
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        s.load(path)
    assert s.messages == [Message("user", "kept")]


def test_interrupted_reply_keeps_session_consistent(engine):
    s = Session(engine, sampling=GREEDY.replace(max_new_tokens=20))
    gen = s.send("go")
    it = iter(gen)
    next(it, None)
    gen.close()  # what Ctrl-C does
    assert gen.finish_reason == "interrupted"
    assert s.messages[-1].role == "assistant"
    assert s.cache.length == len(s.cache_ids)
    s.send("again").run()  # the session goes on
    assert s.cache.length == len(s.cache_ids)


def test_a_reply_limit_as_long_as_the_context_is_cut_at_the_context(tiny_gpt2):
    """A small model (256 positions) with the default 256-token reply limit still chats: the prompt
    keeps at least half the context and the reply stops where the context ends."""
    engine = load_engine(str(tiny_gpt2[0]), "chatml", torch.float32)
    assert engine.context_length == 256
    s = Session(engine, sampling=Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=256))
    assert s.max_context_tokens == 128
    gen = s.send("word " * 100).run()
    prompt = engine.template.render(engine.tokenizer, s.conversation()[:-1], add_generation_prompt=True)[0]
    assert gen.finish_reason == "length" and len(prompt) + len(gen.tokens) == 256
    with pytest.raises(UserError, match="does not fit"):  # a turn over the prompt budget is refused
        s.send("word " * 200)
