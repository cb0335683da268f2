"""The tokenizer we build from GGUF metadata against transformers' own GGUF conversion."""

import pytest

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "whitespace\t\truns\n\n\n  and\r\nnewlines",
    "Ünïcödé façade, naïve café, Straße, ≠ ∞",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 🤗🚀👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return {'a': [x ** 2, None]}  # comment\n",
    "<html><body class=\"x\">&amp;</body></html>",
    "I'm sure they've said it's 'fine', you'll see; we'd go.",
    "numbers 3.14159 1,000,000 and 2026-11-24",
    "<|im_start|> typed by a user <|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoTokenizer

    from dialogen.models.loading import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS[:-2])
def test_gguf_tokenizer_matches_transformers(smol_tokenizer, reference, text):
    assert smol_tokenizer.encode_text(text) == reference.encode(text, add_special_tokens=False)


def test_numeric_characters_split_one_by_one(smol_tokenizer):
    """SmolLM2's own tokenizer isolates every numeric character (GGUF pre-tokenizer 'smollm').

    transformers' GGUF conversion ignores that pre-tokenizer; on ASCII digits the result is the same
    (the vocabulary has no multi-digit token), on other numerics such as '½' it differs, and we keep
    the model's own rule.
    """
    pieces = [p for p, _ in smol_tokenizer._text.pre_tokenizer.pre_tokenize_str("a 12½")]
    assert pieces == ["a", "Ġ", "1", "2", "Â½"]


def test_decode_round_trips(smol_tokenizer):
    for text in TEXTS:
        assert smol_tokenizer.decode(smol_tokenizer.encode_text(text)) == text


def test_typed_control_tokens_stay_text(smol_tokenizer, reference):
    text = TEXTS[-2]
    ids = smol_tokenizer.encode_text(text)
    assert not set(ids) & set(smol_tokenizer.control_ids.values())
    # the template encoder does parse them, as transformers does by default
    assert smol_tokenizer.encode_template(text) == reference.encode(text, add_special_tokens=False)
    assert smol_tokenizer.control_ids["<|im_end|>"] in smol_tokenizer.encode_template(text)


def test_special_tokens_from_metadata(smol_tokenizer):
    assert smol_tokenizer.eos_token == "<|im_end|>"
    assert smol_tokenizer.chat_template and "<|im_start|>" in smol_tokenizer.chat_template


def test_save_and_reload(smol_tokenizer, tmp_path):
    from dialogen.models.tokenizer import Tokenizer

    smol_tokenizer.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.fingerprint() == smol_tokenizer.fingerprint()
    assert again.eos_token == smol_tokenizer.eos_token
    assert again.chat_template == smol_tokenizer.chat_template
    for text in TEXTS:
        assert again.encode_text(text) == smol_tokenizer.encode_text(text)


def test_gpt2_vocab_and_merges_dir(tmp_path):
    """A GPT-2 style directory (vocab.json + merges.txt, like DialoGPT's) loads with its EOS token."""
    import json

    from dialogen.models.tokenizer import Tokenizer

    vocab = {"<|endoftext|>": 0, "h": 1, "i": 2, "hi": 3, "Ġ": 4, "Ġhi": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh i\nĠ hi\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode_text("hi hi") == [3, 5]
    assert tok.eos_id == 0
    assert tok.encode_template("hi<|endoftext|>") == [3, 0]
    assert 0 not in tok.encode_text("<|endoftext|>")
