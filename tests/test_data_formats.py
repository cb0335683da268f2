"""Data formats -> conversations, seeded splits written once, and bad-input errors."""

import json

import pytest

from dialogen.chat.messages import Message
from dialogen.data import load_split, read_conversations
from dialogen.data.formats import Turn
from dialogen.data.splits import split_dir, split_sizes
from dialogen.errors import UserError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def roles(conv):
    return [(m.role, m.content) for m in conv]


def test_jsonl_messages_and_system_field(tmp_path):
    f = write(tmp_path / "d.jsonl", "\n".join([
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}),
        "",
        json.dumps({"system": "You are a pirate.", "messages": [{"role": "user", "content": "ahoy?"},
                                                                {"role": "assistant", "content": "arr"}]}),
    ]))
    convs = read_conversations(f).conversations
    assert roles(convs[0]) == [("user", "hi"), ("assistant", "hey")]
    assert roles(convs[1]) == [("system", "You are a pirate."), ("user", "ahoy?"), ("assistant", "arr")]


def test_dialogpt_tsv_plain_and_weighted(tmp_path):
    f = write(tmp_path / "d.tsv", "a b EOS c d EOS e\tf g\n0.0 one EOS 1.0 two\t1.0 three\n")
    plain, weighted = read_conversations(f).conversations
    # turns alternate backwards from the response, which is the assistant's
    assert roles(plain) == [("user", "a b"), ("assistant", "c d"), ("user", "e"), ("assistant", "f g")]
    assert roles(weighted) == [("assistant", "one"), ("user", "two"), ("assistant", "three")]
    assert [m.weight for m in weighted] == [0.0, 1.0, 1.0]
    assert all(isinstance(m, Turn) for m in weighted)


def test_plain_text_blank_line_separates_dialogues(tmp_path):
    f = write(tmp_path / "d.txt", "hello\nhi there\nhow are you?\n\n\nsecond one\nyes\n")
    convs = read_conversations(f).conversations
    assert roles(convs[0]) == [("user", "hello"), ("assistant", "hi there"), ("user", "how are you?")]
    assert roles(convs[1]) == [("user", "second one"), ("assistant", "yes")]


def test_chitchat_merges_one_senders_messages_into_a_turn():
    convs = read_conversations("chitchat").conversations
    # the package's first conversation: two messages, then three, from alternating senders
    first = convs[0]
    assert roles(first[:2]) == [("user", "Hello How are you doing today?"),
                                ("assistant", "whats up MD im doing good how are you doing?")]
    assert all(m.role == ("user", "assistant")[i % 2] for c in convs[:50] for i, m in enumerate(c))
    assert len(convs) == 4017  # of 7,168: the one-sided conversations have nothing to answer


def test_split_is_deterministic_disjoint_and_cached(tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": f"a{i}"}]}) for i in range(100)]
    f = write(tmp_path / "d.jsonl", "\n".join(lines))
    parts = {s: [c[0].content for c in load_split(f, s, seed=3)] for s in ("train", "valid", "test")}
    assert {k: len(v) for k, v in parts.items()} == {"train": 90, "valid": 5, "test": 5} == split_sizes(100)
    assert set(parts["train"]) | set(parts["valid"]) | set(parts["test"]) == {f"q{i}" for i in range(100)}
    assert not set(parts["train"]) & set(parts["test"]) and not set(parts["valid"]) & set(parts["test"])
    # written once: the cached test file is what later calls read
    _, _, directory = split_dir(f, None, 3)
    cached = [json.loads(x)["messages"][0]["content"] for x in (directory / "test.jsonl").read_text().splitlines()]
    assert cached == parts["test"] == [c[0].content for c in load_split(f, "test", seed=3)]
    other = [c[0].content for c in load_split(f, "test", seed=4)]
    assert other != parts["test"]


def test_chitchat_split_sizes():
    test, valid = load_split("chitchat", "test"), load_split("chitchat", "valid")
    assert len(test) == len(valid) == 201
    assert all(isinstance(m, Message) and m.role in ("user", "assistant") for c in test for m in c)


def test_weights_survive_the_split_cache(tmp_path):
    f = write(tmp_path / "w.tsv", "\n".join(f"0.0 hi{i} EOS 1.0 yo{i}\t1.0 ok{i}" for i in range(3)))
    convs = load_split(f, "train") + load_split(f, "valid") + load_split(f, "test")
    assert sorted(getattr(m, "weight", 1.0) for c in convs for m in c) == [0.0] * 3 + [1.0] * 6


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("content,where,reason", [
    ('{"messages": [{"role": "user", "content": "x"}]}\nnot json\n', ":2:", "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n{"turns": []}\n', ":2:", "'messages'"),
    ('[1, 2]\n', ":1:", "'messages'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', ":1: messages[0].role", "'bot'"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, content, where, reason):
    f = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(UserError) as e:
        load_split(f, "train")
    msg = str(e.value)
    assert msg.startswith(f"{f}{where}") and reason in msg and "\n" not in msg


def test_skip_bad_counts_and_reports(tmp_path, capsys):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    f = write(tmp_path / "some_bad.jsonl", "\n".join([good, "{oops", good, '{"x": 1}', good]))
    convs = read_conversations(f, skip_bad=True)
    assert len(convs.conversations) == 3 and len(convs.skipped) == 2
    assert convs.skipped[0].startswith(f"{f}:2:") and convs.skipped[1].startswith(f"{f}:4:")
    total = sum(len(load_split(f, s, skip_bad=True)) for s in ("train", "valid", "test"))
    assert total == 3
    assert "skipped 2 bad line(s)" in capsys.readouterr().err
    with pytest.raises(UserError, match=":2:"):  # a later caller without --skip-bad still hears about it
        load_split(f, "train")


def test_bad_tsv_line(tmp_path):
    f = write(tmp_path / "bad.tsv", "a EOS b\tc\nno tab here\n")
    with pytest.raises(UserError, match=r"bad\.tsv:2: expected 'context EOS"):
        read_conversations(f)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="no such data file"):
        load_split(str(tmp_path / "nope.jsonl"))
    f = write(tmp_path / "d.xml", "a,b\n")
    with pytest.raises(UserError, match=r"unknown format for extension '\.xml'.*--format"):
        load_split(f)
    with pytest.raises(UserError, match="unknown format 'yaml'"):
        load_split(f, fmt="yaml")
    assert roles(read_conversations(f, fmt="text").conversations[0]) == [("user", "a,b")]
