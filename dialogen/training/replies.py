"""Context -> reply pairs, and what every generator family does with them.

A pair is the last K turns of a conversation and the turn that answers them. The generator sees
the chat template's rendering of the context (with the generation prompt) and learns the
reply's tokens plus the end-of-turn marker, exactly as a session will prompt it. Both families
work on the same pairs: a decoder-only transformer reads prompt + reply as one sequence, the
encoder-decoder encodes the prompt and decodes the reply. The discriminator reads the plain
texts, so it judges a reply however it was produced.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..chat.messages import Message
from ..data.dataset import IGNORE_INDEX
from ..decoding.batch import generate_batch
from ..decoding.processors import MIN_TEMPERATURE
from ..decoding.settings import Sampling
from ..models.family import is_encoder_decoder
from ..models.transformer import Transformer

SEQ2SEQ_GROUP = 32  # replies per encoder-decoder forward in the trainer's loss


@dataclass
class Pair:
    context: list[Message]  # the turns before the reply (a system message first, if any)
    reply: str
    prompt: list[int]  # the rendered context + generation prompt, at most max_prompt tokens (the newest)
    target: list[int]  # the reply's tokens and the end-of-turn marker


def _as_reply_to(conv: list[Message], i: int) -> list[Message]:
    """conv[:i+1] with roles re-assigned so that turn i is the assistant's, speakers alternating."""
    out = []
    for j, m in enumerate(conv[: i + 1]):
        if m.role == "system":
            out.append(m)
        else:
            out.append(Message("assistant" if (i - j) % 2 == 0 else "user", m.content))
    return out


def make_pairs(conversations, tokenizer, template, turns: int = 3, max_prompt: int = 256,
               max_reply: int = 64, both_speakers: bool = True) -> list[Pair]:
    """Every reply turn of every conversation, with its last `turns` turns of context.

    With `both_speakers`, each non-first turn is a reply (both people in a human chat are
    examples of human replies); otherwise only the assistant's turns are.
    """
    pairs = []
    for conv in conversations:
        system = [m for m in conv[:1] if m.role == "system"]
        body = conv[len(system):]
        for i in range(1, len(body)):
            if not both_speakers and body[i].role != "assistant":
                continue
            msgs = _as_reply_to(body, i)
            context = system + msgs[max(0, i - turns): i]
            pair = _render_pair(tokenizer, template, context, msgs[i], max_prompt, max_reply)
            if pair is not None:
                pairs.append(pair)
    return pairs


def _render_pair(tokenizer, template, context, reply: Message, max_prompt: int, max_reply: int):
    prompt = template.render(tokenizer, context, add_generation_prompt=True)[0]
    full, mask = template.render(tokenizer, context + [reply])
    if full[: len(prompt)] == prompt:
        target = [t for t, m in zip(full[len(prompt):], mask[len(prompt):]) if m]
    else:  # a template whose generation prompt differs from how it writes a reply's start
        stop = sorted(template.stop_ids(tokenizer))
        target = tokenizer.encode_text(reply.content) + stop[:1]
    if not target or not prompt:
        return None
    return Pair(context, reply.content, prompt[-max_prompt:], target[:max_reply])


def split_pairs(pairs: list[Pair], fraction: float, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """A seeded shuffle, then (the rest, the last `fraction`)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n = max(1, int(round(len(pairs) * fraction))) if fraction > 0 else 0
    rest, held = order[: len(order) - n], order[len(order) - n:]
    return [pairs[i] for i in rest], [pairs[i] for i in held]


# --- families -------------------------------------------------------------------------------
def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """(B, W) right-padded with `value`."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def target_logits(model, prompts: list[list[int]], targets: list[list[int]], pad_id: int = 0):
    """(logits (N, V), labels (N,), row (N,)): the logits predicting each of the N target tokens of
    the batch, flattened, and which row each belongs to. The output head runs only on those."""
    labels = _pad(targets, IGNORE_INDEX)
    keep = labels != IGNORE_INDEX  # (B, T)
    rows = torch.arange(len(targets))[:, None].expand_as(labels)[keep]
    if is_encoder_decoder(model):
        src = _pad(prompts, pad_id)
        src_mask = _pad([[1] * len(p) for p in prompts], 0).bool()
        feats = model.teacher_forced_features(src, src_mask, labels.clamp(min=0))  # (B, T, D)
        return model.head(feats[keep]), labels[keep], rows
    ids = _pad([p + t for p, t in zip(prompts, targets)], pad_id)  # right padding: causal, harmless
    index = torch.zeros_like(labels)
    for i, p in enumerate(prompts):  # the logit predicting target j sits at position len(p) - 1 + j
        index[i] = torch.arange(len(p) - 1, len(p) - 1 + labels.shape[1]).clamp(max=ids.shape[1] - 1)
    if isinstance(model, Transformer):
        h = model.hidden(ids)  # (B, S, d)
        h = h.gather(1, index[:, :, None].expand(-1, -1, h.shape[-1]))[keep]
        return model.head(h), labels[keep], rows
    logits = model(ids)  # (B, S, V)
    return logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1]))[keep], labels[keep], rows


