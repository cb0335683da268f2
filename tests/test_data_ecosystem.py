"""The data files people already have: ShareGPT, OpenAI fine-tuning JSONL with weights, DialoGPT TSV
as DialoGPT reads it, JSON arrays, parquet and CSV; `--split all`; layouts that are refused."""

import json

import pytest

from dialogen.data import load_split, read_conversations
from dialogen.data.dataset import IGNORE_INDEX, trained_flags
from dialogen.errors import UserError
from test_data_formats import roles, write


def weights(conv):
    return [getattr(m, "weight", 1.0) for m in conv]


def jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records)


SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                       {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"},
                       {"from": "gpt", "value": "ciao"}]},
    {"system": "You are a pirate.", "conversations": [{"from": "user", "value": "ahoy?"},
                                                       {"from": "assistant", "value": "arr"}]},
]


# --- ShareGPT -------------------------------------------------------------------------------
def test_sharegpt_jsonl_roles_and_aliases(tmp_path):
    f = write(tmp_path / "sg.jsonl", jsonl(SHAREGPT))
    a, b = read_conversations(f).conversations  # the first line says ShareGPT
    assert roles(a) == [("system", "Be brief."), ("user", "hi"), ("assistant", "hello"), ("user", "bye"),
                        ("assistant", "ciao")]
    assert roles(b) == [("system", "You are a pirate."), ("user", "ahoy?"), ("assistant", "arr")]
    assert read_conversations(f, "sharegpt").conversations == [a, b]


def test_sharegpt_json_array_dump(tmp_path):
    f = write(tmp_path / "sg.json", json.dumps(SHAREGPT, indent=1))
    assert [roles(c) for c in read_conversations(f).conversations] == \
        [roles(c) for c in read_conversations(f, "sharegpt").conversations]
    assert len(read_conversations(f).conversations) == 2


def test_sharegpt_unknown_speaker_names_the_field(tmp_path):
    f = write(tmp_path / "sg.jsonl", jsonl([SHAREGPT[0], {"conversations": [{"from": "bot", "value": "x"}]}]))
    with pytest.raises(UserError) as e:
        read_conversations(f)
    assert str(e.value).startswith(f"{f}:2: conversations[0].from: 'bot' is not one of human, user, gpt")


# --- OpenAI fine-tuning JSONL with weights ----------------------------------------------------
OPENAI = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Go away.", "weight": 0},
                       {"role": "user", "content": "Please?"},
                       {"role": "assistant", "content": "Sure, how can I help?", "weight": 1}]}


def test_openai_weight_zero_is_never_trained(tmp_path):
    f = write(tmp_path / "ft.jsonl", jsonl([OPENAI]))
    (conv,) = read_conversations(f).conversations
    assert weights(conv) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert trained_flags(conv, "assistant") == [False, False, False, False, True]
    assert trained_flags(conv, "both") == [False, False, False, True, True]
    # the weight survives the split cache
    (cached,) = load_split(f, "all")
    assert weights(cached) == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_inspect_data_shows_the_weight_zero_turn_untrained(tiny_llama, tmp_path, capsys):
    from dialogen.cli import main
    from dialogen.models.tokenizer import Tokenizer

    f = write(tmp_path / "ft.jsonl", jsonl([OPENAI]))
    path, _ = tiny_llama
    assert main(["inspect-data", "--data", f, "--split", "all", "--model", str(path), "--template", "chatml",
                 "-n", "1", "--rows", "0", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "[[Sure, how can I help?<|im_end|>]]" in out
    assert "Go away." in out and "[[Go away." not in out
    assert "1 conversations, 4 turns (1 trained)" in out
    # every row of the table: loss exactly on the weight-1 reply and its end of turn
    tok = Tokenizer.from_dir(path)
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("| YES", "| no"))]
    trained = [r[2 + 44 + 3:].rsplit(" | ", 1)[0].rstrip() for r in rows if r.rstrip().endswith("YES")]
    assert json.loads('"' + "".join(trained) + '"') == "Sure, how can I help?<|im_end|>"
    assert tok.decode(tok.encode_text("Sure, how can I help?")) == "Sure, how can I help?"


