"""Labels of training examples: which tokens carry loss, per template, format and --train-on."""

import json

import pytest
import torch

from dialogen.chat.messages import Message
from dialogen.chat.templates import TEMPLATES, get_template
from dialogen.data import read_conversations
from dialogen.data.batches import bucket_batches, collate, pack
from dialogen.data.dataset import IGNORE_INDEX, build_examples, render_turns, trained_flags, windows
from dialogen.decoding.reverse import reverse_example_ids
from rendering import expected

U1, A1, U2, A2 = "Hi there", "Hello! How can I help?", "What is 2+2?", "4."
CONV = [Message("user", U1), Message("assistant", A1), Message("user", U2), Message("assistant", A2)]


def one(tok, template, conv, train_on="assistant"):
    examples, stats = build_examples([conv], tok, get_template(template, tok), 10_000, train_on)
    assert len(examples) == 1 and stats.windows == 1
    return examples[0].ids, examples[0].labels


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("train_on", ["assistant", "both"])
def test_render_turns_agrees_with_template_render(smol_tokenizer, name, train_on):
    tpl = get_template(name, smol_tokenizer)
    conv = [Message("system", "Be brief.")] + CONV
    flags = trained_flags(conv, train_on)
    roles = ("assistant",) if train_on == "assistant" else ("user", "assistant")
    ids, mask = render_turns(tpl, smol_tokenizer, conv, flags)
    ref_ids, ref_mask = tpl.render(smol_tokenizer, conv, train_roles=roles)
    assert ids == ref_ids
    if train_on == "assistant":
        assert mask == ref_mask
    else:  # the same as training both roles, except for the first turn and its end-of-turn
        diff = [i for i in range(len(ids)) if mask[i] != ref_mask[i]]
        assert all(ref_mask[i] == 1 and mask[i] == 0 for i in diff)
        assert diff == list(range(diff[0], diff[-1] + 1)) and diff[0] == ref_mask.index(1)
        user_eot = "" if name == "llama2" else tpl.end_of_turn  # llama2 closes a user turn with [/INST]
        assert smol_tokenizer.decode([ids[i] for i in diff]) == U1 + user_eot


def test_chatml_assistant_turns(smol_tokenizer):
    assert one(smol_tokenizer, "chatml", CONV) == expected(smol_tokenizer, labels=True, pieces=[
        ("<|im_start|>user\n", "t", 0), (U1, "c", 0), ("<|im_end|>\n<|im_start|>assistant\n", "t", 0),
        (A1, "c", 1), ("<|im_end|>", "t", 1), ("\n<|im_start|>user\n", "t", 0), (U2, "c", 0),
        ("<|im_end|>\n<|im_start|>assistant\n", "t", 0), (A2, "c", 1), ("<|im_end|>", "t", 1), ("\n", "t", 0)])


def test_chatml_hand_checked_positions(smol_tokenizer):
    """The seed's table: the context ending in 'assistant\\n' predicts the first reply token, with
    loss; the reply's last token predicts <|im_end|>, with loss; the newline after it, none."""
    ids, labels = one(smol_tokenizer, "chatml", CONV[:2])
    toks = [smol_tokenizer.decode([i]) for i in ids]
    first = toks.index("Hello")
    assert toks[first - 1] == "\n" and labels[first - 1] == IGNORE_INDEX and labels[first] == ids[first]
    end = toks.index("<|im_end|>", first)
    assert toks[end - 1] == "?" and labels[end] == ids[end] == smol_tokenizer.token_id("<|im_end|>")
    assert labels[end + 1] == IGNORE_INDEX and toks[end + 1] == "\n" and end + 2 == len(ids)
    assert sum(x != IGNORE_INDEX for x in labels) == end - first + 1


def test_llama2_end_of_turn_is_trained(smol_tokenizer):
    assert one(smol_tokenizer, "llama2", CONV) == expected(smol_tokenizer, labels=True, pieces=[
        ("<s>[INST] ", "t", 0), (U1, "c", 0), (" [/INST] ", "t", 0), (A1, "c", 1), ("</s>", "t", 1),
        ("<s>[INST] ", "t", 0), (U2, "c", 0), (" [/INST] ", "t", 0), (A2, "c", 1), ("</s>", "t", 1)])


def test_dialogpt_both_trains_every_turn_after_the_first(smol_tokenizer):
    eot = smol_tokenizer.eos_token
    assert one(smol_tokenizer, "dialogpt", CONV, "both") == expected(smol_tokenizer, labels=True, pieces=[
        (U1, "c", 0), (eot, "t", 0), (A1, "c", 1), (eot, "t", 1), (U2, "c", 1), (eot, "t", 1),
        (A2, "c", 1), (eot, "t", 1)])
    assert one(smol_tokenizer, "dialogpt", CONV, "assistant") == expected(smol_tokenizer, labels=True, pieces=[
        (U1, "c", 0), (eot, "t", 0), (A1, "c", 1), (eot, "t", 1), (U2, "c", 0), (eot, "t", 0),
        (A2, "c", 1), (eot, "t", 1)])


