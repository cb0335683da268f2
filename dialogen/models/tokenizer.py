"""Tokenizer: a Hugging Face `tokenizers.Tokenizer` plus the special tokens a chat needs.

Every added token of the vocabulary is a control token here, whatever its `special` flag says
(real files often leave it false), except the `text_tokens` a GGUF vocabulary marks user-defined:
those are matched in any text and are never control. Three encoders share one vocabulary:
- `encode_template` parses control tokens, as transformers does by default;
- `encode_text` never produces one: `<|im_end|>` typed by a user stays those characters;
- `encode_chat` tokenizes a rendered chat whole, as transformers' `apply_chat_template` does, but no
  control token may come from inside a message's content.
GGUF vocabularies carry llama.cpp's add-BOS/EOS flags: `encode_chat` starts with BOS when the
flag is set and the template wrote none; `encode_prompt` is llama.cpp's tokenize of a raw prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
from bisect import bisect_left
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models

from ..errors import UserError
from . import gguf_vocab


def _pre_tokenizer(pre: str):
    """The byte-level pre-tokenizer of a GGUF `tokenizer.ggml.pre` name."""
    return gguf_vocab.byte_level_pre_tokenizer(pre)


class Tokenizer:
    def __init__(self, hf: HFTokenizer, eos_token: str | None = None, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None, add_bos: bool = False,
                 add_eos: bool = False, text_tokens=(), added: dict | None = None):
        self._tmpl = hf
        self.text_tokens = list(text_tokens)
        # {id: AddedToken} of hf (`added`: the caller's copy); fetched once, as it builds every entry anew
        added = hf.get_added_tokens_decoder() if added is None else added
        self._text = _without_added_tokens(hf, added, self.text_tokens)
        self.eos_token, self.bos_token, self.chat_template = eos_token, bos_token, chat_template
        self.pad_token = pad_token or eos_token
        self.add_bos, self.add_eos = add_bos, add_eos
        plain = set(self.text_tokens)
        self.control_ids = {t.content: i for i, t in added.items() if t.content not in plain}
        self._control = frozenset(self.control_ids.values())
        self._splitter = _control_splitter(added, self.control_ids)
        self._segments: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}

    # --- encoding -------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self._text.encode(text, add_special_tokens=False).ids if text else []

    def encode_template(self, text: str) -> list[int]:
        return self._tmpl.encode(text, add_special_tokens=False).ids if text else []

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt as llama.cpp tokenizes it: control tokens parsed, BOS and EOS as the
        vocabulary's flags say."""
        bos = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        eos = [self.eos_id] if self.add_eos and self.eos_id is not None else []
        return bos + self.encode_template(text) + eos

    def encode_chat(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """A rendered chat -> (ids, character offsets), tokenized as one string.

        `spans` are the (start, end) character ranges of message contents, in text order. Where a
        control token would overlap one, that span alone is encoded again as plain text, cut off
        from its neighbours; everywhere else the ids are those of the whole string.
        """
        plain: list[tuple[int, int]] = []
        while True:
            ids, offsets = self._encode_pieces(text, plain)
            bad = self._spans_with_control(ids, offsets, spans)
            if not bad or set(bad) <= set(plain):
                break
            plain = sorted(set(plain) | set(bad))
        bos = self.bos_id if self.add_bos else None
        if bos is not None and ids[:1] != [bos]:  # llama.cpp starts every prompt with BOS
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
        return ids, offsets

    def _encode_pieces(self, text: str, plain: list[tuple[int, int]]):
        """Template text between the `plain` spans parsed for control tokens, the spans as text."""
        pieces, pos = [], 0
        for a, b in plain:
            pieces += [(pos, a, self._tmpl), (a, b, self._text)]
            pos = b
        pieces.append((pos, len(text), self._tmpl))
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for lo, hi, enc in pieces:
            if hi <= lo:
                continue
            if enc is self._tmpl and self._splitter is not None:
                self._encode_by_segments(text, lo, hi, ids, offsets)
            else:
                out = enc.encode(text[lo:hi], add_special_tokens=False)
                ids += out.ids
                offsets += [(s + lo, e + lo) for s, e in out.offsets]
        return ids, offsets

    def _encode_by_segments(self, text: str, lo: int, hi: int, ids: list, offsets: list):
        """text[lo:hi] with control tokens parsed, as the tokenizer itself does it: cut at each
        control token, each piece between encoded alone. The pieces recur (a chat's turns are
        rendered many times into training windows), so their encodings are kept."""
        pos = lo
        for m in self._splitter.finditer(text, lo, hi):
            self._segment(text, pos, m.start(), ids, offsets)
            ids.append(self.control_ids[m.group()])
            offsets.append(m.span())
            pos = m.end()
        self._segment(text, pos, hi, ids, offsets)

    def _segment(self, text: str, lo: int, hi: int, ids: list, offsets: list):
        if hi <= lo:
            return
        piece = text[lo:hi]
        got = self._segments.get(piece)
        if got is None:
            out = self._text.encode(piece, add_special_tokens=False)
            if len(self._segments) > 200_000:
                self._segments.clear()
            got = self._segments[piece] = (out.ids, out.offsets)
        ids += got[0]
        offsets += [(s + lo, e + lo) for s, e in got[1]]

    def _spans_with_control(self, ids, offsets, spans) -> list[tuple[int, int]]:
        starts = [a for a, _ in spans]
        bad = []
        control = self._control
        for j in [j for j, tok in enumerate(ids) if tok in control]:
            s, e = offsets[j]
            k = bisect_left(starts, e) - 1  # the last span starting before the token ends
            while k >= 0 and spans[k][1] > s:
                if spans[k][1] > spans[k][0]:
                    bad.append(spans[k])
                k -= 1
        return bad

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tmpl.decode(list(ids), skip_special_tokens=skip_special)

    def backend_json(self) -> str:
        """The whole tokenizer (vocabulary, merges, added tokens) as `tokenizers` JSON."""
        return self._tmpl.to_str()

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a byte-level token may hold part of a UTF-8 character)."""
        table = self.__dict__.get("_byte_table")
        if table is None:
            table = self._byte_table = _byte_table(self._tmpl)
        return table[token] if 0 <= token < len(table) else b""

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tmpl.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tmpl.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def pad_id(self) -> int:
        pid = self.token_id(self.pad_token)
        return 0 if pid is None else pid

    def fingerprint(self) -> str:
        """Identifies the vocabulary: two tokenizers with equal fingerprints map text to the same ids."""
        vocab = sorted(self._tmpl.get_vocab(with_added_tokens=True).items())
        return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]

    # --- files ----------------------------------------------------------------------------
    def save(self, directory: Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tmpl.save(str(directory / "tokenizer.json"))
        conf = {"eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.pad_token,
                "chat_template": self.chat_template, "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.add_bos or self.add_eos or self.text_tokens:  # a GGUF vocabulary's own facts
            conf["gguf_vocab"] = {"add_bos": self.add_bos, "add_eos": self.add_eos, "text_tokens": self.text_tokens}
        (directory / "tokenizer_config.json").write_text(json.dumps(conf, indent=1))

    @classmethod
    def from_dir(cls, directory: Path) -> "Tokenizer":
        directory = Path(directory)
        if (directory / "tokenizer.json").exists():
            try:
                hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as e:
                raise UserError(f"{directory / 'tokenizer.json'}: cannot read tokenizer ({e})") from None
        elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
            hf = HFTokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
            hf.pre_tokenizer = _pre_tokenizer("gpt2")
            hf.decoder = decoders.ByteLevel()
        else:
            raise UserError(f"{directory}: no tokenizer.json (or vocab.json + merges.txt)")
        conf = _read_json(directory / "tokenizer_config.json")
        conf.update({k: v for k, v in _read_json(directory / "special_tokens_map.json").items() if k not in conf})
        tokens = {k: _token_str(conf.get(k)) for k in ("eos_token", "bos_token", "pad_token")}
        added = hf.get_added_tokens_decoder()
        contents = {a.content for a in added.values()}
        for t in tokens.values():  # GPT-2 style dirs list <|endoftext|> only in vocab.json
            if t and hf.token_to_id(t) is not None and t not in contents:
                hf.add_special_tokens([AddedToken(t, special=True, normalized=False)])
                contents.add(t)
                added = None  # changed: the constructor fetches it again
        template = conf.get("chat_template")
        if template is None and (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        gguf = conf.get("gguf_vocab") or {}
        return cls(hf, chat_template=template, add_bos=bool(gguf.get("add_bos")), add_eos=bool(gguf.get("add_eos")),
                   text_tokens=gguf.get("text_tokens") or (), added=added, **tokens)

    @classmethod
    def from_gguf(cls, meta: dict, source="GGUF file") -> "Tokenizer":
        """The tokenizer a GGUF file describes (SentencePiece or byte-level BPE), giving llama.cpp's
        ids; `source` names the file in errors."""
        hf, f = gguf_vocab.build(meta, str(source))
        return cls(hf, eos_token=f["eos_token"], bos_token=f["bos_token"], pad_token=f["pad_token"],
                   chat_template=meta.get("tokenizer.chat_template"), add_bos=f["add_bos"], add_eos=f["add_eos"],
                   text_tokens=f["user_defined"])


def _byte_table(hf: HFTokenizer) -> list[bytes]:
    """Every token's bytes. Byte-level vocabularies spell bytes with GPT-2's printable stand-ins
    (`Ġ` for a space); others (SentencePiece style) use `▁` and `<0xNN>` byte tokens."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    stand_in = {chr(b): b for b in printable}
    stand_in.update({chr(0x100 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
    byte_level = hf.decoder is not None and b'"ByteLevel"' in hf.decoder.__getstate__()
    table = []
    for i in range(hf.get_vocab_size(with_added_tokens=True)):
        piece = hf.id_to_token(i)
        if i in added or piece is None:
            table.append((added.get(i) or "").encode("utf-8"))
        elif byte_level and all(c in stand_in for c in piece):
            table.append(bytes(stand_in[c] for c in piece))
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def _control_splitter(added: dict, control: dict[str, int]):
    """A pattern finding control tokens as the tokenizer does (leftmost, then longest), or None
    when some added token (`added`: {id: AddedToken}) is matched in another way (after
    normalization, or eating spaces)."""
    if not control or any(t.normalized or t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return None
    tokens = sorted(control, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens))


def _without_added_tokens(hf: HFTokenizer, added: dict, text_tokens=()) -> HFTokenizer:
    """The same vocabulary with no added tokens (`added`: hf's, {id: AddedToken}) but `text_tokens`,
    so no control token can be matched in text. It shares `hf`'s model and pipeline (a copy through
    JSON took half a second for 49k tokens)."""
    plain = HFTokenizer(hf.model)
    keep = set(text_tokens)  # as `hf` matches them (a token may eat the whitespace after it)
    plain.add_tokens([t for t in added.values() if t.content in keep])
    plain.normalizer, plain.pre_tokenizer = hf.normalizer, hf.pre_tokenizer
    plain.post_processor, plain.decoder = hf.post_processor, hf.decoder
    if hf.truncation:
        plain.enable_truncation(**hf.truncation)
    if hf.padding:
        plain.enable_padding(**hf.padding)
    return plain


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
