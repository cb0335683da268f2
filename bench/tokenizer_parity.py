"""dialogen's GGUF tokenizers against llama.cpp's own `tokenize`, file by file.

For each GGUF file, the same strings the tests use (520: whitespace runs, digits, unicode, emoji,
control-token text, leading spaces, newlines) are tokenized three ways and the ids compared:
  text    plain text, control tokens not parsed   (`encode_text`     vs tokenize(add_special=False, special=False))
  special control tokens parsed                   (`encode_template` vs tokenize(add_special=False, special=True))
  prompt  parsed, plus BOS/EOS as the file's flags (`encode_prompt`  vs tokenize(add_special=True,  special=True))
Prints one line per file with the match counts, and the first mismatches; the exit code is 1 when
any string differs. llama.cpp comes from llama-cpp-python (`make bench-peers`) and reads only the
vocabulary (`vocab_only`).

`--fixtures DIR` also writes the tests' vocabularies there and checks them: a SentencePiece model
trained with `sentencepiece` (with and without the space in front, and named Phi-3) and a
byte-level BPE under each `pre` name the tests cover.

    nice .venv/bin/python bench/tokenizer_parity.py [FILE.gguf ...] [--fixtures DIR] [--show 3]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import gguf_vocabs as V  # noqa: E402

PRES = ["gpt-2", "smollm", "llama-bpe", "qwen2", "tekken", "gpt-4o", "deepseek-coder", "falcon", "default"]


def fixtures(where: Path) -> list[Path]:
    sp = V.train_sentencepiece()
    files = [V.write_sentencepiece_gguf(where / "spm.gguf", sp),
             V.write_sentencepiece_gguf(where / "spm-no-prefix.gguf", sp, add_space_prefix=False),
             V.write_sentencepiece_gguf(where / "spm-phi3.gguf", sp, name="Phi-3 mini")]
    tokens, merges = V.train_byte_level()
    return files + [V.write_byte_level_gguf(where / f"bpe-{pre}.gguf", tokens, merges, pre) for pre in PRES]


def llama_cpp_vocab(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def compare(path: Path, texts: list[str], show: int) -> bool:
    from dialogen.errors import UserError
    from dialogen.models.gguf_file import read_gguf
    from dialogen.models.tokenizer import Tokenizer

    try:
        ours = Tokenizer.from_gguf(read_gguf(path)[1], path)
    except UserError as e:  # a vocabulary dialogen refuses: reported, the other files still compared
        print(f"{path.name}: refused by dialogen: {e}", flush=True)
        return False
    try:
        theirs = llama_cpp_vocab(path)
    except ValueError as e:  # llama.cpp cannot read it
        print(f"{path.name}: llama.cpp fails: {e}", flush=True)
        return False
    modes = {
        "text": (ours.encode_text, lambda s: theirs.tokenize(s.encode(), add_bos=False, special=False)),
        "special": (ours.encode_template, lambda s: theirs.tokenize(s.encode(), add_bos=False, special=True)),
        "prompt": (ours.encode_prompt, lambda s: theirs.tokenize(s.encode(), add_bos=True, special=True)),
    }
    counts, misses = {}, []
    for mode, (mine, ref) in modes.items():
        same = 0
        for s in texts:
            a, b = mine(s), list(ref(s))
            same += a == b
            if a != b and len(misses) < show:
                misses.append(f"  {mode} {s!r}: dialogen {a[:24]} llama.cpp {b[:24]}")
        counts[mode] = same
    print(f"{path.name}: " + ", ".join(f"{m} {n}/{len(texts)}" for m, n in counts.items()), flush=True)
    for line in misses:
        print(line)
    return all(n == len(texts) for n in counts.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--fixtures", type=Path, help="write the tests' vocabularies to this directory and check them too")
    ap.add_argument("--show", type=int, default=3, help="mismatching strings printed per file")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("tokenizer_parity: llama_cpp is not installed (make bench-peers installs llama-cpp-python)")
    for f in args.files:
        if not f.is_file():
            sys.exit(f"tokenizer_parity: {f}: no such file")
    files = args.files + (fixtures(args.fixtures) if args.fixtures else [])
    if not files:
        sys.exit("tokenizer_parity: give GGUF files, --fixtures DIR, or both")
    texts = V.strings()
    ok = [compare(f, texts, args.show) for f in files]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
