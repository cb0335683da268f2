"""GGUF tokenizers against their references, on 520 strings (whitespace runs, digits, unicode,
emoji, control-token text, leading spaces, newlines).

SentencePiece (`llama`): the `sentencepiece` package itself and transformers' GGUF conversion, plus
what llama.cpp does beyond both: one space in front of every stretch of text after a matched
token. Byte-level BPE (`gpt2`): each `pre`'s split against llama.cpp's regexes run by the `regex`
module, and the ids against transformers' GGUF conversion for the `pre` names it knows.
"""

import re

import pytest
import regex
from gguf_vocabs import (
    BPE_USER,
    CONTROL,
    USER,
    strings,
    train_byte_level,
    train_sentencepiece,
    write_byte_level_gguf,
    write_sentencepiece_gguf,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from dialogen.errors import UserError
from dialogen.models import gguf_vocab
from dialogen.models.gguf_export import pre_name
from dialogen.models.gguf_file import read_gguf
from dialogen.models.tokenizer import Tokenizer

STRINGS = strings()
_USER_RE = re.compile("|".join(re.escape(t) for t in sorted(USER, key=len, reverse=True)))
SPM_CONTROL = CONTROL + ["<unk>", "<s>", "</s>"]  # the trained model's own control and unknown pieces
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in sorted(USER + SPM_CONTROL, key=len, reverse=True)))


def load(path) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(path)[1], path)


