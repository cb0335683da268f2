"""Beam search: against transformers' beam search, against greedy, its scores, its n-gram blocking."""

import pytest
import torch

from dialogen.decoding.beam import BeamSettings, beam_search
from dialogen.decoding.generate import Generation
from dialogen.decoding.settings import Sampling
from dialogen.errors import UserError
from dialogen.models.loading import load

ARCHS = ["tiny_llama", "tiny_gpt2"]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    path, ref = request.getfixturevalue(request.param)
    return load(str(path)).model, ref


@pytest.fixture(scope="module")
def prompt(smol_tokenizer):
    TOKENIZER.append(smol_tokenizer)
    return smol_tokenizer.encode_text("Hello there, how are you doing today?")


TOKENIZER = []


def greedy(model, prompt, n=20, stop=(), **kw):
    s = Sampling(temperature=0, repetition_penalty=kw.pop("repetition_penalty", 1.0), max_new_tokens=n, **kw)
    return Generation(model, TOKENIZER[0], prompt, model.new_cache(1), s, stop_ids=set(stop)).run().tokens


@torch.no_grad()
def sequence_logprob(model, prompt, tokens):
    """Sum of log P(token | everything before it) by one plain forward pass."""
    logp = torch.log_softmax(model(torch.tensor([prompt + tokens])).float()[0], dim=-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))


def full(c):
    return c.tokens + ([c.stop_token] if c.stop_token is not None else [])


def ngrams(seq, n):
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


@pytest.mark.parametrize("length_penalty,early_stopping,stops", [(1.0, True, (4, 5)), (0.5, False, (3, 6))])
def test_matches_transformers_beam_search(pair, prompt, length_penalty, early_stopping, stops):
    ours, ref = pair
    trace = greedy(ours, prompt)
    for stop in [set(trace[stops[0]:stops[1]])]:  # stop tokens the model actually reaches
        s = BeamSettings(beam_size=4, max_new_tokens=16, length_penalty=length_penalty, early_stopping=early_stopping)
        got = beam_search(ours, prompt, s, stop)
        out = ref.generate(torch.tensor([prompt]), num_beams=4, num_return_sequences=4, max_new_tokens=16,
                           do_sample=False, eos_token_id=sorted(stop), pad_token_id=0, length_penalty=length_penalty,
                           early_stopping=True if early_stopping else "never", output_scores=True,
                           return_dict_in_generate=True)
        expected = []
        for row in out.sequences[:, len(prompt):].tolist():  # finished rows are padded after their stop token
            end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            expected.append(row[:end])
        assert [full(c) for c in got] == expected
        assert [c.score for c in got] == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)


@pytest.mark.parametrize("penalty,no_repeat", [(1.0, 0), (1.3, 2)])
def test_beam_size_one_is_greedy(pair, prompt, penalty, no_repeat):
    ours, _ = pair
    trace = greedy(ours, prompt, 24, repetition_penalty=penalty, no_repeat_ngram=no_repeat)
    stop = {trace[12]}
    expected = greedy(ours, prompt, 24, stop, repetition_penalty=penalty, no_repeat_ngram=no_repeat)
    s = BeamSettings(beam_size=1, max_new_tokens=24, repetition_penalty=penalty, no_repeat_ngram=no_repeat)
    (best,) = beam_search(ours, prompt, s, stop)
    assert best.tokens == expected
    assert best.finish_reason == "stop" and len(best.tokens) <= 12


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 0.7])
def test_nbest_scores_are_sorted_normalised_loglikelihoods(pair, prompt, length_penalty):
    ours, _ = pair
    s = BeamSettings(beam_size=5, max_new_tokens=14, length_penalty=length_penalty)
    free = beam_search(ours, prompt, s, set())
    stop = {c.tokens[k] for c in free for k in (4, 8, 12)}  # tokens the beams reach: some replies end on them
    got = beam_search(ours, prompt, s, stop)
    assert len(got) == 5 and len({tuple(full(c)) for c in got}) == 5
    if length_penalty == 0:  # a plain sum favours the short replies that end on a stop token
        assert "stop" in {c.finish_reason for c in got}
    scores = [c.score for c in got]
    assert scores == sorted(scores, reverse=True)
    for c in got:
        ll = sequence_logprob(ours, prompt, full(c))
        assert c.logprob == pytest.approx(ll, abs=1e-3)
        assert c.score == pytest.approx(ll / c.length ** length_penalty, abs=1e-3)


