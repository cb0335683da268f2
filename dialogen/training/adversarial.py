"""Adversarial training of a dialogue generator, after Li et al. 2017 ("Adversarial Learning for
Neural Dialogue Generation").

Start from an MLE-trained generator G (either family) and a pretrained discriminator D. Each
round: d-steps teach D human replies (label 1) from replies G samples for the same contexts
(label 0); g-steps update G by REINFORCE, the reward of a sampled reply being D's P(human) minus
a baseline (a running mean of rewards), so G's log-likelihood of replies D finds human rises and
of the others falls; MLE steps on human replies (teacher forcing) keep G fluent and stable.
Each round logs D's accuracy on fresh samples, the mean reward and G's validation perplexity.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..models.discriminator import accuracy, d_loss
from ..paths import atomic_file
from .replies import Pair, mle_loss, perplexity, reply_logprobs, sample_replies, sample_text


@dataclass
class AdversarialSettings:
    rounds: int = 20
    d_steps: int = 1
    g_steps: int = 1
    mle_steps: int = 1
    batch_size: int = 16
    g_lr: float = 1e-4
    d_lr: float = 1e-4
    temperature: float = 1.0  # sampling temperature of G's replies (1 = its own distribution)
    max_new_tokens: int = 32
    baseline_decay: float = 0.9  # the baseline: running mean of rewards with this decay
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        checks = [
            ("rounds", self.rounds >= 1, ">= 1"), ("d_steps", self.d_steps >= 0, ">= 0"),
            ("g_steps", self.g_steps >= 0, ">= 0"), ("mle_steps", self.mle_steps >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("g_lr", self.g_lr > 0, "> 0"),
            ("d_lr", self.d_lr > 0, "> 0"), ("temperature", self.temperature > 0, "> 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("baseline_decay", 0 <= self.baseline_decay < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, ">= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)}")


# --- the pieces -----------------------------------------------------------------------------
def reinforce_loss(logp: torch.Tensor, rewards: torch.Tensor, baseline: float) -> torch.Tensor:
    """REINFORCE with a baseline: minimising it follows (r - b) * grad log p(reply | context).
    logp (B,) differentiable sequence log-probabilities, rewards (B,) constants."""
    return -((rewards.detach() - baseline) * logp).mean()


def machine_pairs(disc, tokenizer, pairs: list[Pair], samples: list[list[int]], stop_ids: set[int]):
    """D's encoding of (context, sampled reply) for each pair."""
    return [disc.encode_pair(tokenizer, p.context, sample_text(tokenizer, s, stop_ids)) for p, s in zip(pairs, samples)]


def human_pairs(disc, tokenizer, pairs: list[Pair], stop_ids: set[int]):
    """D's encoding of (context, human reply), the reply cut like a sample (`Pair.target` holds at
    most the sampling limit of tokens) and decoded the same way: length is no cue."""
    return [disc.encode_pair(tokenizer, p.context, sample_text(tokenizer, p.target, stop_ids)) for p in pairs]


def _step(opt, loss, params, clip: float):
    opt.zero_grad()
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