@pytest.mark.parametrize("message,field", [
    ({"role": "assistant", "content": "x", "weight": 2}, "messages[1].weight: must be 0 or 1, got 2"),
    ({"role": "assistant", "content": "x", "weight": True}, "messages[1].weight: must be 0 or 1, got true"),
    ({"role": "user", "content": "x", "weight": 0}, "messages[1].weight: only assistant messages take a weight"),
])
def test_openai_bad_weight(tmp_path, message, field):
    rec = {"messages": [{"role": "user", "content": "a"}, message]}
    f = write(tmp_path / "w.jsonl", jsonl([rec]))
    with pytest.raises(UserError) as e:
        read_conversations(f)
    assert str(e.value) == f"{f}:1: {field}" or str(e.value).startswith(f"{f}:1: {field}")


# --- one layout per file --------------------------------------------------------------------
def test_a_record_of_another_layout_is_refused(tmp_path):
    f = write(tmp_path / "mixed.jsonl", jsonl([SHAREGPT[0], OPENAI]))
    with pytest.raises(UserError) as e:
        read_conversations(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:2: expected an object with a 'conversations' list") and "ShareGPT" in msg
    assert '{"messages": [{"role": "system"' in msg and "\n" not in msg  # the bad record itself
    f = write(tmp_path / "oa.jsonl", jsonl([OPENAI]))
    with pytest.raises(UserError, match=r"oa\.jsonl:1: expected an object with a 'conversations' list"):
        read_conversations(f, "sharegpt")
    f = write(tmp_path / "sg.jsonl", jsonl(SHAREGPT))
    with pytest.raises(UserError, match=r"sg\.jsonl:1: expected an object with a 'messages' list"):
        read_conversations(f, "openai")


def test_json_array_of_conversations(tmp_path):
    data = [OPENAI, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    f = write(tmp_path / "a.json", json.dumps(data, indent=2))
    a, b = read_conversations(f).conversations
    assert weights(a) == [1.0, 1.0, 0.0, 1.0, 1.0] and roles(b) == [("user", "q"), ("assistant", "a")]
    bad = [OPENAI, {"messages": [{"role": "user", "content": "q"}]}, {"turns": []}]
    f = write(tmp_path / "bad.json", json.dumps(bad, indent=1))
    starts = [i + 1 for i, x in enumerate(json.dumps(bad, indent=1).splitlines()) if x == " {"]
    line = starts[2]  # where element 2 starts
    with pytest.raises(UserError) as e:
        read_conversations(f)
    assert str(e.value).startswith(f"{f}:{line}: [2]: expected an object with a 'messages' list")
    f = write(tmp_path / "lines.json", jsonl([OPENAI]))
    with pytest.raises(UserError, match=r"lines\.json:1: expected a JSON array of conversations \(format json\), "
                                        r"got an object \(one conversation per line is --format jsonl\)"):
        read_conversations(f)


# --- DialoGPT TSV, as DialoGPT's prepro.py reads it --------------------------------------------
def test_dialogpt_tsv_weights_as_dialogpt_reads_them(tmp_path):
    f = write(tmp_path / "d.tsv", "\n".join([
        "1 hello EOS 0 hi\t1 how are you",  # integer weights are floats
        "0.0 hi EOS hello there\tgood",  # a weight on some turns only: the others weigh 1.0
        "how old are you ?\t20 years old .",  # a line of DialoGPT's own data/train_raw.tsv: weight 20
        "a   b EOS c\t0.0 dropped",  # a response of weight 0 is dropped; spaces collapse
        "x EOS 0.5 y\t1e0 z",
    ]))
    c = read_conversations(f).conversations
    assert roles(c[0]) == [("assistant", "hello"), ("user", "hi"), ("assistant", "how are you")]
    assert weights(c[0]) == [1.0, 0.0, 1.0]
    assert roles(c[1]) == [("assistant", "hi"), ("user", "hello there"), ("assistant", "good")]
    assert weights(c[1]) == [0.0, 1.0, 1.0]
    assert roles(c[2]) == [("user", "how old are you ?"), ("assistant", "years old .")] and weights(c[2]) == [1, 20]
    assert roles(c[3]) == [("assistant", "a b"), ("user", "c")] and weights(c[3]) == [1.0, 1.0]
    assert weights(c[4]) == [1.0, 0.5, 1.0] and roles(c[4])[2] == ("assistant", "z")
    assert trained_flags(c[1], "both") == [False, True, True]


@pytest.mark.parametrize("line,reason", [
    ("nan hi\tok", "weight 'nan' is not a finite number >= 0"),
    ("-1 hi\tok", "weight '-1' is not a finite number >= 0"),
    ("hi\t1.0", "a weighted turn has no text"),
    ("hi EOS  \tok", "an empty turn"),
])
def test_dialogpt_tsv_bad_turns(tmp_path, line, reason):
    f = write(tmp_path / "bad.tsv", "a\tb\n" + line + "\n")
    with pytest.raises(UserError) as e:
        read_conversations(f)
    assert str(e.value).startswith(f"{f}:2: ") and reason in str(e.value)


# --- parquet and CSV ------------------------------------------------------------------------
def test_parquet_messages_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": OPENAI["messages"], "system": None},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "system": "Be terse."}]
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    a, b = read_conversations(str(f)).conversations
    assert roles(a) == [(m["role"], m["content"]) for m in OPENAI["messages"]]
    assert weights(a) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert roles(b) == [("system", "Be terse."), ("user", "q"), ("assistant", "a")]


def test_parquet_sharegpt_column_and_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"conversations": SHAREGPT[1]["conversations"]},
            {"conversations": [{"from": "robot", "value": "x"}]}]
    f = tmp_path / "sg.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    with pytest.raises(UserError, match=r"sg\.parquet: row 2: conversations\[0\]\.from: 'robot'"):
        read_conversations(str(f))
    parsed = read_conversations(str(f), skip_bad=True)
    assert [roles(c) for c in parsed.conversations] == [[("user", "ahoy?"), ("assistant", "arr")]]
    assert len(parsed.skipped) == 1
    (tmp_path / "fake.parquet").write_text("a,b\n")
    with pytest.raises(UserError, match=r"fake\.parquet: not a parquet file"):
        read_conversations(str(tmp_path / "fake.parquet"))


