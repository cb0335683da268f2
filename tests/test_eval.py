"""`dialogen eval`: examples, perplexity, replies, the table and JSON; persona presets."""

import json
import math

import pytest

from dialogen.chat.messages import Message
from dialogen.chat.personas import PERSONAS, resolve_persona
from dialogen.chat.session import load_engine
from dialogen.cli import build_parser, main, open_session
from dialogen.decoding.generate import Generation
from dialogen.decoding.settings import Sampling
from dialogen.decoding.rerank import masked_logprobs
from dialogen.eval.metrics import reply_metrics
from dialogen.eval.run import eval_examples

WORDS = "hello hi how are you doing today fine thanks what about the weekend plans movie dinner great".split()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """60 small two-speaker conversations as JSONL (the split keeps 3 for test)."""
    import random

    r = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "talk.jsonl"
    with open(path, "w") as f:
        for _ in range(60):
            turns = [{"role": "user" if t % 2 == 0 else "assistant",
                      "content": " ".join(r.choice(WORDS) for _ in range(r.randint(2, 7)))}
                     for t in range(r.randint(2, 6))]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def conv(*texts):
    return [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]


def test_examples_are_assistant_turns_with_their_context():
    convs = [conv("a", "b", "c", "d", "e"), [Message("system", "s")] + conv("x", "y"), conv("only user")]
    got = eval_examples(convs, 10, seed=0, context_turns=2)
    assert [(e.reference, [m.content for m in e.context]) for e in got] == [
        ("b", ["a"]), ("d", ["b", "c"]), ("y", ["x"])]
    assert all(e.context[-1].role == "user" for e in got)
    few = eval_examples(convs, 2, seed=1, context_turns=2)
    assert len(few) == 2 and few == eval_examples(convs, 2, seed=1, context_turns=2)


def test_eval_compare_end_to_end(tiny_llama, data_file, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(["eval", "--model", str(tiny_llama[0]), "--template", "chatml", "--dataset", str(data_file),
                 "--examples", "4", "--max-new-tokens", "6", "--repetition-penalty", "1", "--seed", "0",
                 "--compare", "greedy,beam5,sample-rank", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    assert [c["name"] for c in result["configs"]] == ["greedy", "beam5", "sample-rank"]
    assert result["examples"] == 4 and len(result["data"]) == 4
    refs = [[d["reference"]] for d in result["data"]]
    for c in result["configs"]:  # the metrics are those of the stored replies
        assert c["metrics"] == pytest.approx(reply_metrics(c["replies"], refs))
    # greedy replies equal one-by-one greedy generation on the same prompts
    eng = load_engine(str(tiny_llama[0]), "chatml")
    for d, reply in zip(result["data"], result["configs"][0]["replies"]):
        ctx = [Message(m["role"], m["content"]) for m in d["context"]]
        ids = eng.template.render(eng.tokenizer, ctx, add_generation_prompt=True)[0]
        s = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=6)
        gen = Generation(eng.model, eng.tokenizer, ids, eng.model.new_cache(1), s, eng.template.stop_ids(eng.tokenizer))
        assert gen.run().text == reply
    # perplexity of the reference replies, recomputed from their masked log-likelihood
    rows = []
    for d in result["data"]:
        msgs = [Message(m["role"], m["content"]) for m in d["context"]] + [Message("assistant", d["reference"])]
        ids, mask = eng.template.render(eng.tokenizer, msgs)  # every assistant turn on ...
        start = len(eng.template.render(eng.tokenizer, msgs[:-1], add_generation_prompt=True)[0])
        rows.append((ids, [0] * start + mask[start:]))  # ... of which only the reference reply counts
    total = masked_logprobs(eng.model, rows, eng.tokenizer.pad_id)
    ppl = math.exp(-sum(s for s, _ in total) / sum(n for _, n in total))
    assert result["perplexity"]["ppl"] == pytest.approx(ppl, rel=1e-3)
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| config | decoding | ppl | BLEU-2 | BLEU-4 | Dist-1 | Dist-2 | Entropy-4")
    assert len(lines) == 2 + 3 + 1  # header, rule, three configs, the human references


@pytest.mark.parametrize("flags,name", [
    (["--compare", "greedy,nonsense"], "--compare"),
    (["--compare", "beam5-mmi"], "--mmi-model"),
    (["--examples", "0"], "--examples"),
    (["--top-p", "2"], "--top-p"),
    (["--beam-size", "-1"], "--beam-size"),
])
def test_eval_bad_flags(flags, name, tiny_llama, data_file, capsys):
    code = main(["eval", "--model", str(tiny_llama[0]), "--dataset", str(data_file), "--max-new-tokens", "4", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and name in err[0], err


def test_compare_all_without_a_reverse_model_says_mmi_was_skipped(tiny_llama, data_file, capsys):
    code = main(["eval", "--model", str(tiny_llama[0]), "--dataset", str(data_file), "--examples", "2",
                 "--max-new-tokens", "3", "--no-ppl", "--compare", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [c["name"] for c in result["configs"]] == ["greedy", "top-p", "beam5", "sample-rank"]
    assert result["skipped"][0][0] == "beam5-mmi"


def test_persona_presets_expand_by_name():
    assert set(PERSONAS) == {"virtual-assistant", "friendly-chatbot", "customer-service"}
    assert resolve_persona("customer-service") == PERSONAS["customer-service"]
    assert resolve_persona("You are a pirate.") == "You are a pirate."
    assert resolve_persona("") is None and resolve_persona(None) is None


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_persona_flag_selects_a_preset(command, tiny_llama):
    args = build_parser().parse_args([command, "--model", str(tiny_llama[0]), "--persona", "friendly-chatbot",
                                      "--max-new-tokens", "4"])
    session = open_session(args)
    assert session.system == PERSONAS["friendly-chatbot"]
    ids = session.prompt_ids()
    persona = session.engine.tokenizer.encode_text(PERSONAS["friendly-chatbot"])
    assert any(ids[i:i + len(persona)] == persona for i in range(len(ids)))


def test_eval_persona_reaches_the_prompt(tiny_llama, data_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["eval", "--model", str(tiny_llama[0]), "--dataset", str(data_file), "--examples", "2",
                 "--max-new-tokens", "3", "--persona", "customer-service", "--output", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["persona"] == PERSONAS["customer-service"]


def test_chat_with_beam_search_prints_one_reply_per_line(tiny_llama, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you\n"))
    code = main(["chat", "--model", str(tiny_llama[0]), "--beam-size", "3", "--max-new-tokens", "5",
                 "--show-candidates"])
    out = capsys.readouterr()
    assert code == 0 and len(out.out.splitlines()) == 2
    assert out.err.count("*[") == 2  # a winner marked for each turn


def test_chat_persona_command_takes_a_preset_name(tiny_llama):
    import io

    from dialogen.chat.repl import command
    from dialogen.chat.session import Session

    session = Session(load_engine(str(tiny_llama[0])), sampling=Sampling(max_new_tokens=4))
    command(session, "/persona virtual-assistant", out=io.StringIO())
    assert session.system == PERSONAS["virtual-assistant"]
    command(session, "/persona Talk like a pirate.", out=io.StringIO())
    assert session.system == "Talk like a pirate."