class Adversarial:
    """The training state: G, D, their optimisers, the baseline and the random streams."""

    def __init__(self, generator, disc, tokenizer, stop_ids: set[int], s: AdversarialSettings):
        self.g, self.d, self.tok, self.stop_ids, self.s = generator, disc, tokenizer, stop_ids, s
        self.g_opt = torch.optim.Adam(generator.parameters(), lr=s.g_lr)
        self.d_opt = torch.optim.Adam(disc.parameters(), lr=s.d_lr)
        self.baseline: float | None = None
        self.rng = random.Random(s.seed)
        self.gen = torch.Generator().manual_seed(s.seed)

    def sample(self, pairs: list[Pair]) -> list[list[int]]:
        was = self.g.training
        self.g.eval()  # sample without dropout: the policy as it will be used
        out = sample_replies(self.g, [p.prompt for p in pairs], self.stop_ids, self.s.max_new_tokens, self.gen,
                             self.s.temperature, self.tok.pad_id)
        self.g.train(was)
        return out

    def d_step(self, pairs: list[Pair]) -> tuple[float, float]:
        """One update of D on human vs freshly sampled replies; (loss, accuracy before the update)."""
        machine = machine_pairs(self.d, self.tok, pairs, self.sample(pairs), self.stop_ids)
        human = human_pairs(self.d, self.tok, pairs, self.stop_ids)
        acc = accuracy(self.d, human, machine)  # in eval mode: D as it judges, not with dropout
        self.d.train()
        loss, _ = d_loss(self.d, human, machine)
        _step(self.d_opt, loss, self.d.parameters(), self.s.grad_clip)
        return float(loss.detach()), acc

    def g_step(self, pairs: list[Pair]) -> tuple[float, float]:
        """One REINFORCE update of G; (loss, mean reward)."""
        samples = self.sample(pairs)  # never empty: each holds at least the first token drawn
        rewards = torch.tensor(self.d.prob_human(machine_pairs(self.d, self.tok, pairs, samples, self.stop_ids)))
        mean = float(rewards.mean())
        b = mean if self.baseline is None else self.baseline
        self.g.eval()  # the gradient of the policy that drew the samples: no dropout, same temperature
        logp = reply_logprobs(self.g, [p.prompt for p in pairs], samples, self.tok.pad_id, self.s.temperature)
        loss = reinforce_loss(logp, rewards, b)
        _step(self.g_opt, loss, self.g.parameters(), self.s.grad_clip)
        decay = self.s.baseline_decay
        self.baseline = mean if self.baseline is None else decay * self.baseline + (1 - decay) * mean
        return float(loss.detach()), mean

    def mle_step(self, pairs: list[Pair]) -> float:
        self.g.train()
        loss = mle_loss(self.g, [p.prompt for p in pairs], [p.target for p in pairs], self.tok.pad_id)
        _step(self.g_opt, loss, self.g.parameters(), self.s.grad_clip)
        return float(loss.detach())

    def batch(self, pairs: list[Pair]) -> list[Pair]:
        return self.rng.sample(pairs, min(self.s.batch_size, len(pairs)))

    def round(self, train: list[Pair]) -> dict:
        s = self.s
        d = [self.d_step(self.batch(train)) for _ in range(s.d_steps)]
        g = [self.g_step(self.batch(train)) for _ in range(s.g_steps)]
        m = [self.mle_step(self.batch(train)) for _ in range(s.mle_steps)]
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {"d_loss": mean([x[0] for x in d]), "d_accuracy": mean([x[1] for x in d]),
                "g_loss": mean([x[0] for x in g]), "mean_reward": mean([x[1] for x in g]),
                "baseline": self.baseline, "mle_loss": mean(m)}


def train_adversarial(generator, disc, tokenizer, stop_ids: set[int], train: list[Pair], valid: list[Pair],
                      s: AdversarialSettings, log_path: Path, on_round=None) -> list[dict]:
    """The loop; one JSON line per round (round 0: before any update) appended to `log_path`."""
    if not train:
        raise UserError("no training pairs: the data has no replies to learn from")
    torch.manual_seed(s.seed)
    state = Adversarial(generator, disc, tokenizer, stop_ids, s)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(log_path, "w", encoding="utf-8") as log:
        for r in range(s.rounds + 1):
            t0 = time.time()
            row = {"round": r, **(state.round(train) if r > 0 else {})}
            row["valid_ppl"] = perplexity(generator, valid, pad_id=tokenizer.pad_id) if valid else None
            row["seconds"] = round(time.time() - t0, 2)
            log.write(json.dumps(row) + "\n")
            log.flush()
            rows.append(row)
            if on_round is not None:
                on_round(row)
    return rows


def settings_dict(s: AdversarialSettings) -> dict:
    return asdict(s)


def plot_log(rows: list[dict], png: Path, title: str = "adversarial training"):
    """Three panels over rounds: D accuracy, mean reward (and baseline), G validation perplexity.
    Written to a temp file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = [("d_accuracy", "D accuracy on fresh samples"), ("mean_reward", "mean reward D(c, r)"),
              ("valid_ppl", "G validation perplexity")]
    for ax, (key, label) in zip(axes, panels):
        pts = [(row["round"], row[key]) for row in rows if row.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        if key == "mean_reward":
            base = [(row["round"], row["baseline"]) for row in rows if row.get("baseline") is not None]
            if base:
                ax.plot([p[0] for p in base], [p[1] for p in base], ls="--", label="baseline")
                ax.legend()
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        return atomic_file(Path(png), lambda tmp: fig.savefig(tmp, dpi=90))
    finally:
        plt.close(fig)
