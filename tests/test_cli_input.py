"""Bad text and impossible settings at the CLI's edge: exit 2 with one line naming `file:line`,
never a traceback; `train` refuses to train nothing and leaves --out as it found it."""

import io
import json
import os
import subprocess
import sys

import pytest

from dialogen.cli import main
from dialogen.data.dataset import IGNORE_INDEX, Example

GOOD = [{"messages": [{"role": "user", "content": f"hello number {i}"},
                      {"role": "assistant", "content": f"hi there {i}, how are you today?"}]} for i in range(30)]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dialogen: error: "), err
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


@pytest.mark.parametrize("raw,where", [
    (b'[{"role": "user", "content": "caf\xe9"}]', ":1: not valid UTF-8"),
    (b'[{"role": "user",\n  "content": "ok \\ud83d\\ude00"},\n {"role": "assistant", "content": "\\udc00"},\n'
     b' {"role": "user", "content": "x"}]', ":3: a lone surrogate"),
    (b"[" * 100_000, "nested too deeply"),
    (b'[{"role": "user", "content": "x"}]\n\xff', ":2: not valid UTF-8"),
])
def test_generate_refuses_bad_text_in_a_file_and_on_stdin(tiny_llama, tmp_path, capsys, monkeypatch, raw, where):
    path = tmp_path / "m.json"
    path.write_bytes(raw)
    model = ["--model", str(tiny_llama[0]), "--template", "chatml", "--max-new-tokens", "2"]
    assert main(["generate", str(path), *model]) == 2
    _one_line_error(capsys, f"{path}", where)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    assert main(["generate", "-", *model]) == 2
    _one_line_error(capsys, "<stdin>", where)


@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_seed_beyond_64_bits(tiny_llama, tmp_path, capsys, cmd):
    path = tmp_path / "m.json"
    path.write_text('[{"role": "user", "content": "hi"}]')
    args = [str(path)] if cmd == "generate" else []
    assert main([cmd, *args, "--model", str(tiny_llama[0]), "--seed", str(2**64)]) == 2
    _one_line_error(capsys, "--seed")


@pytest.mark.parametrize("stdin,line", [(b"hello\nbye \xff\n", "<stdin>:2: not valid UTF-8"),
                                        (b"hello \xed\xa0\x80\n", "<stdin>:1: not valid UTF-8")])
def test_piped_chat_refuses_bytes_that_are_not_utf8(tiny_llama, stdin, line):
    for env in ({}, {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}, {"PYTHONIOENCODING": "utf-8:strict"}):
        run = subprocess.run([sys.executable, "-m", "dialogen", "chat", "--model", str(tiny_llama[0]), "--template",
                              "chatml", "--max-new-tokens", "2"], input=stdin, capture_output=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        err = run.stderr.decode()
        assert run.returncode == 2 and line in err and "Traceback" not in err, err


def _data(tmp_path, name: str, raw: bytes):
    path = tmp_path / name
    path.write_bytes(raw)
    return str(path)


GOOD_JSONL = "\n".join(json.dumps(c) for c in GOOD).encode() + b"\n"
BAD_DATA = [
    ("bad.jsonl", GOOD_JSONL.replace(b"number 7", b"number \xff7"), ":8: not valid UTF-8"),
    ("sur.jsonl", GOOD_JSONL.replace(b"number 5", b"number \\ud800"), ":6: a lone surrogate"),
    ("bad.tsv", b"a EOS b\tc\nx\xc3\ty\n", ":2: not valid UTF-8"),
    ("bad.txt", b"hello\nhi\n\nfoo\xfe\nbar\n", ":4: not valid UTF-8"),
]


@pytest.mark.parametrize("skip", [[], ["--skip-bad"]])
@pytest.mark.parametrize("name,raw,where", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_train_refuses_bad_text_with_and_without_skip_bad(tiny_llama, tmp_path, capsys, name, raw, where, skip):
    out = tmp_path / "run"
    data = _data(tmp_path, name, raw)
    assert main(["train", "--data", data, "--out", str(out), "--init", str(tiny_llama[0]), "--template", "chatml",
                 "--max-steps", "1", "--no-progress", *skip]) == 2
    _one_line_error(capsys, f"{data}{where}")
    assert not out.exists()


def _train(tiny_llama, tmp_path, out, *flags):
    data = _data(tmp_path, "good.jsonl", GOOD_JSONL)
    return main(["train", "--data", data, "--out", str(out), "--init", str(tiny_llama[0]), "--template", "chatml",
                 "--max-steps", "1", "--no-progress", "--max-len", "128", *flags])


@pytest.mark.parametrize("flags,needle", [(["--max-len", "1"], "--max-len 1 is too small for one turn"),
                                          (["--max-len", "6"], "--max-len 6 is too small for one turn"),
                                          (["--seed", str(2**64)], "--seed"),
                                          (["--split-seed", str(2**70)], "--split-seed"),
                                          (["--freeze-layers", "9"], "--freeze-layers")])
def test_train_refuses_settings_that_train_nothing_and_leaves_out_alone(tiny_llama, tmp_path, capsys, flags, needle):
    fresh = tmp_path / "new" / "run"
    assert _train(tiny_llama, tmp_path, fresh, *flags) == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "new").exists()  # not even the parent it would have made
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert _train(tiny_llama, tmp_path, kept, *flags) == 2
    capsys.readouterr()
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_scratch_run_failing_its_checks_leaves_no_tokenizer(tmp_path, capsys):
    """The scratch vocabulary is written before the model's checks; a failed run takes it back."""
    out = tmp_path / "run"
    out.mkdir()
    data = _data(tmp_path, "good.jsonl", GOOD_JSONL)
    assert main(["train", "--data", data, "--out", str(out), "--init", "scratch", "--n-layer", "1",
                 "--vocab-size", "300", "--freeze-layers", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "--freeze-layers")
    assert list(out.iterdir()) == []


def test_a_label_on_the_first_token_trains_nothing():
    assert Example([5, 6, 7], [5, IGNORE_INDEX, 7]).trained() == 1
    assert Example([5], [5]).trained() == 0


def test_command_line_bytes_that_are_not_utf8(tiny_llama):
    run = subprocess.run([sys.executable.encode(), b"-m", b"dialogen", b"generate", b"-", b"--model",
                          str(tiny_llama[0]).encode(), b"--system", b"caf\xe9"], input=b"[]", capture_output=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = run.stderr.decode()
    assert run.returncode == 2 and "argument 6 (after --system) is not valid UTF-8" in err and "Traceback" not in err, err
