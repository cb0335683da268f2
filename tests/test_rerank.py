"""Scorers and reranking: the MMI arithmetic, sample-and-rank, the scorer registry, bad input."""

import json
import shutil

import pytest
import torch

from dialogen.chat.messages import Message
from dialogen.chat.ranked import RankedSession
from dialogen.chat.session import load_engine
from dialogen.cli import main
from dialogen.decoding.reverse import reverse_example_ids
from dialogen.decoding.beam import BeamSettings, beam_search
from dialogen.decoding.rerank import MMI, SCORERS, LogLikelihood, load_reverse, masked_logprobs, rerank
from dialogen.decoding.settings import Decoding, Sampling
from dialogen.decoding.strategy import Decoder
from dialogen.errors import UserError

CONTEXT = [Message("user", "Do you like hiking?"), Message("assistant", "Yes, every weekend."),
           Message("user", "Where do you usually go?")]


@pytest.fixture(scope="module")
def forward(tiny_llama):
    return load_engine(str(tiny_llama[0]), "chatml")


@pytest.fixture(scope="module")
def reverse(tiny_gpt2):
    """Any loadable model with the same vocabulary serves to test the MMI arithmetic."""
    return load_reverse(str(tiny_gpt2[0]))


@torch.no_grad()
def reference_logprob(hf_model, ids, mask):
    """log P of the masked tokens by transformers' own model."""
    logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]), sum(mask[1:])


def test_registry_names_the_three_scorers():
    assert set(SCORERS) == {"logprob", "mmi", "discriminator"}


def test_masked_logprobs_match_transformers_on_a_padded_batch(reverse, tiny_gpt2):
    tok = reverse.tokenizer
    rows = [reverse_example_ids(tok, reverse.template, CONTEXT, reply) for reply in ("Mostly the hills.", "Hm.")]
    got = masked_logprobs(reverse.model, rows, tok.pad_id)
    for (ids, mask), (s, n) in zip(rows, got):
        ref_s, ref_n = reference_logprob(tiny_gpt2[1], ids, mask)
        assert n == ref_n > 0
        assert s == pytest.approx(ref_s, abs=1e-3)


def test_mmi_is_forward_mean_plus_weight_times_reverse_mean(forward, reverse, tiny_gpt2):
    prompt = forward.template.render(forward.tokenizer, CONTEXT, add_generation_prompt=True)[0]
    cands = beam_search(forward.model, prompt, BeamSettings(beam_size=4, max_new_tokens=8), set())
    for c in cands:
        c.text = forward.tokenizer.decode(c.tokens)
    weight = 0.7
    scorer = MMI(forward, mmi_weight=weight, reverse=reverse)
    winner = rerank(scorer, CONTEXT, cands)
    for c in cands:
        ids, mask = reverse_example_ids(reverse.tokenizer, reverse.template, CONTEXT, c.text)
        rev_sum, rev_n = reference_logprob(tiny_gpt2[1], ids, mask)
        fwd = c.logprob / c.length
        assert c.scores["forward"] == pytest.approx(fwd, abs=1e-5)
        assert c.scores["reverse"] == pytest.approx(rev_sum / rev_n, abs=1e-4)
        assert c.scores["score"] == pytest.approx(fwd + weight * rev_sum / rev_n, abs=1e-4)
    assert winner == max(range(len(cands)), key=lambda i: cands[i].scores["score"])
    # weight 0: MMI ranks exactly as the length-normalised log-likelihood
    plain = rerank(LogLikelihood(forward), CONTEXT, cands)
    assert rerank(MMI(forward, mmi_weight=0.0, reverse=reverse), CONTEXT, cands) == plain


def test_sample_and_rank_picks_the_best_mean_loglikelihood(forward):
    prompt = forward.template.render(forward.tokenizer, CONTEXT, add_generation_prompt=True)[0]
    d = Decoding(num_candidates=5, candidates="sample")
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=8, seed=11)
    cands, winner = Decoder(forward, d).candidates(prompt, CONTEXT, s)
    assert len(cands) == 5 and len({tuple(c.tokens) for c in cands}) > 1
    with torch.no_grad():
        for c in cands:
            seq = c.tokens + ([c.stop_token] if c.stop_token is not None else [])
            logp = torch.log_softmax(forward.model(torch.tensor([prompt + seq]))[0].float(), dim=-1)
            ll = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(seq))
            assert c.scores["score"] == pytest.approx(ll / len(seq), abs=1e-3)
    assert cands[winner].scores["score"] == max(c.scores["score"] for c in cands)