def reply_logprobs(model, prompts, targets, pad_id: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """log p(target | prompt) per row (B,), summed over the target's tokens, under the model's
    distribution at `temperature` (the one the targets were sampled from); differentiable."""
    logits, labels, rows = target_logits(model, prompts, targets, pad_id)
    tok = F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels[:, None]).squeeze(-1)  # (N,)
    return torch.zeros(len(targets), dtype=tok.dtype).index_add(0, rows, tok)


def mle_loss(model, prompts, targets, pad_id: int = 0) -> torch.Tensor:
    """Mean token cross-entropy on the replies (teacher forcing)."""
    logits, labels, _ = target_logits(model, prompts, targets, pad_id)
    return F.cross_entropy(logits.float(), labels)


def label_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of labelled positions."""
    spans, start = [], None
    for i, lab in enumerate(labels + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def split_turns(span: tuple[int, int], ids: list[int], turn_end: int) -> list[tuple[int, int]]:
    """A labelled run cut after each end-of-turn token: trained turns can follow one another
    with no untrained token between them (a template that only joins turns with EOS)."""
    a, b = span
    out = []
    for i in range(a, b):
        if ids[i] == turn_end and i + 1 < b:
            out.append((a, i + 1))
            a = i + 1
    return out + [(a, b)]


def seq2seq_nll_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder-only loss contract (sum of -log p(label), count) for an encoder-decoder: each
    labelled turn of a row (B, T) is a reply to the tokens before it, which the encoder reads."""
    turn_end = model.cfg.turn_end_id
    prompts, targets = [], []
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
        for span in label_spans(row_labels):
            for a, b in split_turns(span, row_ids, turn_end) if turn_end >= 0 else [span]:
                if a > 0:  # a reply needs some context to answer
                    prompts.append(row_ids[:a])
                    targets.append(row_labels[a:b])
    if not prompts:  # keep every parameter in the graph (distributed training expects it)
        zero = sum(p.sum() for p in model.parameters()) * 0.0
        return zero, torch.zeros((), dtype=torch.long)
    # replies of similar length together: the decoder steps every row to its group's longest reply
    order = sorted(range(len(targets)), key=lambda i: len(targets[i]))
    total = 0.0
    for g in range(0, len(order), SEQ2SEQ_GROUP):
        idx = order[g:g + SEQ2SEQ_GROUP]
        total = total - reply_logprobs(model, [prompts[i] for i in idx], [targets[i] for i in idx]).sum()
    return total, torch.tensor(sum(len(t) for t in targets))


@torch.no_grad()
def perplexity(model, pairs: list[Pair], batch_size: int = 16, pad_id: int = 0) -> float:
    """exp(mean negative log-likelihood per reply token)."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts, targets = [p.prompt for p in chunk], [p.target for p in chunk]
        nll -= float(reply_logprobs(model, prompts, targets, pad_id).sum())
        count += sum(len(t) for t in targets)
    model.train(was_training)
    return math.exp(nll / max(count, 1))


def sample_replies(model, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int,
                   generator: torch.Generator, temperature: float = 1.0, pad_id: int = 0) -> list[list[int]]:
    """Ancestral samples from the model's own distribution (no top-k, top-p or penalty), a batch at
    a time (`decoding.batch.generate_batch`), seeded from `generator`. A reply keeps the stop token
    it ended with (the policy chose it)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    s = Sampling(temperature=max(temperature, MIN_TEMPERATURE), top_k=0, top_p=1.0, repetition_penalty=1.0,
                 max_new_tokens=max_new_tokens, seed=seed)
    return [c.tokens + [c.stop_token] * (c.stop_token is not None)
            for c in generate_batch(model, prompts, s, stop_ids, pad_id=pad_id)]


def sample_text(tokenizer, tokens: list[int], stop_ids: set[int]) -> str:
    """A sampled (or a human) reply's text as the discriminator reads it: no stop token, no specials."""
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special=True).strip()