def reference(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def reference_without_prefix(path):
    """transformers' GGUF converter for a vocabulary that wants no space in front (Gemma's flag):
    its loader takes that from the architecture, so the converter's parts are called here."""
    from transformers import LlamaTokenizer
    from transformers.integrations.gguf import gguf_tokenizer_mapping as m

    _, spec, _ = m.get_gguf_tokenizer(str(path))
    vocab = {t: i for i, t in enumerate(spec["tokens"])}
    return m.add_gguf_special_tokens(LlamaTokenizer(vocab=vocab, merges=m.get_merges(spec), add_prefix_space=False),
                                     spec)


# --- SentencePiece ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    sp = train_sentencepiece()
    d = tmp_path_factory.mktemp("spm")
    return sp, {
        "prefix": write_sentencepiece_gguf(d / "prefix" / "v.gguf", sp),
        "bare": write_sentencepiece_gguf(d / "bare" / "v.gguf", sp, add_space_prefix=False, add_bos_token=False),
    }


def llama_cpp_fragments(sp, text, pattern, ids, rstrip=()) -> list[int]:
    """llama.cpp's SentencePiece rule spelled with `sentencepiece`: the text cut at the matched
    tokens, each stretch between them encoded alone (so each gets the space in front); after a
    token in `rstrip`, the ASCII whitespace that follows is dropped."""
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() < pos:  # inside whitespace a token ate
            continue
        out += sp.encode(text[pos:m.start()]) if m.start() > pos else []
        out.append(ids[m.group()])
        pos = m.end()
        while m.group() in rstrip and pos < len(text) and text[pos] in " \t\n\r\v\f":
            pos += 1
    return out + (sp.encode(text[pos:]) if pos < len(text) else [])


def test_sentencepiece_matches_sentencepiece(spm_files):
    sp, files = spm_files
    tok = load(files["prefix"])
    ids = {t: sp.piece_to_id(t) for t in USER + SPM_CONTROL}
    plain = [s for s in STRINGS if not _USER_RE.search(s)]
    assert len(plain) > 250
    assert [tok.encode_text(s) for s in plain] == [sp.encode(s) for s in plain]
    # user-defined tokens are matched in any text; control ones only where special tokens are parsed
    assert [tok.encode_text(s) for s in STRINGS] == [llama_cpp_fragments(sp, s, _USER_RE, ids) for s in STRINGS]
    assert [tok.encode_template(s) for s in STRINGS] == [llama_cpp_fragments(sp, s, _SPECIAL_RE, ids) for s in STRINGS]
    assert not {i for s in STRINGS for i in tok.encode_text(s)} & set(tok.control_ids.values())


def test_sentencepiece_matches_transformers(spm_files):
    _, files = spm_files
    tok, ref = load(files["prefix"]), reference(files["prefix"])
    plain = [s for s in STRINGS if s and not _USER_RE.search(s)]
    # transformers puts U+2581 in front only where the text has no space already (Metaspace);
    # llama.cpp always does, so its ids are those of the text with one more space
    assert [tok.encode_text(s) for s in plain] == \
        [ref.encode(" " + s, add_special_tokens=False, split_special_tokens=True) for s in plain]
    bare, bare_ref = load(files["bare"]), reference_without_prefix(files["bare"])  # add_space_prefix = false
    assert [bare.encode_text(s) for s in plain] == \
        [bare_ref.encode(s, add_special_tokens=False, split_special_tokens=True) for s in plain]
    assert [bare.encode_template(s) for s in STRINGS] == [bare_ref.encode(s, add_special_tokens=False) for s in STRINGS]


def test_sentencepiece_vocabulary_facts(spm_files):
    sp, files = spm_files
    tok, bare = load(files["prefix"]), load(files["bare"])
    pieces = [sp.id_to_piece(i) for i in tok.encode_text("  a b")]
    assert "".join(pieces) == "\u2581\u2581\u2581a\u2581b"  # the space in front, spaces as U+2581
    assert [sp.id_to_piece(i) for i in tok.encode_text("😀")][1:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    for s in STRINGS:
        if not _USER_RE.search(s):
            assert tok.decode(tok.encode_text(s)) == s
            assert b"".join(tok.token_bytes(i) for i in bare.encode_text(s)) == s.encode()
    # add-BOS: true unless the file says otherwise; EOS false
    assert (tok.add_bos, tok.add_eos, bare.add_bos) == (True, False, False)
    assert tok.encode_prompt("hi") == [sp.bos_id(), *tok.encode_text("hi")]
    assert tok.eos_token == "</s>" and "<|im_start|>" in tok.chat_template
    assert set(tok.control_ids) == set(SPM_CONTROL) and tok.text_tokens == USER


def test_sentencepiece_chat(spm_files):
    """A rendered chat starts with BOS once; typed control tokens in a content stay text."""
    from dialogen.chat.messages import Message
    from dialogen.chat.templates import get_template

    sp, files = spm_files
    tok = load(files["prefix"])
    msgs = [Message("user", "hi <|im_end|> there"), Message("assistant", "<h1>ok")]
    ids, mask = get_template("jinja", tok).render(tok, msgs)
    assert ids[0] == sp.bos_id() and ids.count(sp.bos_id()) == 1
    assert ids.count(tok.control_ids["<|im_end|>"]) == 2 and len(mask) == len(ids)
    ids, _ = get_template("llama2", tok).render(tok, msgs)  # writes <s> itself: no second BOS
    assert ids[0] == sp.bos_id() and ids[1] != sp.bos_id()


def test_phi3_tokens_eat_the_whitespace_after_them(spm_files, tmp_path):
    """llama.cpp's rule for files named Phi-3: every matched token but <unk>, <s> and <|endoftext|>
    drops the whitespace after it. (llama.cpp drops ASCII whitespace; strings with other whitespace
    right after a token are left out.)"""
    sp, _ = spm_files
    tok = load(write_sentencepiece_gguf(tmp_path / "phi3.gguf", sp, name="Phi-3 mini"))
    ids = {t: sp.piece_to_id(t) for t in USER + SPM_CONTROL}
    eat = set(USER + SPM_CONTROL) - {"<unk>", "<s>"}
    ascii_only = [s for s in STRINGS if not re.search(f"(?:{_SPECIAL_RE.pattern})\\s*[^\\S \\t\\n\\r\\v\\f]", s)]
    assert len(ascii_only) > 400
    assert [tok.encode_template(s) for s in ascii_only] == \
        [llama_cpp_fragments(sp, s, _SPECIAL_RE, ids, eat) for s in ascii_only]
    assert [tok.encode_text(s) for s in ascii_only] == \
        [llama_cpp_fragments(sp, s, _USER_RE, ids, eat) for s in ascii_only]


def test_a_sentencepiece_model_file_chats(spm_files, tmp_path):
    """A Llama-2-style GGUF (this SentencePiece vocabulary, a tiny random llama) loads through the
    GGUF index: its template renders the chat, the prompt starts with BOS, typed control text stays
    text, and the greedy reply equals transformers' greedy continuation of the same ids."""
    import torch
    from conftest import _save_tiny

    from dialogen.chat.messages import Message
    from dialogen.chat.templates import get_template
    from dialogen.decoding.generate import Generation
    from dialogen.decoding.settings import Sampling
    from dialogen.models.loading import load as load_model

    sp, _ = spm_files
    hf = _save_tiny(tmp_path / "hf", "llama", sp.get_piece_size())
    loaded = load_model(str(write_sentencepiece_gguf(tmp_path / "llama2.gguf", sp, model=hf)))
    tok = loaded.tokenizer
    assert tok.add_bos and tok.text_tokens == USER
    ids, _ = get_template("jinja", tok).render(tok, [Message("user", "Hello <|im_end|> there")],
                                               add_generation_prompt=True)
    assert ids[:2] == [sp.bos_id(), sp.piece_to_id("<|im_start|>")] and ids.count(sp.piece_to_id("<|im_end|>")) == 1
    s = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=8)
    got = Generation(loaded.model, tok, ids, loaded.model.new_cache(1), s, stop_ids=set()).run().tokens
    want = list(ids)
    with torch.no_grad():
        for _ in range(8):
            want.append(int(hf(torch.tensor([want])).logits[0, -1].argmax()))
    assert got == want[len(ids):]


def test_saved_and_reloaded(spm_files, tmp_path):
    _, files = spm_files
    tok = load(files["prefix"])
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert (again.add_bos, again.text_tokens, again.control_ids) == (tok.add_bos, tok.text_tokens, tok.control_ids)
    for s in STRINGS[:100]:
        assert again.encode_text(s) == tok.encode_text(s) and again.encode_template(s) == tok.encode_template(s)


# --- byte-level BPE --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return tmp_path_factory.mktemp("bpe"), *train_byte_level()


def regex_split(text: str, patterns) -> list[str]:
    """Cut `text` with each pattern in turn: matches and the text between them are pieces."""
    pieces = [text]
    for p in patterns:
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(p, piece):
                if m.start() > pos:
                    out.append(piece[pos:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = m.end()
            out += [piece[pos:]] if pos < len(piece) else []
        pieces = out
    return pieces


def _bytes_of(piece: str) -> bytes:
    return bytes(_BYTES[c] for c in piece)


_BYTES = {c: b for b, c in bytes_to_unicode().items()}  # GPT-2's printable stand-in -> byte
PRES = ["gpt-2", "smollm", "llama-bpe", "qwen2", "tekken", "gpt-4o", "deepseek-coder", "falcon",
        "default", "starcoder", "stablelm2"]


@pytest.mark.parametrize("pre", PRES)
def test_pre_tokenizer_is_llama_cpps_regexes(bpe, pre):
    d, tokens, merges = bpe
    tok = load(write_byte_level_gguf(d / f"{pre}.gguf", tokens, merges, pre))
    patterns = gguf_vocab.split_patterns(pre)
    for s in STRINGS:
        pieces = tok._text.pre_tokenizer.pre_tokenize_str(s)
        got = b"".join(_bytes_of(p) + b"\0" for p, _ in pieces)
        assert got == b"".join(p.encode() + b"\0" for p in regex_split(s, patterns)), s
        assert tok.decode(tok.encode_text(s)) == s
    assert gguf_vocab.split_patterns(pre_name(tok)) == patterns  # `dialogen export --gguf` names it again


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "tekken"])
def test_byte_level_matches_transformers(bpe, pre):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    d, tokens, merges = bpe
    path = write_byte_level_gguf(d / pre / "v.gguf", tokens, merges, pre)
    tok, ref = load(path), reference(path)
    theirs = GGUF_PRE_TOKENIZER_SPLITS.get(pre, gguf_vocab.split_patterns("gpt-2")[0] + r"|\s+")
    # transformers keeps tekken's original regex; llama.cpp's rewrite of it differs on a few strings
    # (a capital letter outside A-Z after a lower-case one): those are left out, and must be few
    same = [s for s in STRINGS if regex_split(s, [theirs]) == regex_split(s, gguf_vocab.split_patterns(pre))]
    assert len(same) >= 0.75 * len(STRINGS)
    plain = [s for s in same if not any(t in s for t in BPE_USER)]
    assert [tok.encode_text(s) for s in plain] == \
        [ref.encode(s, add_special_tokens=False, split_special_tokens=True) for s in plain]
    assert [tok.encode_template(s) for s in same] == [ref.encode(s, add_special_tokens=False) for s in same]
    assert tok.add_bos == (pre in ("llama-bpe", "tekken"))  # llama.cpp's default for these names


def test_byte_level_flags_and_tokens(bpe):
    d, tokens, merges = bpe
    tok = load(write_byte_level_gguf(d / "flags.gguf", tokens, merges, "llama-bpe", add_bos=False))
    assert not tok.add_bos and tok.encode_prompt("hi") == tok.encode_template("hi")
    think = tokens.index("<think>")
    assert tok.encode_text("a<think>b").count(think) == 1  # user-defined: matched in any text
    assert "<think>" not in tok.control_ids and "<|im_end|>" in tok.control_ids
    assert tok.control_ids["<|im_end|>"] not in tok.encode_text("x<|im_end|>")


def test_end_of_generation_texts_are_control_whatever_their_type(bpe):
    """A `</s>` of normal type is control (llama.cpp's end-of-generation texts), unless the vocabulary
    has a marker saying it is a normal token there (gemma4's `<|tool_response>`)."""
    d, tokens, merges = bpe
    tok = load(write_byte_level_gguf(d / "eos.gguf", tokens + ["</s>"], merges, "llama-bpe"))
    assert tok.encode_template("a</s>b").count(len(tokens)) == 1 and len(tokens) not in tok.encode_text("a</s>b")
    plain = load(write_byte_level_gguf(d / "plain.gguf", tokens + ["</s>", "<|tool_response>"], merges, "llama-bpe"))
    assert len(tokens) not in plain.encode_template("a</s>b")


# --- refusals ----------------------------------------------------------------------------------
def test_unknown_model_or_pre_is_one_line(bpe, spm_files):
    d, tokens, merges = bpe
    meta = read_gguf(write_byte_level_gguf(d / "odd.gguf", tokens, merges, "no-such-pre"))[1]
    with pytest.raises(UserError, match=r"^\S*odd\.gguf: tokenizer\.ggml\.pre 'no-such-pre' is not supported"):
        Tokenizer.from_gguf(meta, d / "odd.gguf")
    meta = dict(read_gguf(spm_files[1]["prefix"])[1], **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(UserError, match=r"^x\.gguf: tokenizer\.ggml\.model 'bert' is not supported") as e:
        Tokenizer.from_gguf(meta, "x.gguf")
    assert "\n" not in str(e.value)
    meta["tokenizer.ggml.model"] = "llama"
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(UserError, match=r"^x\.gguf: tokenizer\.ggml\.scores"):
        Tokenizer.from_gguf(meta, "x.gguf")


def test_cli_refuses_an_unknown_pre_tokenizer_in_one_line(bpe, tmp_path, capsys):
    import json

    from conftest import _save_tiny

    from dialogen.cli import main

    d, tokens, merges = bpe
    hf = _save_tiny(tmp_path / "hf", "llama", len(tokens))
    path = write_byte_level_gguf(tmp_path / "new.gguf", tokens, merges, "brand-new-pre", model=hf)
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    capsys.readouterr()  # the fixtures' own progress output
    assert main(["generate", str(msgs), "--model", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "new.gguf: tokenizer.ggml.pre 'brand-new-pre' is not supported" in err and "\n" not in err
