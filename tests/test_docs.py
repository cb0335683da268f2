"""The README and docs/: short, linked, free of development history, and their commands run as written.

A fenced ```sh block is run by `sh -e` with `dialogen` on PATH; a ```sh long block (it needs the network, a
model to be trained first, or minutes) is not run. In both, every `dialogen ...` command is parsed by the CLI's
own parser, so its subcommand exists and its flags parse.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dialogen.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
SOURCES = sorted(p for p in (ROOT / "dialogen").rglob("*") if p.suffix in {".py", ".c", ".html", ".js", ".css"})
SOURCES += [ROOT / "pyproject.toml", ROOT / "Makefile"]

# Phrases that narrate the project's own development rather than describe the product.
HISTORY = re.compile(
    r"since the (earlier|previous|last|first|old) (version|session|round|run|release|commit)"
    r"|before this (change|round|session|commit|version|release)"
    r"|\b(what|things) we tried|\bwe tried\b|\b(was|were) tried\b|\btried (this|last) (session|round)"
    r"|\bno longer\b|\bformerly\b|\bpreviously\b|\bused to be\b|\b(we|it|this|that|they) used to\b"
    r"|\bthis session\b|\bthe (session|round|run) before (measured|gave|this)\b|\bsessions? ago\b"
    r"|\b(last|this|previous) round\b|\bearlier (version|run|session|attempt|round)s?\b|\bnow (fixed|also)\b"
    r"|\bthe old (code|version|path|way)\b|\bwe found\b|\bturned out\b|\bafter review fixes\b|\bthe release before\b",
    re.IGNORECASE)

# A measured figure: it belongs in docs/benchmarks.md, not in code, comments or help text.
FIGURE = re.compile(
    r"\b\d+(\.\d+)?\s*(tok/s|tokens/s|tokens per second)"
    r"|\b\d+(\.\d+)?x (faster|slower|less|more|the)\b"
    r"|\b\d+(\.\d+)?% (faster|slower|behind|ahead)\b"
    r"|\b\d+(\.\d+)?\s*ms (a|per) (token|step|turn)\b",
    re.IGNORECASE)


def _hits(pattern, paths):
    out = []
    for path in paths:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = pattern.search(line)
            if m:
                out.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r}: {line.strip()}")
    return out


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_readme_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert [p.name for p in DOCS if f"docs/{p.name}" not in text] == []


def test_links_between_pages_resolve():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert missing == []


def test_no_development_history_in_docs_or_code():
    assert _hits(HISTORY, PAGES + SOURCES) == []


def test_no_measured_figures_in_code():
    assert _hits(FIGURE, SOURCES) == []


def test_history_pattern_catches_what_it_should():
    for text in ("since the earlier version", "before this change", "what we tried", "it no longer loads",
                 "as previously measured", "this session", "the session before measured", "last round",
                 "again, after review fixes", "against the release before the change"):
        assert HISTORY.search(text), text
    for text in ("the session keeps its cache", "the key used to sign", "each round is one step",
                 "This rounds the weights", "stops before the budget", "claimed the session before it answered",
                 "the cache is now full"):
        assert not HISTORY.search(text), text


def sh_blocks():
    """(page, info, text) of every fenced ```sh block."""
    out = []
    for page in PAGES:
        for m in re.finditer(r"^```(sh[^\n]*)\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S):
            out.append((page.relative_to(ROOT), m.group(1).split(), m.group(2)))
    return out


def dialogen_commands(text):
    """The argument lists of the `dialogen` commands in a shell block (continuations joined)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
        segment: list[str] = []
        for word in [*words, "|"]:
            if word in ("|", "||", "&&", ";", "&"):
                args = _after_dialogen(segment)
                if args is not None:
                    commands.append(args)
                segment = []
            else:
                segment.append(word)
    return commands


def _after_dialogen(words):
    for i, word in enumerate(words):
        if word.endswith("dialogen") and (word == "dialogen" or word.endswith("/dialogen")):
            if i > 0 and words[i - 1] == "-m" or i == 0 or "=" in words[0] or words[0] in ("nice", "torchrun"):
                return [w for w in words[i + 1:] if w != "..."]
    return None


BLOCKS = sh_blocks()


def test_docs_have_runnable_and_long_blocks():
    kinds = {tuple(info) for _, info, _ in BLOCKS}
    assert ("sh",) in kinds and ("sh", "long") in kinds
    assert all(info in (["sh"], ["sh", "long"]) for _, info, _ in BLOCKS), "a block is ```sh or ```sh long"


@pytest.mark.parametrize("page,info,text", BLOCKS, ids=[f"{p}:{i}" for i, (p, _, _) in enumerate(BLOCKS)])
def test_every_dialogen_command_parses(page, info, text):
    for args in dialogen_commands(text):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                build_parser().parse_args(args)
            except SystemExit as e:
                assert e.code == 0, f"{page}: dialogen {' '.join(args)}: {err.getvalue().strip()}"


def test_commands_are_found():
    found = [args[0] for _, _, text in BLOCKS for args in dialogen_commands(text)]
    assert {"chat", "generate", "train", "serve", "render", "eval", "export"} <= set(found)
    assert dialogen_commands("OMP_NUM_THREADS=1 nice .venv/bin/dialogen eval --compare \\\n    --seed 0  # x") == \
        [["eval", "--compare", "--seed", "0"]]
    assert dialogen_commands("echo '[1]' | dialogen render --json") == [["render", "--json"]]


def test_python_blocks_compile():
    for page in PAGES:
        for n, m in enumerate(re.finditer(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)):
            compile(m.group(1), f"{page.name}, python block {n}", "exec")


@pytest.fixture(scope="module")
def dialogen_on_path(tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("bin")
    script = bin_dir / "dialogen"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m dialogen \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    return env


RUNNABLE = [(p, text) for p, info, text in BLOCKS if info == ["sh"]]


@pytest.mark.parametrize("page,text", RUNNABLE, ids=[f"{p}:{i}" for i, (p, _) in enumerate(RUNNABLE)])
def test_runnable_blocks_run(page, text, dialogen_on_path, tmp_path):
    done = subprocess.run(["sh", "-e", "-c", text], cwd=tmp_path, env=dialogen_on_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"{page}:\n{text}\n{done.stderr[-2000:]}"


BENCH_COMMAND = re.compile(r"bench/([a-z][a-z0-9_]*\.py)([^`\n|;]*)")  # NAME.py: a placeholder


def test_every_bench_command_in_the_docs_uses_flags_its_script_has():
    """Each `bench/NAME.py --flag` written in README or docs (runs table, prose, blocks) names a script in
    bench/ and only flags that script defines."""
    seen = 0
    for page in PAGES:
        for m in BENCH_COMMAND.finditer(page.read_text(encoding="utf-8")):
            script = ROOT / "bench" / m.group(1)
            assert script.exists(), f"{page.name}: bench/{m.group(1)} does not exist"
            source = script.read_text(encoding="utf-8")
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2)):
                assert f'"{flag}"' in source, f"{page.name}: bench/{m.group(1)} has no {flag}"
                seen += 1
    assert seen > 50  # the runs table alone names more