def test_csv_messages_and_conversations_columns(tmp_path):
    import csv

    f = tmp_path / "d.csv"
    with open(f, "w", newline="", encoding="utf-8") as out:
        w = csv.writer(out)
        w.writerow(["id", "system", "messages"])
        w.writerow(["1", "", json.dumps(OPENAI["messages"])])
        w.writerow(["2", "Be terse.", json.dumps([{"role": "user", "content": "q,\n\"x\""},
                                                   {"role": "assistant", "content": "a"}])])
    a, b = read_conversations(str(f)).conversations
    assert weights(a) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert roles(b) == [("system", "Be terse."), ("user", 'q,\n"x"'), ("assistant", "a")]
    g = tmp_path / "sg.csv"
    with open(g, "w", newline="", encoding="utf-8") as out:
        w = csv.writer(out)
        w.writerow(["conversations"])
        w.writerow([json.dumps(SHAREGPT[0]["conversations"])])
        w.writerow(["not json"])
    with pytest.raises(UserError, match=r"sg\.csv: row 2, column conversations:1: not valid JSON"):
        read_conversations(str(g))
    assert roles(read_conversations(str(g), skip_bad=True).conversations[0])[1] == ("user", "hi")


def test_csv_without_a_conversation_column_and_csv_as_text(tmp_path):
    f = write(tmp_path / "d.csv", "prompt,reply\nhi,hello\n")
    with pytest.raises(UserError) as e:
        read_conversations(f)
    assert str(e.value).startswith(f"{f}: expected a 'messages' column") and "columns are: prompt, reply" in str(e.value)
    with pytest.raises(UserError, match=r"d\.csv: --format text reads each line as a turn; a \.csv file is read "
                                        r"with --format csv"):
        read_conversations(f, "text")
    g = write(tmp_path / "d.txt", 'id,messages\n1,"[]"\n')
    with pytest.raises(UserError, match=r"d\.txt:1: expected plain text .* --format csv"):
        read_conversations(g)
    h = write(tmp_path / "j.txt", jsonl([OPENAI]))
    with pytest.raises(UserError, match=r"j\.txt:1: expected plain text .* this line is JSON"):
        read_conversations(h, "text")


