"""RSS of a GGUF model after loading and after one reply, against the file's size.

    nice .venv/bin/python bench/gguf_rss.py [--model FILE]
Prints one JSON line (MB): file size, RSS before loading, after loading, after one reply, peak.
"""

import argparse
import json
import time


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    import dialogen
    from dialogen.models.loading import model_path

    import torch  # noqa: F401 (its own memory is part of the baseline)

    path = model_path(args.model)
    base = rss_mb()
    t0 = time.perf_counter()
    m = dialogen.load(args.model)
    loaded, load_s = rss_mb(), time.perf_counter() - t0
    m.chat("Hi! What is a good name for a cat?", temperature=0, max_new_tokens=32)
    print(json.dumps({"file_mb": round(path.stat().st_size / 2**20, 1), "baseline_mb": round(base, 1),
                      "loaded_mb": round(loaded, 1), "after_reply_mb": round(rss_mb(), 1),
                      "peak_mb": round(rss_mb("VmHWM"), 1), "load_s": round(load_s, 2)}))


if __name__ == "__main__":
    main()
