"""Cold start: a fresh process to the first reply token, ours against llama.cpp, on the default model.

Each run is a new Python process (the file is in the page cache after the first), so nothing is
kept between runs but what the disk cache keeps. Per run it times:
- `import_s`: importing torch and dialogen (llama.cpp: llama_cpp);
- `load_s`: `dialogen.load()` (llama.cpp: `Llama(model_path=...)`) of the default GGUF file;
- `first_token_s`: from the loaded model to the first token of a one-line chat reply.
Runs alternate between the two; medians are printed as one JSON line. Without llama-cpp-python
(`make bench-peers`) it says so in one line and reports ours.

    .venv/bin/python bench/cold_start.py [--repeats 5] [--threads 2]
"""

import argparse
import json
import statistics
import subprocess
import sys

OURS = """
import time, json
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
import dialogen
t1 = time.perf_counter()
m = dialogen.load()
t2 = time.perf_counter()
next(iter(m.stream([{{"role": "user", "content": "Hi!"}}], temperature=0, max_new_tokens=4)))
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2}}))
"""

THEIRS = """
import time, json
t0 = time.perf_counter()
from llama_cpp import Llama
t1 = time.perf_counter()
from dialogen.models.loading import default_model_path
path = str(default_model_path())
t1b = time.perf_counter()
llm = Llama(model_path=path, n_ctx=2048, n_threads={threads}, n_threads_batch={threads}, verbose=False)
t2 = time.perf_counter()
next(iter(llm.create_chat_completion([{{"role": "user", "content": "Hi!"}}], temperature=0, max_tokens=4, stream=True)))
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1b, "first_token_s": t3 - t2}}))
"""


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="threads of both engines (default: %(default)s)")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
        peer = True
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (make bench-peers); reporting ours", file=sys.stderr)
        peer = False
    runs = {"ours": [], **({"llamacpp": []} if peer else {})}
    run(OURS.format(threads=args.threads))  # warm-up: the page cache, compiled kernels, .pyc files
    for r in range(args.repeats):
        runs["ours"].append(run(OURS.format(threads=args.threads)))
        if peer:
            runs["llamacpp"].append(run(THEIRS.format(threads=args.threads)))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} load {v[-1]['load_s']:.2f} s" for k, v in runs.items()), file=sys.stderr)
    out = {"threads": args.threads, "repeats": args.repeats}
    for who, rs in runs.items():
        for key in ("import_s", "load_s", "first_token_s"):
            out[f"{who}_{key}"] = round(statistics.median(r[key] for r in rs), 3)
        out[f"{who}_total_s"] = round(statistics.median(sum(r.values()) for r in rs), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