def test_ranked_session_replies_with_the_beam_winner_and_keeps_history(forward):
    s = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=8)
    shown = []
    session = RankedSession(forward, Decoding(beam_size=3), on_reply=shown.append, sampling=s)
    reply = session.send("Do you like hiking?").run()
    prompt = forward.template.render(forward.tokenizer, [Message("user", "Do you like hiking?")], True)[0]
    stops = forward.template.stop_ids(forward.tokenizer)
    best = beam_search(forward.model, prompt, BeamSettings(beam_size=3, max_new_tokens=8), stops)[0]
    assert reply.tokens == best.tokens and reply.winner == 0 and len(reply.candidates) == 3
    assert [m.role for m in session.messages] == ["user", "assistant"] and session.messages[1].content == reply.text
    assert shown == [reply]
    session.send("And then?").run()
    assert [m.role for m in session.messages] == ["user", "assistant", "user", "assistant"]


def _other_tokenizer_model(src, dst):
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[1000], list(vocab)[1001]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, different mapping
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def test_mmi_model_with_another_tokenizer_is_refused(forward, tiny_gpt2, tmp_path):
    other = _other_tokenizer_model(tiny_gpt2[0], tmp_path / "other")
    with pytest.raises(UserError, match="--mmi-model: its tokenizer"):
        MMI(forward, mmi_model=str(other))


def test_cli_mmi_tokenizer_mismatch_is_one_line_exit_2(tiny_llama, tiny_gpt2, tmp_path, capsys):
    other = _other_tokenizer_model(tiny_gpt2[0], tmp_path / "other")
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    code = main(["generate", str(msgs), "--model", str(tiny_llama[0]), "--beam-size", "2", "--mmi-model", str(other),
                 "--max-new-tokens", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--mmi-model" in err


@pytest.mark.parametrize("flags,name", [
    (["--beam-size", "0"], "--beam-size"),
    (["--num-candidates", "0"], "--num-candidates"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--repetition-penalty", "-1"], "--repetition-penalty"),
    (["--frequency-penalty", "-2.5"], "--frequency-penalty"),  # OpenAI's range is [-2, 2]
    (["--presence-penalty", "2.5"], "--presence-penalty"),
    (["--no-repeat-ngram", "-2"], "--no-repeat-ngram"),
    (["--mmi-weight", "-1", "--beam-size", "2"], "--mmi-weight"),
    (["--candidates", "sample", "--beam-size", "3"], "--candidates sample"),
    (["--mmi-model", "x"], "--mmi-model"),
    (["--scorer", "mmi", "--beam-size", "2"], "--mmi-model"),
])
def test_bad_decoding_flags_name_the_flag(flags, name, tiny_llama, tmp_path, capsys):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    code = main(["generate", str(msgs), "--model", str(tiny_llama[0]), "--max-new-tokens", "8", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and name in err, err


def test_generate_shows_candidates_with_scores_and_the_winner(tiny_llama, tmp_path, capsys):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    code = main(["generate", str(msgs), "--model", str(tiny_llama[0]), "--num-candidates", "3", "--candidates",
                 "sample", "--temperature", "1", "--seed", "1", "--max-new-tokens", "6", "--show-candidates"])
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert code == 0 and len(data["candidates"]) == 3
    assert sum(c["winner"] for c in data["candidates"]) == 1
    best = max(data["candidates"], key=lambda c: c["scores"]["score"])
    assert best["winner"] and best["text"] == data["reply"]
    assert out.err.count("score=") == 3 and out.err.count("*[") == 1


def test_the_scorer_flag_lists_every_reranker():
    from dialogen.decoding.rerank import SCORERS
    from dialogen.decoding.settings import SCORER_NAMES

    assert tuple(SCORERS) == SCORER_NAMES