def test_candidate_logprob_stays_the_model_likelihood_under_a_penalty(pair, prompt):
    ours, _ = pair
    got = beam_search(ours, prompt, BeamSettings(beam_size=3, max_new_tokens=12, repetition_penalty=1.5), set())
    for c in got:
        assert c.logprob == pytest.approx(sequence_logprob(ours, prompt, full(c)), abs=1e-3)


def test_no_repeat_ngram_never_emits_a_repeated_ngram(default_engine):
    model, tok = default_engine.model, default_engine.tokenizer
    prompt = tok.encode_text("I like cats. I like cats. I like cats. I like")
    free = beam_search(model, prompt, BeamSettings(beam_size=2, max_new_tokens=12), set())
    assert any(len(set(ngrams(c.tokens, 2))) < len(ngrams(c.tokens, 2)) for c in free)  # unblocked it repeats
    for n in (1, 2):
        got = beam_search(model, prompt, BeamSettings(beam_size=2, max_new_tokens=12, no_repeat_ngram=n), set())
        assert len(got) == 2
        for c in got:
            grams = ngrams(full(c), n)
            assert len(grams) == len(set(grams)), f"repeated {n}-gram in {tok.decode(c.tokens)!r}"


def test_context_blocking_never_emits_a_context_ngram(pair, prompt):
    ours, _ = pair
    free = beam_search(ours, prompt, BeamSettings(beam_size=3, max_new_tokens=20), set())
    context = free[0].tokens  # what the model says unblocked becomes the context to avoid
    s = BeamSettings(beam_size=3, max_new_tokens=20, block_context_ngram=2)
    got = beam_search(ours, prompt, s, set(), context=[context[:7], context[7:]])
    banned = set(ngrams(context[:7], 2)) | set(ngrams(context[7:], 2))
    for c in got:
        assert not banned & set(ngrams(full(c), 2))


def test_min_new_tokens_holds_back_the_stop_token(pair, prompt):
    ours, _ = pair
    s = BeamSettings(beam_size=2, max_new_tokens=12, length_penalty=0.0)
    stop = {beam_search(ours, prompt, s, set())[0].tokens[1]}
    assert any(len(c.tokens) < 6 for c in beam_search(ours, prompt, s, stop))
    got = beam_search(ours, prompt, BeamSettings(beam_size=2, max_new_tokens=12, length_penalty=0.0, min_new_tokens=6), stop)
    assert all(len(c.tokens) >= 6 for c in got)


class StepOnly:
    """A model that offers nothing but the shared step interface."""

    def __init__(self, model):
        self._model = model

    def __call__(self, ids, cache):
        return self._model(ids, cache)

    def new_cache(self, batch):
        return self._model.new_cache(batch)


def test_beam_search_needs_only_the_step_interface(pair, prompt):
    ours, _ = pair
    s = BeamSettings(beam_size=3, max_new_tokens=10)
    a = beam_search(ours, prompt, s, set())
    b = beam_search(StepOnly(ours), prompt, s, set())
    assert [c.tokens for c in a] == [c.tokens for c in b]


@pytest.mark.parametrize("field,value,flag", [("beam_size", 0, "--beam-size"), ("no_repeat_ngram", -1, "--no-repeat-ngram"),
                                               ("repetition_penalty", 0, "--repetition-penalty"),
                                               ("min_new_tokens", 99, "--min-new-tokens")])
def test_bad_settings_name_the_flag(field, value, flag):
    with pytest.raises(UserError, match=flag):
        BeamSettings(**{field: value, "max_new_tokens": 20})
