"""GGUF header mutations and the worker that loads each mutated file, shared by tests/test_gguf_fuzz.py
(a few hundred, in CI) and bench/fuzz.py --gguf (ten thousand).

A mutation rewrites header numbers of a tiny model file (tensor dimensions, types and offsets, the
tensor and metadata counts, string and array lengths, value types) or cuts the file short. The
worker is a fresh process that imports dialogen once and forks a child per file, which never ran
parallel work (a fork after OpenMP work can hang); each child loads the file and answers one
message. Its outcome: "ok", "exit 2" with one line, or a finding ("traceback", "signal N",
"hang", "memory", "two lines").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
KINDS = {"dims": "dimension", "types": "type of", "offsets": "offset of", "counts": "count",
         "lengths": "length of", "tensor dims": "dimension count"}
LIMIT_S = 10.0
SPARE_MB = 200  # besides twice the file: the child's own Python objects, the kernels' scratch


def base_file(where: Path) -> Path:
    """The tiny model file every mutation starts from: llama, mixed block types, a 288-token vocabulary."""
    sys.path.insert(0, str(HERE))
    from gguf_files import tiny_hf, write_gguf
    from test_gguf_load import MIXED

    path = where / "base.gguf"
    write_gguf(path, tiny_hf("llama"), types=MIXED)
    return path


def header_fields(path: Path) -> dict[str, list]:
    """Positions of the base file's header numbers, by kind: {kind: [(position, struct format)]}."""
    from dialogen.models.gguf_header import read_header

    fields = read_header(path).fields
    out = {kind: [(pos, fmt) for what, pos, fmt in fields if needle in what] for kind, needle in KINDS.items()}
    out["any"] = [(pos, fmt) for _, pos, fmt in fields]
    return out


def values(fmt: str):
    bits = {"B": 8, "H": 16, "I": 32, "Q": 64}.get(fmt[-1].upper(), 32)
    top = (1 << bits) - 1
    return st.one_of(st.sampled_from([0, 1, 2, 3, 31, 32, 33, 255, 256, 1 << 16, 1 << 31, 1 << 32, 1 << 62, top,
                                      top - 1]), st.integers(0, top), st.integers(0, 1024))


def mutations(fields: dict):
    """One to three header numbers rewritten, and sometimes the file cut short."""
    def one(kind):
        return st.sampled_from(fields[kind]).flatmap(lambda f: st.tuples(st.just(f), values(f[1])))

    edit = st.sampled_from([k for k in fields if fields[k]]).flatmap(one)
    return st.tuples(st.lists(edit, min_size=1, max_size=3), st.one_of(st.none(), st.none(), st.integers(0, 1 << 20)))


def apply(base: bytes, mutation) -> bytes:
    import struct

    edits, cut = mutation
    data = bytearray(base)
    for (pos, fmt), value in edits:
        size = struct.calcsize(fmt)
        data[pos:pos + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    return bytes(data if cut is None else data[:cut])


class Worker:
    """A subprocess that loads GGUF files on request, each in a forked child."""

    def __init__(self):
        self.cache = tempfile.mkdtemp(prefix="gguf-fuzz-cache-")
        real = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dialogen" / "kernels"
        (Path(self.cache) / "dialogen").mkdir(parents=True)
        if real.exists():  # the built kernels, without rebuilding them in the fresh cache
            os.symlink(real, Path(self.cache) / "dialogen" / "kernels")
        env = {**os.environ, "XDG_CACHE_HOME": self.cache, "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "gguf_fuzz.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, path: Path) -> dict:
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        import shutil

        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.cache, ignore_errors=True)


def finding(result: dict, file_size: int) -> str | None:
    """What went wrong in one worker result, or None."""
    if result["outcome"] not in ("ok", "exit 2"):
        return f"{result['outcome']}: {result.get('text', '')[:300]}"
    if result["outcome"] == "exit 2" and ("\n" in result["text"] or not result["text"]):
        return f"two lines: {result['text'][:300]}"
    if result["seconds"] > LIMIT_S:
        return f"slow: {result['seconds']:.1f} s"
    if result["peak_mb"] - result["base_mb"] > 2 * file_size / 2**20 + SPARE_MB:
        return f"memory: {result['peak_mb'] - result['base_mb']:.0f} MB over the worker's"
    return None


# --- the worker process ---------------------------------------------------------------------------
def _child(path: str, out_fd: int):
    import traceback

    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
        from dialogen.api import load
        from dialogen.errors import UserError

        try:
            m = load(path)
            m.chat("hi there", temperature=0, max_new_tokens=3)
            msg = {"outcome": "ok", "text": ""}
        except UserError as e:
            msg = {"outcome": "exit 2", "text": str(e)}
    except BaseException:  # noqa: BLE001 (a finding, reported to the parent)
        msg = {"outcome": "traceback", "text": traceback.format_exc()}
    os.write(out_fd, json.dumps(msg).encode())
    os._exit(0)


def _serve():
    import resource
    import select
    import time

    import gguf  # noqa: F401 (imported once, before the forks, as are the loader's modules)

    import dialogen.api  # noqa: F401
    from dialogen.models.kernels import library

    library.build()
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("ready", flush=True)
    for line in sys.stdin:
        r, w = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(line.strip(), w)
        os.close(w)
        ready, _, _ = select.select([r], [], [], LIMIT_S * 3)
        if not ready:
            os.kill(pid, 9)
        text = b""
        while ready:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            text += chunk
        os.close(r)
        _, status, usage = os.wait4(pid, 0)
        seconds = time.monotonic() - start
        if not ready:
            result = {"outcome": "hang", "text": ""}
        elif os.WIFSIGNALED(status):
            result = {"outcome": f"signal {os.WTERMSIG(status)}", "text": text.decode(errors="replace")}
        else:
            result = json.loads(text or b'{"outcome": "no answer", "text": ""}')
        result.update(seconds=seconds, peak_mb=usage.ru_maxrss / 1024, base_mb=base_mb)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _serve()
