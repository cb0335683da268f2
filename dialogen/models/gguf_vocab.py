"""A GGUF file's vocabulary as a `tokenizers` pipeline that gives llama.cpp's ids.

A GGUF describes its tokenizer with llama.cpp's keys: `tokenizer.ggml.model` says which algorithm,
`tokenizer.ggml.tokens` the pieces, `tokenizer.ggml.token_type` each piece's kind (1 normal,
2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte). How llama.cpp tokenizes, and what stands
for each step here:

- Control and unknown tokens are matched in the text only where special tokens are parsed;
  user-defined ones always, before anything else. Here: added tokens matched on the raw text,
  `special` for control, plain for user-defined. llama.cpp also treats a few end-of-turn and
  fill-in-the-middle texts (`<|im_end|>`, `<end_of_turn>`, ...) as control whatever their type.
- `llama` (SentencePiece): every stretch of text between matched tokens gets one space in front
  (`tokenizer.ggml.add_space_prefix`, true unless it says otherwise), spaces become U+2581, and the
  stretch is merged pair by pair, the pair whose joined piece has the highest score first (BPE over
  scores, not Unigram); characters no piece covers become `<0xNN>` byte tokens. Here: normalizer
  Prepend + Replace, no pre-tokenizer, BPE with merges ranked by score, byte fallback.
- `gpt2` (byte-level BPE): the text is cut by the regexes of `tokenizer.ggml.pre` in turn, bytes
  are spelled with GPT-2's printable stand-ins, merges apply by rank. Some pre-tokenizers first take
  a whole piece that is itself a token (`ignore_merges`).
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"

# Texts llama.cpp makes control tokens (end of generation, fill-in-the-middle) whatever their type.
CONTROL_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "_<EOT>", "<|eom_id|>", "<end_of_utterance>", "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "<|fim_middle|>", "<fim-middle>", "<fim_middle>",
    "<MID>", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>",
    "<REPO>", "<reponame>", "<|file_sep|>", "</s>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "[EOT]",
    "[EOS]", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
])
# with one of these in the vocabulary, a `</s>` of normal type stays normal (llama.cpp: gemma4, plamo)
NORMAL_END_MARKERS = ("<|tool_response>", "<|plamo:eos|>")

# --- pre-tokenizer regexes (llama.cpp's, applied one after another) -----------------------------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# "upper-case run" and "lower-case run" as llama.cpp writes them: a letter not in a-z, a letter not in A-Z
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_SPLITS = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "tekken": (_TEKKEN,),
    "gpt-4o": (_GPT4O,),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
}
# `tokenizer.ggml.pre` names -> (regex set, whether a piece that is a token skips the merges, add BOS by default)
PRE = {
    "default": ("default", False, False),
    **{n: ("gpt-2", False, False) for n in ("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "exaone4")},
    **{n: ("smollm", False, False) for n in ("smollm", "starcoder", "refact", "command-r", "codeshell",
                                             "exaone", "minerva-7b")},
    **{n: ("llama3", True, True) for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1",
                                           "pixtral", "midm-2.0", "lfm2")},
    **{n: ("llama3", False, False) for n in ("dbrx", "smaug-bpe")},
    **{n: ("qwen2", False, False) for n in ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2")},
    "tekken": ("tekken", True, True),
    **{n: ("gpt-4o", False, False) for n in ("gpt-4o", "llama4")},
    "falcon": ("falcon", False, False),
    "deepseek-coder": ("deepseek-coder", False, False),
}


def split_patterns(pre: str) -> tuple[str, ...]:
    """The regexes llama.cpp cuts text with for a `tokenizer.ggml.pre` name, in order."""
    return _SPLITS[PRE[pre][0]]


def byte_level_pre_tokenizer(pre: str):
    splits = [pre_tokenizers.Split(Regex(p), "isolated") for p in split_patterns(pre)]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# --- building ------------------------------------------------------------------------------
def build(meta: dict, source: str) -> tuple[HFTokenizer, dict]:
    """(tokenizer, facts): facts holds the special tokens, the add-BOS/EOS flags and the
    user-defined tokens. `source` names the file in errors."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind not in ("llama", "gpt2"):
        raise UserError(f"{source}: tokenizer.ggml.model {kind!r} is not supported; supported: "
                        "'llama' (SentencePiece), 'gpt2' (byte-level BPE)")
    if not tokens:
        raise UserError(f"{source}: tokenizer.ggml.tokens is missing or empty")
    pre = meta.get("tokenizer.ggml.pre", "default") if kind == "gpt2" else None
    if pre is not None and pre not in PRE:
        raise UserError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: {', '.join(sorted(PRE))}")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) < len(tokens):
        raise UserError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = _vocab(tokens, source)
    if kind == "llama":
        hf, add_bos = _sentencepiece(meta, tokens, vocab, types, source), True
    else:
        hf, add_bos = _byte_level(meta, vocab, pre, source), PRE[pre][2]
    texts = CONTROL_TEXTS - ({"</s>"} if any(m in vocab for m in NORMAL_END_MARKERS) else set())
    control = [t for t, k in zip(tokens, types) if k in (UNKNOWN, CONTROL) or t in texts]
    control_set = set(control)
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t not in control_set]
    rstrip = _rstrip(meta)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=rstrip(t)) for t in control])
    hf.add_tokens([AddedToken(t, special=False, normalized=False, rstrip=rstrip(t)) for t in user])

    def tok(key, default=None):
        i = meta.get(f"tokenizer.ggml.{key}", default)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    facts = {"eos_token": tok("eos_token_id", 2 if kind == "llama" else None),
             "bos_token": tok("bos_token_id", 1 if kind == "llama" else None),
             "pad_token": tok("padding_token_id"),
             "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", add_bos)),
             "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
             "user_defined": user}
    for flag, token in (("add_bos", "bos_token"), ("add_eos", "eos_token")):
        if facts[flag] and facts[token] is None:
            raise UserError(f"{source}: tokenizer.ggml.{flag}_token is true, but the file names no {token}")
    return hf, facts