def test_model_jinja_template_with_its_default_system_prompt(smol_tokenizer):
    sys_default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert one(smol_tokenizer, "jinja", CONV[:2]) == expected(smol_tokenizer, labels=True, pieces=[
        ("<|im_start|>system\n" + sys_default + "<|im_end|>\n<|im_start|>user\n", "t", 0), (U1, "c", 0),
        ("<|im_end|>\n<|im_start|>assistant\n", "t", 0), (A1, "c", 1), ("<|im_end|>", "t", 1), ("\n", "t", 0)])


def test_each_format_through_to_labels(smol_tokenizer, tmp_path):
    """jsonl (with a persona), weighted DialoGPT TSV and plain text, rendered with ChatML."""
    eot, start = "<|im_end|>", "<|im_start|>"
    (tmp_path / "d.jsonl").write_text(json.dumps({"system": "P", "messages": [m.to_dict() for m in CONV[:2]]}))
    (tmp_path / "d.tsv").write_text("0.0 a EOS 1.0 b EOS 1.0 c\t1.0 d\n")
    (tmp_path / "d.txt").write_text("a\nb\n")
    conv = read_conversations(str(tmp_path / "d.jsonl")).conversations[0]
    assert one(smol_tokenizer, "chatml", conv) == expected(smol_tokenizer, labels=True, pieces=[
        (f"{start}system\n", "t", 0), ("P", "c", 0), (f"{eot}\n{start}user\n", "t", 0), (U1, "c", 0),
        (f"{eot}\n{start}assistant\n", "t", 0), (A1, "c", 1), (eot, "t", 1), ("\n", "t", 0)])
    # TSV: turns alternate backwards from the response (the assistant's)
    conv = read_conversations(str(tmp_path / "d.tsv")).conversations[0]
    assert [(m.role, m.content, m.weight) for m in conv] == [
        ("user", "a", 0.0), ("assistant", "b", 1.0), ("user", "c", 1.0), ("assistant", "d", 1.0)]
    eot = smol_tokenizer.eos_token
    assert one(smol_tokenizer, "dialogpt", conv, "both") == expected(smol_tokenizer, labels=True, pieces=[
        ("a", "c", 0), (eot, "t", 0), ("b", "c", 1), (eot, "t", 1), ("c", "c", 1), (eot, "t", 1),
        ("d", "c", 1), (eot, "t", 1)])
    conv = read_conversations(str(tmp_path / "d.txt")).conversations[0]
    assert one(smol_tokenizer, "chatml", conv) == expected(smol_tokenizer, labels=True, pieces=[
        (f"{start}user\n", "t", 0), ("a", "c", 0), (f"{eot}\n{start}assistant\n", "t", 0), ("b", "c", 1),
        (eot, "t", 1), ("\n", "t", 0)])


def test_weight_zero_turn_is_not_trained(smol_tokenizer, tmp_path):
    (tmp_path / "w.tsv").write_text("1.0 a EOS 0.0 b EOS 1.0 c\t1.0 d\n")
    conv = read_conversations(str(tmp_path / "w.tsv")).conversations[0]
    assert [m.weight for m in conv] == [1.0, 0.0, 1.0, 1.0]
    eot = smol_tokenizer.eos_token
    assert one(smol_tokenizer, "dialogpt", conv, "both") == expected(smol_tokenizer, labels=True, pieces=[
        ("a", "c", 0), (eot, "t", 0), ("b", "c", 0), (eot, "t", 0), ("c", "c", 1), (eot, "t", 1),
        ("d", "c", 1), (eot, "t", 1)])


