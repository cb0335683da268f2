"""GGUF vocabularies built here, without a model hub, and the strings the tokenizer tests run on.

- a SentencePiece BPE model trained with the `sentencepiece` package on chitchat turns, written as a
  `llama` vocabulary the way llama.cpp's converter does (pieces, scores, token types);
- a byte-level BPE trained with `tokenizers`, written as a `gpt2` vocabulary with a given `pre`.
"""

import io
import itertools
import random

CONTROL = ["<|im_start|>", "<|im_end|>"]
USER = ["<h1>", "<sep>"]
BPE_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_USER = ["<think>"]

_EXTRA = [
    "Ünïcödé façade, naïve café, Straße, ≠ ∞ ½ Ωmega Жизнь",
    "日本語のテキストと中文文本，한국어 텍스트",
    "def f(x):\n    return {'a': [x ** 2, None]}  # comment\n\tif a < b and c > d: pass",
    "<html><body class=\"x\">&amp; a|b ~c ^d $e @f #g %h</body></html>",
    "I'm sure they've said it's 'fine', you'll see; we'd go. DON'T SHOUT",
    "numbers 3.14159 1,000,000 and 2026-11-24, 42 apples, 7 days, 100%",
    "emoji 🤗🚀 and more words   with   spaces\n\n\nand newlines\r\n",
]


def corpus(n_convos: int = 300) -> list[str]:
    import chitchat_dataset as ccc

    lines = [m["text"] for convo in itertools.islice(ccc.Dataset().values(), n_convos)
             for turn in convo["messages"] for m in turn]
    return lines + _EXTRA * 30


def train_sentencepiece(vocab_size: int = 1500):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, user_defined_symbols=USER, control_symbols=CONTROL, character_coverage=0.9995,
        allow_whitespace_only_pieces=True, minloglevel=2, num_threads=1)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def _writer(path, arch: str = "llama", model=None):
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    cfg = model.config if model is not None else None
    w.add_block_count(cfg.num_hidden_layers if cfg else 1)
    w.add_context_length(cfg.max_position_embeddings if cfg else 64)
    w.add_embedding_length(cfg.hidden_size if cfg else 8)
    w.add_feed_forward_length(cfg.intermediate_size if cfg else 8)
    w.add_head_count(cfg.num_attention_heads if cfg else 1)
    w.add_layer_norm_rms_eps(1e-5)  # llama.cpp reads the hyperparameters even for the vocabulary alone
    return w


def _close(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_llama_weights(w, model):
    """A transformers llama's hyperparameters and float32 weights, as llama.cpp's converter lays
    them out (the q/k rows of each head permuted for its rotary)."""
    import numpy as np

    cfg = model.config
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)  # the tests' tiny models' (conftest)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf_name, t in model.state_dict().items():
        stem = hf_name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            i, rest = stem.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{i}.{layer[rest]}.weight"
        else:
            name = f"{names[stem]}.weight"
        a = t.detach().float().numpy()
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(name.split(".")[-2])
        if heads:  # (heads, 2 halves, dim/2, in) -> the halves interleaved
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(name, np.ascontiguousarray(a))


def write_sentencepiece_gguf(path, sp, arch: str = "llama", model=None, **flags):
    """`flags`: add_space_prefix, add_bos_token, add_eos_token, name (left out when None); `model`:
    a transformers llama whose weights the file carries too."""
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]

    def kind(i):
        return (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                else 4 if tokens[i] in USER else 5 if sp.is_unused(i) else 1)

    w = _writer(path, arch, model)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    for key, value in flags.items():
        if value is not None:
            getattr(w, f"add_{key}")(value)
    w.add_chat_template("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                        "'<|im_end|>\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    if model is not None:
        write_llama_weights(w, model)
    _close(w)
    return path


def train_byte_level(vocab_size: int = 2500):
    """(tokens, merges) of a byte-level BPE vocabulary, the control and user tokens at its end."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + BPE_CONTROL + BPE_USER
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_byte_level_gguf(path, tokens, merges, pre, add_bos=None, model=None):
    """`model`: a transformers llama whose weights the file carries too."""
    w = _writer(path, "llama", model)
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in BPE_CONTROL else 4 if t in BPE_USER else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if model is not None:
        write_llama_weights(w, model)
    _close(w)
    return path


_POOLS = {
    "words": ["hello", "Hello", "WORLD", "the", "don't", "they'll", "I'M", "x", "naïve", "Straße", "aÉb", "HTMLParser",
              "camelCase", "snake_case", "über", "ΑΒΓ", "Жизнь", "İstanbul", "ǅ"],
    "space": [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "    ", "\u3000", "\u00a0", "\t \t"],
    "digits": ["0", "7", "42", "123", "1234", "3.14", "1,000,000", "2026-11-24", "٣٤", "½", "Ⅻ", "007"],
    "unicode": ["日本語", "中文", "한국어", "ありがとう", "façade", "∞", "≠", "→", "ก", "हिन्दी", "עברית", "ٱلْعَرَبِيَّة"],
    "emoji": ["😀", "🤗", "👩‍👩‍👧", "🇫🇷", "❤️", "👍🏽", "🚀🚀"],
    "punct": [",", ".", "!", "?", "...", "'", "\"", "(", ")", "[", "]", "{", "}", "<", ">", "/", "\\", "-", "_",
              "=", "+", "*", "&", "^", "%", "$", "#", "@", "~", "`", "|", ":", ";", "—", "“", "”"],
    "control": ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "<|endoftext|>", "<h1>", "<sep>", "<think>",
                "<|im_end", "im_end|>"],
}

FIXED = [
    "Hello, world!", "  leading spaces", "trailing spaces   ", " ", "  ", "\n", "\n\nnew", "a\tb", "x  y", "a\u00a0b",
    "whitespace\t\truns\n\n\n  and\r\nnewlines", "emoji 🤗🚀👩‍👩‍👧 and flags 🇫🇷", "日本語のテキストと中文文本，한국어 텍스트",
    "<|im_start|>user\nhi<|im_end|>\n", "a <|im_end|> b", "<h1>Title<sep>x", "<think>hm</think>", "</s><s>",
    "I'm sure they've said it's 'fine'", "numbers 3.14159 1,000,000 and 2026-11-24", "1234567890", "ABCDEFabcdef",
    "def f(x):\n    return x ** 2\n", "\t\tindented", "é😀", "aÉ", "ÉTÉ été", "ǅungla", "ﬁne", "x" * 300,
]


def strings(n: int = 520) -> list[str]:
    """`FIXED`, then random mixes of the pools: whitespace runs, digits, unicode, emoji, control-token
    text, leading spaces and newlines."""
    rng = random.Random(23)
    names = list(_POOLS)
    out = list(FIXED)
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 10)):
            pool = _POOLS[rng.choice(names)]
            parts.append(rng.choice(pool))
            if rng.random() < 0.4:
                parts.append(rng.choice(_POOLS["space"]))
        s = "".join(parts)
        if rng.random() < 0.2:
            s = " " * rng.randint(1, 3) + s
        out.append(s)
    return out
