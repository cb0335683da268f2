"""The command line as a user runs it: real subprocesses, the real default model."""

import json
import os
import subprocess
import sys

import pytest


def run(args, stdin="", timeout=180):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "dialogen", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dialogen: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0]


def test_piped_chat_replies_per_line_with_default_model():
    r = run(["chat", "--max-new-tokens", "24", "--seed", "0"], "Hello!\n\n   \nWhat is your name?\n")
    assert r.returncode == 0, r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 2  # empty lines are ignored, each reply on its own line
    assert all(line.strip() for line in replies)


def test_generate_prints_json(tmp_path):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello."}]
    f = tmp_path / "m.json"
    f.write_text(json.dumps(msgs))
    r = run(["generate", str(f), "--temperature", "0", "--max-new-tokens", "16"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["reply"].strip() and 0 < out["tokens"] <= 16


@pytest.mark.parametrize("payload, needles", [
    ("{oops", ["<stdin>:1", "not valid JSON"]),
    ('{"role": "user"}', ["expected a JSON list"]),
    ('[{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]', ["<stdin>[1].role", "'bot'"]),
    ('[{"role": "user", "content": ["x"]}]', ["<stdin>[0].content", "string"]),
    ('[{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]', ["last message", "user"]),
])
def test_generate_malformed_messages(payload, needles):
    assert_one_line_error(run(["generate"], payload), *needles)


def test_missing_model(tmp_path):
    assert_one_line_error(run(["chat", "--model", str(tmp_path / "nope.gguf")], "hi\n"), "nope.gguf")


def test_corrupt_gguf(tmp_path):
    """A file that is not GGUF fails before anything is written to the cache."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    assert_one_line_error(run(["chat", "--model", str(bad)], "hi\n"), "broken.gguf")


def test_corrupt_weights_in_model_dir(tiny_llama, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_llama[0], d)
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    assert_one_line_error(run(["chat", "--model", str(d)], "hi\n"), str(d))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert_one_line_error(run(["chat", "--model", str(tmp_path)], "hi\n"), "'t5'", "llama", "gpt2")


def test_unknown_template_lists_known(tiny_llama):
    assert_one_line_error(run(["chat", "--model", str(tiny_llama[0]), "--template", "nope"], "hi\n"),
                          "chatml", "llama2", "dialogpt", "jinja")


def test_bad_flag_value_names_flag():
    assert_one_line_error(run(["chat", "--top-p", "0"], "hi\n"), "--top-p")


def test_chat_on_hf_gpt2_dir(tiny_gpt2):
    r = run(["chat", "--model", str(tiny_gpt2[0]), "--max-new-tokens", "5", "--temperature", "0"], "hi\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1


def test_help_of_every_command_without_loading_torch():
    """`--help` answers at once: building the command line imports no torch."""
    code = ("import sys\nfrom dialogen.cli import build_parser\n"
            "sub = next(a for a in build_parser()._actions if a.choices)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "print(' '.join(sub.choices))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    commands = r.stdout.split()
    assert {"chat", "train", "eval", "serve", "train-adversarial"} <= set(commands)
    for cmd in commands:
        h = run([cmd, "--help"], timeout=60)
        assert h.returncode == 0 and h.stdout.startswith(f"usage: dialogen {cmd}"), (cmd, h.stderr)


def test_a_flag_is_never_taken_for_a_longer_one():
    """`--max-tokens` is a chat/generate flag; serve's is `--max-tokens-limit`, and a prefix of it is refused."""
    r = run(["serve", "--max-tokens", "40"])
    assert r.returncode == 2 and "unrecognized arguments: --max-tokens 40" in r.stderr, r.stderr
