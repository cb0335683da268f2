"""Adversarial evaluation: the fraction of a model's replies that a separately trained evaluator
discriminator judges human-written (P(human) >= 0.5). Higher means harder to tell from people.

The evaluator reads texts with its own tokenizer, so one evaluator can judge models of any
vocabulary; it should be trained apart from any discriminator a generator was trained against
(`dialogen train-discriminator` with another seed or generator), or the score measures only how
well a generator learned to fool its own adversary. Its accuracy on the human references is
reported beside, as the yardstick.
"""

from __future__ import annotations

from ..chat.messages import Message
# torch, the model code and the extras are imported inside the commands: building `--help` stays torch-free

THRESHOLD = 0.5


class Evaluator:
    def __init__(self, path: str, flag: str = "--evaluator"):
        from ..models.discriminator import load_discriminator

        self.path = path
        self.disc, self.tokenizer, self.meta = load_discriminator(path, flag=flag)

    def probabilities(self, contexts: list[list[Message]], replies: list[str]) -> list[float]:
        pairs = [self.disc.encode_pair(self.tokenizer, c, r) for c, r in zip(contexts, replies)]
        return self.disc.prob_human(pairs)

    def success(self, contexts: list[list[Message]], replies: list[str]) -> float:
        """Fraction of replies judged human."""
        probs = self.probabilities(contexts, replies)
        return sum(p >= THRESHOLD for p in probs) / max(len(probs), 1)


def add_evaluator_args(group):
    group.add_argument("--evaluator", default=None,
                       help="a discriminator (dialogen train-discriminator) trained apart from the model: adds "
                            "adversarial success, the fraction of replies it judges human")