def trained_runs(tok, ids, labels):
    """The trained token runs of an example, decoded."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


@pytest.mark.parametrize("name", ["chatml", "jinja", "llama2"])
def test_long_conversation_windows_cover_every_turn_once(smol_tokenizer, name):
    tpl = get_template(name, smol_tokenizer)
    conv = [Message("system", "Persona.")]
    for i in range(30):
        conv += [Message("user", f"question number {i} about things"), Message("assistant", f"answer {i} is here")]
    flags = trained_flags(conv)
    full_ids, full_mask = render_turns(tpl, smol_tokenizer, conv, flags)
    max_len = 120
    pieces, cut = windows(tpl, smol_tokenizer, conv, flags, max_len)
    assert cut == 0 and len(pieces) > 3 and len(full_ids) > 3 * max_len
    got = []
    for ids, mask in pieces:
        assert len(ids) <= max_len
        text = smol_tokenizer.decode(ids)
        assert "Persona." in text  # the system message heads every window
        assert text.count("question number") >= 1  # context from a user turn
        got += trained_runs(smol_tokenizer, ids, [i if m else IGNORE_INDEX for i, m in zip(ids, mask)])
    want = trained_runs(smol_tokenizer, full_ids, [i if m else IGNORE_INDEX for i, m in zip(full_ids, full_mask)])
    # every assistant turn, in order, exactly once. A vocabulary without a '</s>' token may merge its
    # last character with the next turn's '<' in one token; a window that ends there has no next turn.
    eot = tpl.end_of_turn
    assert [r[:r.index(eot) + len(eot)] for r in got] == [r[:r.index(eot) + len(eot)] for r in want]


def test_a_turn_longer_than_the_window_is_cut_and_counted(smol_tokenizer):
    tpl = get_template("chatml", smol_tokenizer)
    conv = [Message("user", "hi"), Message("assistant", "word " * 200)]
    examples, stats = build_examples([conv], smol_tokenizer, tpl, 64)
    assert stats.truncated == 1 and len(examples) == 1 and len(examples[0].ids) == 64
    assert examples[0].trained() > 0


def test_reverse_example_format(smol_tokenizer):
    tpl = get_template("chatml", smol_tokenizer)
    ctx = [Message("system", "S"), Message("user", "c1"), Message("assistant", "c2"), Message("user", "c3"),
           Message("user", "c4")]
    ids, mask = reverse_example_ids(smol_tokenizer, tpl, ctx, "reply", max_turns=3)
    eot, st = "<|im_end|>", "<|im_start|>"
    assert (ids, [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]) == expected(smol_tokenizer, labels=True, pieces=[
        (f"{st}user\n", "t", 0), ("reply", "c", 0), (f"{eot}\n{st}assistant\n", "t", 0), ("c4", "c", 1),
        (eot, "t", 1), (f"\n{st}user\n", "t", 0), ("c3", "c", 1), (eot, "t", 1),
        (f"\n{st}assistant\n", "t", 0), ("c2", "c", 1), (eot, "t", 1), ("\n", "t", 0)])
    short, _ = reverse_example_ids(smol_tokenizer, tpl, ctx, "reply", max_turns=3, max_len=len(ids) - 1)
    assert "c2" not in smol_tokenizer.decode(short) and "c3" in smol_tokenizer.decode(short)


def test_reverse_training_examples_one_per_trained_reply(smol_tokenizer):
    tpl = get_template("chatml", smol_tokenizer)
    examples, stats = build_examples([CONV], smol_tokenizer, tpl, 512, reverse=True)
    assert len(examples) == 2  # replies A1 (context U1) and A2 (context U1 A1 U2)
    assert trained_runs(smol_tokenizer, examples[1].ids, examples[1].labels) == [f"{U2}<|im_end|>", f"{A1}<|im_end|>",
                                                                                 f"{U1}<|im_end|>"]


def test_buckets_pack_and_collate():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47]
    batches = bucket_batches(lengths, 2, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[-1]]) <= 3 for b in batches)  # similar lengths together
    assert batches == bucket_batches(lengths, 2, seed=0, epoch=0) != bucket_batches(lengths, 2, seed=0, epoch=1)
    from dialogen.data.dataset import Example

    exs = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5], [IGNORE_INDEX, 5])]
    ids, labels = collate(exs, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]
    rows = pack(exs * 3, max_len=5, seed=0)
    assert all(len(r.ids) <= 5 for r in rows) and sum(len(r.ids) for r in rows) == 15
    assert sum(r.trained() for r in rows) == 9
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.long


def test_inspect_data_command(tiny_llama, tmp_path, capsys):
    from dialogen.cli import main

    path, _ = tiny_llama
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [m.to_dict() for m in CONV]}) + "\n")
    assert main(["inspect-data", "--data", str(f), "--model", str(path), "--template", "chatml", "-n", "1",
                 "--rows", "0", "--color", "never"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("| YES", "| no"))]
    ids, labels = expected(smol_tokenizer_of(path), labels=True, pieces=[
        ("<|im_start|>user\n", "t", 0), (U1, "c", 0), ("<|im_end|>\n<|im_start|>assistant\n", "t", 0),
        (A1, "c", 1), ("<|im_end|>", "t", 1), ("\n<|im_start|>user\n", "t", 0), (U2, "c", 0),
        ("<|im_end|>\n<|im_start|>assistant\n", "t", 0), (A2, "c", 1), ("<|im_end|>", "t", 1), ("\n", "t", 0)])
    assert len(rows) == len(ids) - 1  # one row per predicted token
    assert [r.rstrip().endswith("YES") for r in rows] == [x != IGNORE_INDEX for x in labels[1:]]
    assert f"[[{A1}<|im_end|>]]" in out and f"[[{A2}<|im_end|>]]" in out
    assert "1 conversations, 4 turns (2 trained)" in out and "0 truncated windows" in out


def smol_tokenizer_of(path):
    from dialogen.models.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)
