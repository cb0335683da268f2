"""The fuzz tests at scale: at least 10,000 random HTTP requests, 10,000 random inputs to the
CLI's readers and 10,000 mutated GGUF files, counting what went wrong instead of stopping at the
first finding.

HTTP: every route of the real app in this process (httpx's ASGI transport), on a tiny random
model (max_tokens 4), with the strategies of tests/fuzzing.py. Readers: messages files and stdin
(`generate`), every data format with and without --skip-bad (`train`), piped stdin (`chat`).
GGUF: header numbers of a tiny model file rewritten (tests/gguf_fuzz.py), each file loaded and
answered in a forked child: crashes, tracebacks, runs over 10 s and memory over twice the file
plus a fixed bound are findings. Prints one JSON line: examples run, 5xx responses, hangs,
tracebacks, other findings (with the first few). A count of 0 skips that part.

    nice .venv/bin/python bench/fuzz.py [--http 10000] [--readers 10000] [--gguf 10000] [--seed 0]
"""

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzzing as F  # noqa: E402


def tiny_model(where: Path) -> Path:
    """The tests' tiny llama (random weights, the default model's vocabulary), saved once."""
    import conftest
    from dialogen.models.loading import default_model_path, read_gguf
    from dialogen.models.tokenizer import Tokenizer

    path = where / "tiny_llama"
    path.mkdir()
    tok = Tokenizer.from_gguf(read_gguf(default_model_path())[1])
    conftest._save_tiny(path, "llama", tok.vocab_size)
    tok.save(path)
    return path


class Tally:
    def __init__(self):
        self.examples, self.kinds, self.first = 0, collections.Counter(), []

    def add(self, found: str | None, example):
        self.examples += 1
        if found is not None:
            self.kinds[found.split(":")[0]] += 1
            if len(self.first) < 5:
                self.first.append({"finding": found[:300], "example": repr(example)[:300]})

    def to_dict(self, seconds: float) -> dict:
        return {"examples": self.examples, "5xx": self.kinds["5xx"], "hangs": self.kinds["hang"],
                "tracebacks": self.kinds["traceback"],
                "other": sum(v for k, v in self.kinds.items() if k not in ("5xx", "hang", "traceback")),
                "seconds": round(seconds, 1), "first": self.first}


def run(strategy, n: int, check, tally: Tally, rng_seed: int):
    @seed(rng_seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(example):
        tally.add(check(example), example)

    one()


def gguf_mode(tmp: Path, n: int, rng_seed: int) -> dict:
    """`n` mutated GGUF files, each loaded and answered in a forked child (tests/gguf_fuzz.py)."""
    import gguf_fuzz as G

    base = G.base_file(tmp)
    raw, size, fields = base.read_bytes(), base.stat().st_size, G.header_fields(base)
    worker, tally, t0 = G.Worker(), Tally(), time.perf_counter()
    outcomes = collections.Counter()

    def check(mutation):
        path = tmp / f"m{tally.examples}.gguf"
        path.write_bytes(G.apply(raw, mutation))
        result = worker.run(path)
        path.unlink()
        outcomes[result["outcome"]] += 1
        found = G.finding(result, size)
        return None if found is None else found.replace("signal", "crash", 1)

    try:
        run(G.mutations(fields), n, check, tally, rng_seed)
    finally:
        worker.close()
    return {**tally.to_dict(time.perf_counter() - t0), "outcomes": dict(outcomes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--http", type=int, default=10_000, help="HTTP examples (default: %(default)s)")
    ap.add_argument("--readers", type=int, default=10_000, help="CLI reader examples (default: %(default)s)")
    ap.add_argument("--gguf", type=int, default=10_000, help="mutated GGUF files (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from inprocess import InProcessServer

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.gguf:  # first: its worker process starts before this one runs any parallel work
            out["gguf"] = gguf_mode(tmp, args.gguf, args.seed)
        model = tiny_model(tmp) if args.http or args.readers else None
        if args.http:
            srv = InProcessServer(model, tmp / "sessions.db")
            sid = srv.request("POST", "/v1/sessions", json={"persona": "You are kind."}).json()["id"]
            http, t0 = Tally(), time.perf_counter()
            run(F.REQUEST, args.http, lambda req: F.check_request(srv, sid, req), http, args.seed)
            alive = srv.request("GET", "/health").status_code == 200
            out["http"] = {**http.to_dict(time.perf_counter() - t0), "still_answering": alive}
            srv.close()
        if args.readers:
            from dialogen.chat.session import Session, load_engine
            from dialogen.decoding.settings import Sampling

            session = Session(load_engine(str(model), "chatml"), sampling=Sampling(max_new_tokens=1))
            readers, t0 = Tally(), time.perf_counter()
            share = args.readers // 3
            run(st.tuples(F.MESSAGES_FILE, st.booleans()), share,
                lambda e: F.check_messages_file(tmp, e[0], e[1]), readers, args.seed)
            run(st.tuples(F.DATA_FILE, st.booleans()), share,
                lambda e: F.check_data_file(tmp, e[0][0], e[0][1], e[1]), readers, args.seed)
            run(F.CHAT_STDIN, args.readers - 2 * share, lambda raw: F.check_chat_stdin(session, raw), readers,
                args.seed)
            out["readers"] = readers.to_dict(time.perf_counter() - t0)
    print(json.dumps(out))
    bad = sum(out[k].get(f, 0) for k in out for f in ("5xx", "hangs", "tracebacks", "other"))
    return 1 if bad or not out.get("http", {}).get("still_answering", True) else 0


if __name__ == "__main__":
    sys.exit(main())
