"""Sampling processors and the streaming loop."""

import pytest
import torch

from dialogen.decoding import processors as P
from dialogen.decoding.generate import Generation
from dialogen.decoding.settings import Sampling
from dialogen.errors import UserError
from dialogen.models.loading import load


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load(str(tiny_llama[0])).model


def test_top_p_keeps_smallest_nucleus_and_at_least_one():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = P.top_p_filter(logits, 0.75).isfinite().tolist()
    assert kept == [True, True, False, False]
    assert P.top_p_filter(logits, 1e-6).isfinite().tolist() == [True, False, False, False]


def test_top_k():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert P.top_k_filter(logits, 2).isfinite().tolist() == [False, True, True, False]


def test_repetition_penalty_rule():
    out = P.repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_frequency_and_presence():
    out = P.frequency_presence(torch.zeros(3), [0, 0, 2], 0.5, 1.0)
    assert out.tolist() == [-2.0, 0.0, -1.5]


def test_negative_penalties_favour_repeats():
    """OpenAI's range is [-2, 2]: below zero, tokens already in the reply gain."""
    out = P.frequency_presence(torch.zeros(3), [0, 0, 2], -0.5, -2.0)
    assert out.tolist() == [3.0, 0.0, 2.5]
    s = Sampling(temperature=0, repetition_penalty=1.0, presence_penalty=-2.0)
    assert P.next_token(torch.tensor([1.0, 0.0, 0.5]), s, None, [2], [2]) == 2  # 0.5 + 2 beats 1.0
    for bad in (-2.01, 2.5):
        with pytest.raises(UserError, match="--presence-penalty"):
            Sampling(presence_penalty=bad)


def test_a_grammar_mask_outranks_an_ngram_ban():
    """When the only token a grammar allows is banned by no_repeat_ngram, the grammar's token is kept."""
    s = Sampling(temperature=0, repetition_penalty=1.0, no_repeat_ngram=1)
    only = torch.tensor([False, True, False])
    assert P.next_token(torch.tensor([0.0, 1.0, 2.0]), s, None, [1], [1], only) == 1
    both = torch.tensor([True, True, False])  # another allowed token: the ban holds
    assert P.next_token(torch.tensor([0.0, 1.0, 2.0]), s, None, [1], [1], both) == 0


def test_banned_ngrams():
    assert P.banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert sorted(P.banned_ngram_tokens([5, 6, 5, 7, 5], 2)) == [6, 7]
    assert P.banned_ngram_tokens([1, 2], 3) == []


@pytest.mark.parametrize("flag, value", [("top_p", 0.0), ("top_p", 1.5), ("temperature", -1),
                                          ("repetition_penalty", 0), ("frequency_penalty", -2.1),
                                          ("max_new_tokens", 0), ("top_k", -1)])
def test_bad_settings_name_the_flag(flag, value):
    with pytest.raises(UserError, match=f"--{flag.replace('_', '-')}"):
        Sampling(**{flag: value})


def _gen(model, tok, **kw):
    s = Sampling(**{"repetition_penalty": 1.0, "max_new_tokens": 16, **kw})
    prompt = tok.encode_text("Once upon a time")
    return Generation(model, tok, prompt, model.new_cache(1), s, stop_ids=set()).run()


def test_seed_reproduces_and_greedy_is_deterministic(model, smol_tokenizer):
    a = _gen(model, smol_tokenizer, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    b = _gen(model, smol_tokenizer, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    c = _gen(model, smol_tokenizer, temperature=1.0, top_k=0, top_p=1.0, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    g1, g2 = _gen(model, smol_tokenizer, temperature=0), _gen(model, smol_tokenizer, temperature=0, seed=3)
    assert g1.tokens == g2.tokens
    assert g1.finish_reason == "length" and len(g1.tokens) == 16


def test_stop_token_ends_reply(model, smol_tokenizer):
    free = _gen(model, smol_tokenizer, temperature=0)
    stop_at = free.tokens[5]
    s = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=16)
    gen = Generation(model, smol_tokenizer, smol_tokenizer.encode_text("Once upon a time"), model.new_cache(1), s,
                     stop_ids={stop_at}).run()
    assert gen.finish_reason == "stop"
    assert gen.tokens == free.tokens[:free.tokens.index(stop_at)]


def test_stop_string_is_cut_and_never_streamed(model, smol_tokenizer):
    free = _gen(model, smol_tokenizer, temperature=0)
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    s = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=16, stop=[stop])
    gen = Generation(model, smol_tokenizer, smol_tokenizer.encode_text("Once upon a time"), model.new_cache(1), s,
                     stop_ids=set())
    deltas = list(gen)
    assert "".join(deltas) == gen.text == free.text[: free.text.index(stop)]
    assert gen.finish_reason == "stop"


def test_streaming_never_splits_a_character(model, smol_tokenizer):
    """Feed the byte-level tokens of multi-byte text one by one through `advance` (greedy on logits
    that pick each token in turn)."""
    text = "héllo 🤗 日本 👩‍👧"
    ids = smol_tokenizer.encode_text(text)
    assert any("\ufffd" in smol_tokenizer.decode([i]) for i in ids)  # some tokens are partial characters
    greedy = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=len(ids) + 1)
    gen = Generation(model, smol_tokenizer, [1], model.new_cache(1), greedy, stop_ids=set())
    deltas = []
    for i in ids:
        logits = torch.zeros(smol_tokenizer.vocab_size)
        logits[i] = 100.0
        deltas += gen.advance(logits)
    assert gen.tokens == ids and not gen.done
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_sampling_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {P.next_token(logits, Sampling(temperature=1.0, top_k=3, top_p=0.6, repetition_penalty=1.0), g, [], [])
            for _ in range(300)}
    assert seen == {1, 2}  # top-3 is {1, 2, 3}; of those, 0.4 + 0.3 reaches p = 0.6 of the renormalised mass
    seen = {P.next_token(logits, Sampling(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0), g, [], [])
            for _ in range(300)}
    assert seen == {0, 1, 2, 3, 4}