# --- --split all ----------------------------------------------------------------------------
def test_split_all_is_every_conversation_in_file_order(tmp_path):
    lines = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(40)]
    f = write(tmp_path / "d.jsonl", jsonl(lines))
    everything = load_split(f, "all", seed=5)
    assert [c[0].content for c in everything] == [f"q{i}" for i in range(40)]
    parts = [c[0].content for s in ("train", "valid", "test") for c in load_split(f, s, seed=5)]
    assert sorted(parts) == sorted(c[0].content for c in everything)
    with pytest.raises(UserError, match="unknown split 'every'; splits: train, valid, test, all"):
        load_split(f, "every")


def test_labels_of_a_weight_zero_turn(smol_tokenizer, tmp_path):
    from dialogen.chat.templates import get_template
    from dialogen.data.dataset import build_examples

    f = write(tmp_path / "ft.jsonl", jsonl([OPENAI]))
    convs = read_conversations(f).conversations
    (ex,), _ = build_examples(convs, smol_tokenizer, get_template("chatml", smol_tokenizer), 1000)
    trained = [t for t, label in zip(ex.ids, ex.labels) if label != IGNORE_INDEX]
    assert smol_tokenizer.decode(trained) == "Sure, how can I help?<|im_end|>"


def test_data_flag_everywhere_and_dataset_alias_hidden(capsys):
    from dialogen.cli import build_parser

    parser = build_parser()
    for command in ("train --out x", "inspect-data", "perplexity", "eval", "train-discriminator --out x",
                    "train-adversarial --out x"):
        args = parser.parse_args([*command.split(), "--data", "f.jsonl"])
        assert args.data == "f.jsonl", command
    assert parser.parse_args(["eval", "--dataset", "old.jsonl"]).data == "old.jsonl"
    assert parser.parse_args(["eval"]).data == "chitchat"
    for command in ("inspect-data", "perplexity", "eval"):
        assert parser.parse_args([command, "--split", "all"]).split == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    shown = capsys.readouterr().out
    assert "--data DATA" in shown and "--dataset" not in shown and "{train,valid,test,all}" in shown


def test_perplexity_of_a_whole_small_file(tiny_llama, tmp_path, capsys):
    from dialogen.cli import main

    f = write(tmp_path / "three.jsonl", jsonl([OPENAI, *(
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(2))]))
    assert main(["perplexity", "--model", str(tiny_llama[0]), "--template", "chatml", "--data", f,
                 "--split", "all"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["conversations"] == 3 and out["split"] == "all" and out["tokens"] > 0


def test_text_whose_first_line_only_looks_like_json(tmp_path):
    deep = "[" * 100_000  # too deep for the JSON parser: not records, read as a turn
    f = write(tmp_path / "deep.txt", deep + "\nok\n")
    assert roles(read_conversations(f).conversations[0]) == [("user", deep), ("assistant", "ok")]
    g = write(tmp_path / "braces.txt", "{not json}\nfine\n")
    assert roles(read_conversations(g).conversations[0]) == [("user", "{not json}"), ("assistant", "fine")]