def _rstrip(meta: dict):
    """Which matched tokens eat the whitespace after them: llama.cpp does that for Phi-3 (found by
    `general.name`), for all of them but `<unk>`, `<s>` and `<|endoftext|>`."""
    name = str(meta.get("general.name", "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return lambda t: False
    return lambda t: t not in ("<unk>", "<s>", "<|endoftext|>")


def _vocab(tokens: list[str], source: str) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        t = t or f"[EMPTY_{i}]"  # as llama.cpp names an empty piece
        if vocab.setdefault(t, i) != i:
            raise UserError(f"{source}: tokenizer.ggml.tokens has {t!r} twice (ids {vocab[t]} and {i})")
    return vocab


def _byte_level(meta: dict, vocab: dict[str, int], pre: str, source: str) -> HFTokenizer:
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or ():
        cut = m.find(" ", 1)  # a merge is "left right"; the left part is never empty
        if cut < 0 or m[:cut] not in vocab or m[cut + 1:] not in vocab or m[:cut] + m[cut + 1:] not in vocab:
            raise UserError(f"{source}: tokenizer.ggml.merges has {m!r}, which is not a merge of two tokens into one")
        merges.append((m[:cut], m[cut + 1:]))
    if not merges:
        raise UserError(f"{source}: tokenizer.ggml.merges is missing (a 'gpt2' vocabulary needs its merges)")
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=PRE[pre][1]))
    hf.pre_tokenizer = byte_level_pre_tokenizer(pre)
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece(meta: dict, tokens: list[str], vocab: dict[str, int], types: list[int],
                   source: str) -> HFTokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) < len(tokens):
        raise UserError(f"{source}: tokenizer.ggml.scores is missing or shorter than the vocabulary")
    unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
    unk_token = tokens[unk] if 0 <= unk < len(tokens) else None
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=score_merges(tokens, scores), unk_token=unk_token,
                                byte_fallback=True, fuse_unk=False))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    hf.pre_tokenizer = None
    steps = [decoders.Strip(" ", 1, 0)] if prefix else []
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *steps])
    return hf


def score_merges(tokens: list[str], scores) -> list[tuple[str, str]]:
    """Every way to join two pieces into a third, best-scored result first: llama.cpp merges the
    adjacent pair whose joined text is the highest-scoring piece, so that score is the merge's rank.
    Ties keep the vocabulary's order (a trained SentencePiece model's scores do not tie)."""
    known = set(tokens).__contains__
    out = [(-float(scores[i]), i, t[:k], t[k:]) for i, t in enumerate(tokens) for k in range(1, len(t))
           if known(t[:k]) and known(t[k:])]
    out.sort(key=lambda m: (m[0], m[1]))
    return [(a, b) for _, _, a, b in out]
