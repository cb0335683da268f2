"""Tables and curves of the README's "Classic families" section, from the runs of
bench/classic_families.sh: RNN + attention against a from-scratch GPT, then MLE-only against
adversarial training over seeds (mean +- standard deviation across seeds).

Usage: .venv/bin/python bench/classic_families_table.py [RUN_DIR] [--plot docs/adversarial-rnn.png]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METRICS = [("BLEU-2", "bleu2", "{:.2f}"), ("BLEU-4", "bleu4", "{:.2f}"), ("Dist-1", "dist1", "{:.3f}"),
           ("Dist-2", "dist2", "{:.3f}"), ("Entropy-4", "entropy4", "{:.2f}"), ("avg len", "avg_len", "{:.1f}")]
ADV_METRICS = [("Dist-1", "dist1", "{:.3f}"), ("Dist-2", "dist2", "{:.3f}"), ("Entropy-4", "entropy4", "{:.2f}"),
               ("AdvSuc", "adv_success", "{:.3f}")]
DECODINGS = {"greedy": "greedy", "top-p": "top-p 0.9"}


def read_json(path: Path):
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parameters(checkpoint: Path) -> int:
    from dialogen.models.loading import load

    model = load(str(checkpoint)).model
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def budget(run: Path) -> tuple[int, float]:
    """(optimizer steps, seconds) of a training run, from its metrics log."""
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if "elapsed" in r]
    return steps[-1]["step"], steps[-1]["elapsed"]


def config(result: dict, name: str) -> dict:
    return next(c["metrics"] for c in result["configs"] if c["name"] == name)


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def families_table(run: Path) -> str:
    rows = [("GPT-2 style, 3 layers, d 128", run / "gpt", run / "eval-gpt.json"),
            ("GRU encoder-decoder, bidirectional 96+96, emb 128, Luong general, input feeding", run / "rnn",
             run / "eval-rnn.json")]
    head = ["model", "parameters", "steps in the budget", "seconds", "ppl", "decoding"] + [m[0] for m in METRICS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, ckpt, path in rows:
        result = read_json(path)
        steps, seconds = budget(ckpt)
        first = [label, f"{parameters(ckpt / 'best') / 1e6:.2f} M", str(steps), f"{seconds:.0f}",
                 f"{result['perplexity']['ppl']:.1f}"]
        for i, (name, shown) in enumerate(DECODINGS.items()):
            m = config(result, name)
            cells = (first if i == 0 else [""] * len(first)) + [shown] + [f.format(m[k]) for _, k, f in METRICS]
            out.append("| " + " | ".join(cells) + " |")
    human = read_json(rows[0][2])["human"]
    cells = ["human references"] + [""] * 5 + [f.format(human[k]) if k in human else "" for _, k, f in METRICS]
    out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def seeds_of(run: Path) -> list[str]:
    return sorted(p.name.removeprefix("eval-rnn-adv-").removesuffix(".json") for p in run.glob("eval-rnn-adv-*.json"))


def adversarial_table(run: Path) -> str:
    seeds = seeds_of(run)
    groups = [("MLE (the RNN above)", ["eval-rnn.json"]),
              ("MLE + 150 MLE steps (control)", [f"eval-rnn-mle-{s}.json" for s in seeds]),
              ("adversarial, 150 rounds", [f"eval-rnn-adv-{s}.json" for s in seeds])]
    head = ["generator", "decoding", "ppl"] + [m[0] for m in ADV_METRICS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, files in groups:
        results = [read_json(run / f) for f in files]
        ppl = spread([r["perplexity"]["ppl"] for r in results], "{:.1f}")
        for i, (name, shown) in enumerate(DECODINGS.items()):
            ms = [config(r, name) for r in results]
            cells = [label if i == 0 else "", shown, ppl if i == 0 else ""]
            cells += [spread([m[k] for m in ms], f) for _, k, f in ADV_METRICS]
            out.append("| " + " | ".join(cells) + " |")
    human = read_json(run / "eval-rnn.json")["human"]
    cells = ["human references", "", ""] + [f.format(human[k]) for _, k, f in ADV_METRICS]
    out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def discriminators(run: Path) -> str:
    seeds = seeds_of(run)
    pre = [read_json(run / f"d-{s}" / "dialogen.json").get("valid_accuracy") for s in seeds]
    ev = read_json(run / "evaluator" / "dialogen.json")
    final = []
    for s in seeds:
        rows = [r for r in read_jsonl(run / f"rnn-adv-{s}-adversarial.jsonl") if r.get("d_accuracy") is not None]
        final.append(statistics.mean(r["d_accuracy"] for r in rows[-20:]))
    return (f"seeds {', '.join(seeds)}; pretrained D validation accuracy {', '.join(f'{a:.3f}' for a in pre)}; "
            f"D accuracy on fresh samples over the last 20 rounds {', '.join(f'{a:.3f}' for a in final)}; "
            f"evaluator validation accuracy {ev.get('valid_accuracy'):.3f}")


def moving_average(values: list[float], width: int = 10) -> list[float]:
    return [statistics.mean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]


def plot(run: Path, png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = [("d_accuracy", "D accuracy on fresh samples (10-round mean)"),
              ("mean_reward", "mean reward D(c, r) (10-round mean)"), ("valid_ppl", "G validation perplexity")]
    for kind, color in (("adv", "tab:red"), ("mle", "tab:blue")):
        for n, s in enumerate(seeds_of(run)):
            rows = read_jsonl(run / f"rnn-{kind}-{s}-adversarial.jsonl")
            for ax, (key, title) in zip(axes, panels):
                pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
                if not pts:
                    continue
                ys = [p[1] for p in pts] if key == "valid_ppl" else moving_average([p[1] for p in pts])
                label = ("adversarial" if kind == "adv" else "MLE control") if n == 0 else None
                ax.plot([p[0] for p in pts], ys, color=color, alpha=0.8, lw=1.2, label=label)
                ax.set_title(title, fontsize=10)
                ax.set_xlabel("round")
                ax.grid(alpha=0.3)
    axes[2].legend()
    fig.suptitle(f"adversarial training of the RNN, one line per seed ({', '.join(seeds_of(run))})", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print(f"wrote {png}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default="runs/classic", help="RUN_DIR of bench/classic_families.sh")
    ap.add_argument("--plot", default=None, help="also draw the curves of every seed into this PNG")
    args = ap.parse_args()
    run = Path(args.run)
    print("### RNN + attention vs a from-scratch GPT\n")
    print(families_table(run))
    print("\n### MLE-only vs adversarial training\n")
    print(adversarial_table(run))
    print("\n" + discriminators(run))
    if args.plot:
        plot(run, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
