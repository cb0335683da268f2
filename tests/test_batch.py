"""Batched generation equals one-by-one generation; several samples of one prompt share a prefill."""

import pytest
import torch

from dialogen.decoding.batch import generate_batch, sample_replies
from dialogen.decoding.generate import Generation
from dialogen.decoding.settings import Sampling
from dialogen.models.loading import load

ARCHS = ["tiny_llama", "tiny_gpt2"]
TEXTS = ["Hi", "How are you doing today, my friend?", "Tell me a story about a cat", "ok", "What is the time?"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return load(str(request.getfixturevalue(request.param)[0])).model


def one_by_one(model, tok, prompt, s, stop):
    return Generation(model, tok, prompt, model.new_cache(1), s, stop_ids=set(stop)).run()


def greedy(**kw):
    return Sampling(temperature=0, repetition_penalty=kw.pop("repetition_penalty", 1.0), max_new_tokens=16, **kw)


@pytest.mark.parametrize("kw", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram": 2}])
def test_batched_greedy_equals_one_by_one(model, smol_tokenizer, kw):
    tok = smol_tokenizer
    prompts = [tok.encode_text(t) for t in TEXTS]
    s = greedy(**kw)
    free = [one_by_one(model, tok, p, s, ()).tokens for p in prompts]
    stop = {free[1][3], free[3][8]}  # two rows end early and leave the batch while the others go on
    expected = [one_by_one(model, tok, p, s, stop) for p in prompts]
    got = generate_batch(model, prompts, s, stop, tok, pad_id=tok.pad_id)
    assert [c.tokens for c in got] == [g.tokens for g in expected]
    assert [c.finish_reason for c in got] == [g.finish_reason for g in expected]
    assert "stop" in {c.finish_reason for c in got} and "length" in {c.finish_reason for c in got}
    assert [c.text for c in got] == [g.text for g in expected]


def test_batched_logprobs_are_the_model_likelihood(model, smol_tokenizer):
    prompts = [smol_tokenizer.encode_text(t) for t in TEXTS[:3]]
    got = generate_batch(model, prompts, greedy(), set(), smol_tokenizer)
    with torch.no_grad():
        for p, c in zip(prompts, got):
            logp = torch.log_softmax(model(torch.tensor([p + c.tokens]))[0].float(), dim=-1)
            ll = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c.tokens))
            assert c.logprob == pytest.approx(ll, abs=1e-3)


def test_batched_sampling_row_i_is_the_run_seeded_seed_plus_i(model, smol_tokenizer):
    tok = smol_tokenizer
    prompts = [tok.encode_text(t) for t in TEXTS[:3]]
    s = Sampling(temperature=1.0, top_k=0, top_p=0.9, repetition_penalty=1.0, max_new_tokens=12, seed=7)
    got = generate_batch(model, prompts, s, set(), tok)
    for i, (p, c) in enumerate(zip(prompts, got)):
        assert c.tokens == one_by_one(model, tok, p, s.replace(seed=7 + i), ()).tokens


def test_samples_of_one_prompt_share_the_prefill(model, smol_tokenizer):
    tok = smol_tokenizer
    prompt = tok.encode_text(TEXTS[2])
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=10, seed=3)
    got = sample_replies(model, prompt, 4, s, set(), tok)
    expected = [one_by_one(model, tok, prompt, s.replace(seed=3 + i), ()).tokens for i in range(4)]
    assert [c.tokens for c in got] == expected
    assert len({tuple(t) for t in expected}) > 1  # different seeds really give different samples


def test_stop_strings_end_a_row(model, smol_tokenizer):
    tok = smol_tokenizer
    prompts = [tok.encode_text(t) for t in TEXTS[:2]]
    free = generate_batch(model, prompts, greedy(), set(), tok)
    marker = free[0].text[5:9]
    assert marker
    got = generate_batch(model, prompts, greedy(stop=[marker]), set(), tok)
    assert got[0].text == free[0].text[: free[0].text.index(marker)] and got[0].finish_reason == "stop"
    assert len(got[0].tokens) < len(free[0].tokens)


def test_every_decoder_stops_a_reply_where_the_positions_end(model, smol_tokenizer):
    """A prompt near the end of the model's 256 positions: streamed, batched, sampled and beam
    replies stop there with finish_reason "length" instead of failing; a short prompt beside it in
    the batch still gets its full reply."""
    from dialogen.decoding.beam import BeamSettings, beam_search

    assert model.max_positions == 256
    long, short = [42] * 250, [42] * 10
    s = greedy()  # 16 new tokens
    assert len(one_by_one(model, smol_tokenizer, long, s, ()).tokens) == 6
    rows = generate_batch(model, [long, short], s, set(), smol_tokenizer, pad_id=smol_tokenizer.pad_id)
    assert [len(c.tokens) for c in rows] == [6, 16] and {c.finish_reason for c in rows} == {"length"}
    assert all(len(c.tokens) == 6 for c in sample_replies(model, long, 3, s.replace(temperature=1.0), set()))
    beams = beam_search(model, long, BeamSettings(beam_size=3, max_new_tokens=16), set())
    assert beams and all(len(c.tokens) <= 6 for c in beams)
