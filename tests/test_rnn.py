"""The recurrent encoder-decoder: attention, padding, incremental decoding, and the shared engine."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dialogen.chat.messages import Message
from dialogen.errors import UserError
from dialogen.models.rnn import ATTENTIONS, Attention, RNNConfig, RNNSeq2Seq, save_rnn

VOCAB = 120


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed=0, **kw):
    opts = dict(vocab_size=VOCAB, emb_dim=16, hidden=12, n_layer=2, dropout=0.0, start_id=1)
    opts.update(kw)
    m = RNNSeq2Seq(RNNConfig(**opts))
    m.init_weights(seed)
    with torch.no_grad():  # wider weights so that differences between paths would show
        for name, p in m.named_parameters():
            if p.dim() == 2 and not name.startswith("embed"):
                p.mul_(2.0)
    return m.eval()


def _ids(b, n, seed=0):
    return torch.randint(2, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_attention_weights_sum_to_one_and_ignore_padding(kind):
    torch.manual_seed(0)
    att = Attention(kind, 8)
    memory = torch.randn(3, 6, 8)
    query = torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).bool()
    ctx, w = att(query, memory, att.keys(memory), mask)
    assert w.shape == (3, 4, 6)
    assert torch.allclose(w.sum(-1), torch.ones(3, 4), atol=1e-6)
    assert (w[~mask[:, None, :].expand_as(w)] == 0).all()
    assert (w[mask[:, None, :].expand_as(w)] > 0).all()
    # whatever sits at padded positions cannot change the result
    noisy = memory.clone()
    noisy[~mask] = 1e3 * torch.randn(int((~mask).sum()), 8)
    ctx2, w2 = att(query, noisy, att.keys(noisy), mask)
    assert torch.allclose(ctx, ctx2, atol=1e-5) and torch.allclose(w, w2, atol=1e-6)
    assert torch.allclose(ctx[2], memory[2, 0].expand(4, 8), atol=1e-6)  # one real token: all weight on it


@pytest.mark.parametrize("cell,kind,feed,bidir", [
    ("gru", "additive", True, True), ("gru", "dot", False, True), ("gru", "general", True, False),
    ("lstm", "additive", False, True), ("lstm", "dot", True, False), ("lstm", "general", True, True),
])
def test_incremental_decode_equals_teacher_forced_forward(cell, kind, feed, bidir):
    m = _model(cell=cell, attention=kind, input_feeding=feed, bidirectional=bidir)
    src, tgt = _ids(3, 9, seed=1), _ids(3, 7, seed=2)
    with torch.no_grad():
        full = m.teacher_forced(src, None, tgt)  # (B, 7, V)
        cache = m.new_cache(3)
        steps = [m(src, cache)]  # encode: first reply token's logits
        steps.append(m(tgt[:, :3], cache))  # a chunk of decoder inputs, then single tokens
        for t in range(3, 6):
            steps.append(m(tgt[:, t:t + 1], cache))
    assert cache.length == 9 + 6
    assert full.shape == (3, 7, VOCAB)
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_padded_batch_equals_each_context_alone(cell):
    """Left- or right-padded contexts give the logits each context gives unpadded."""
    m = _model(cell=cell, attention="additive")
    lens = [9, 4, 6]
    srcs = [_ids(1, n, seed=10 + n)[0].tolist() for n in lens]
    tgt = _ids(3, 5, seed=3)
    with torch.no_grad():
        alone = torch.cat([m.teacher_forced(torch.tensor([s]), None, tgt[i:i + 1]) for i, s in enumerate(srcs)])
        for left in (True, False):
            src = torch.zeros(3, 9, dtype=torch.long)
            mask = torch.zeros(3, 9, dtype=torch.bool)
            for i, s in enumerate(srcs):
                cols = slice(9 - len(s), 9) if left else slice(0, len(s))
                src[i, cols], mask[i, cols] = torch.tensor(s), True
            batched = m.teacher_forced(src, mask, tgt)
            assert (batched - alone).abs().max().item() < 1e-5


def test_cache_reorder_truncate_and_size():
    m = _model()
    src, tgt = _ids(2, 6, seed=4), _ids(2, 4, seed=5)
    with torch.no_grad():
        full = m.teacher_forced(src, None, tgt)
        cache = m.new_cache(2)
        m(src, cache)
        m(tgt[:, :2], cache)
        assert cache.nbytes() > 0
        cache.reorder(torch.tensor([1, 1, 0]))  # beams: row 1 twice, then row 0
        nxt = m(tgt[[1, 1, 0], 2:3], cache)
        assert torch.allclose(nxt[:, 0], full[[1, 1, 0], 3], atol=1e-5)
        cache.truncate(6)  # back to the start of the reply: score another one
        again = m(tgt[[1, 1, 0], :1], cache)
        assert torch.allclose(again[:, 0], full[[1, 1, 0], 1], atol=1e-5)
        cache.truncate(3)  # anything else inside the context empties the cache
        assert cache.length == 0 and cache.nbytes() == 0


def test_context_is_the_last_k_turns():
    """With context_turns=K the encoder reads the last K turns and the generation prompt only."""
    eot = 3
    a = [5, 6, 3, 7, 8, 3, 9, 10]  # turn, turn, generation prompt
    b = [11, 12, 13, 3, 7, 8, 3, 9, 10]  # a different first turn
    tgt = _ids(1, 4, seed=6)
    for k, same in ((1, True), (2, False), (0, False)):
        m = _model(context_turns=k, turn_end_id=eot)
        with torch.no_grad():
            la = m.teacher_forced(torch.tensor([a]), None, tgt)
            lb = m.teacher_forced(torch.tensor([b]), None, tgt)
            # left-padded together with the other context, the kept part is still the same
            both = m.teacher_forced(torch.tensor([[0] + a, b]), torch.tensor([[0] + [1] * 8, [1] * 9]).bool(),
                                    tgt.expand(2, -1))
        assert torch.allclose(both[0], la[0], atol=1e-5) and torch.allclose(both[1], lb[0], atol=1e-5)
        assert torch.allclose(la, lb, atol=1e-6) == same


# --- the shared engine: tokenizer, template, sampling, sessions, checkpoints ---------------------
@pytest.fixture(scope="module")
def taught_rnn(tmp_path_factory, smol_tokenizer):
    """A tiny RNN with the SmolLM2 vocabulary taught two exchanges; saved as a checkpoint."""
    from dialogen.chat.templates import get_template
    from dialogen.training.replies import make_pairs, mle_loss

    tok = smol_tokenizer
    tpl = get_template("chatml", tok)
    convs = [[Message("user", "hi"), Message("assistant", "nice to meet you")],
             [Message("user", "how old are you?"), Message("assistant", "I am ten years old")]]
    pairs = make_pairs(convs, tok, tpl, both_speakers=False)
    cfg = RNNConfig(vocab_size=tok.vocab_size, emb_dim=24, hidden=24, dropout=0.0,
                    start_id=tok.token_id("<|im_start|>"), max_seq_len=512)
    torch.manual_seed(0)
    model = RNNSeq2Seq(cfg)
    model.init_weights(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(40):
        loss = mle_loss(model, [p.prompt for p in pairs], [p.target for p in pairs], tok.pad_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("rnn") / "ckpt"
    save_rnn(path, model, tok, {"template": "chatml", "arch": "rnn"})
    return path, model, pairs, float(loss.detach())


def test_checkpoint_round_trip_and_greedy_session(taught_rnn):
    from dialogen.chat.session import Session, load_engine
    from dialogen.decoding.settings import Sampling
    from dialogen.models.loading import load

    path, model, pairs, loss = taught_rnn
    assert loss < 0.05
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "dialogen-rnn"
    loaded = load(str(path))
    src = torch.tensor([pairs[0].prompt])
    with torch.no_grad():
        assert torch.equal(loaded.model(src), model(src))
    engine = load_engine(str(path))
    assert engine.template.name == "chatml"
    greedy = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=20)
    session = Session(engine, sampling=greedy)
    first = session.send("hi").run()
    assert (first.text, first.finish_reason) == ("nice to meet you", "stop")
    second = session.send("how old are you?").run()  # the whole conversation is re-encoded
    assert second.text == "I am ten years old"
    assert [m.role for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_shared_loss_and_perplexity_score_each_reply_given_its_context(taught_rnn, smol_tokenizer):
    """The trainer's loss and `dialogen eval`'s perplexity give the encoder-decoder each labelled
    turn as a reply to everything before it."""
    from dialogen.chat.templates import get_template
    from dialogen.eval.perplexity import assistant_perplexity
    from dialogen.training.replies import make_pairs, reply_logprobs

    _, model, _, _ = taught_rnn
    tpl = get_template("chatml", smol_tokenizer)
    conv = [Message("user", "hi"), Message("assistant", "nice to meet you"),
            Message("user", "how old are you?"), Message("assistant", "I am ten")]
    pairs = make_pairs([conv], smol_tokenizer, tpl, turns=10, both_speakers=False)
    with torch.no_grad():
        logp = reply_logprobs(model, [p.prompt for p in pairs], [p.target for p in pairs])
    count = sum(len(p.target) for p in pairs)
    got = assistant_perplexity(model, smol_tokenizer, tpl, [conv], max_len=512)
    assert got["tokens"] == count
    assert abs(got["nll"] - float(-logp.sum()) / count) < 1e-4


def test_trainer_loss_splits_rows_into_replies():
    """Each labelled run of a row is one reply to everything before it; many replies are scored
    in length groups and the sum is unchanged."""
    from dialogen.training.replies import SEQ2SEQ_GROUP, reply_logprobs, seq2seq_nll_sum

    m = _model(seed=2)
    rows, labels, pairs = [], [], []
    for r in range(2 * SEQ2SEQ_GROUP // 3 + 1):  # three replies per row: more than one group
        ids = _ids(1, 30, seed=100 + r)[0].tolist()
        lab = [-100] * 30
        for a, b in ((3, 5), (9, 17 - r % 5), (20, 29)):
            lab[a:b] = ids[a:b]
            pairs.append((ids[:a], ids[a:b]))
        rows.append(ids)
        labels.append(lab)
    with torch.no_grad():
        total, count = seq2seq_nll_sum(m, torch.tensor(rows), torch.tensor(labels))
        direct = reply_logprobs(m, [p for p, _ in pairs], [t for _, t in pairs])
    assert int(count) == sum(len(t) for _, t in pairs) and len(pairs) > SEQ2SEQ_GROUP
    assert abs(float(total) + float(direct.sum())) < 1e-3


def test_sampling_runs_unchanged_and_seed_reproduces(taught_rnn):
    from dialogen.decoding.generate import Generation
    from dialogen.decoding.settings import Sampling

    path, model, pairs, _ = taught_rnn
    prompt = pairs[1].prompt
    runs = []
    for seed in (1, 1, 2):
        s = Sampling(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=12, seed=seed)
        runs.append(Generation(model, _Decoder(), prompt, model.new_cache(1), s, set()).run().tokens)
    assert runs[0] == runs[1] and len(runs[0]) == 12
    assert runs[0] != runs[2]
    # greedy through Generation is the argmax chain of the teacher-forced forward
    gen = Generation(model, _Decoder(), prompt, model.new_cache(1),
                     Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=8), set()).run()
    with torch.no_grad():
        logits = model.teacher_forced(torch.tensor([prompt]), None, torch.tensor([gen.tokens]))
    assert logits[0].argmax(-1).tolist() == gen.tokens


class _Decoder:
    """Token ids as text: lets Generation run without caring about subword boundaries."""

    def decode(self, ids, skip_special=False):
        return " ".join(map(str, ids))


def test_beam_search_runs_on_the_rnn(taught_rnn, smol_tokenizer):
    from dialogen.decoding.beam import BeamSettings, beam_search
    from dialogen.training.replies import reply_logprobs

    path, model, pairs, _ = taught_rnn
    eot = smol_tokenizer.token_id("<|im_end|>")
    for p in pairs:
        found = beam_search(model, p.prompt, BeamSettings(beam_size=3, max_new_tokens=10), {eot})
        assert len(found) == 3
        best = found[0]
        assert smol_tokenizer.decode(best.tokens) == p.reply and best.stop_token == eot
        for cand in found:  # the search's likelihoods are the teacher-forced ones
            tokens = cand.tokens + ([cand.stop_token] if cand.stop_token is not None else [])
            with torch.no_grad():
                expected = float(reply_logprobs(model, [p.prompt], [tokens])[0])
            assert abs(cand.logprob - expected) < 1e-3


def test_candidates_from_the_rnn_reranked_by_a_discriminator(taught_rnn, smol_tokenizer, tmp_path):
    """Sample-and-rank and beam n-best on the RNN, reranked by a discriminator: the winner is the
    candidate the discriminator finds most human."""
    from dialogen.chat.session import load_engine
    from dialogen.decoding.settings import Decoding, Sampling
    from dialogen.decoding.strategy import Decoder
    from dialogen.models.discriminator import DiscConfig, Discriminator, save_discriminator

    path, _, pairs, _ = taught_rnn
    torch.manual_seed(0)
    disc = Discriminator(DiscConfig(vocab_size=smol_tokenizer.vocab_size, sep_id=smol_tokenizer.eos_id,
                                    emb_dim=8, hidden=8)).eval()
    save_discriminator(tmp_path / "d", disc, smol_tokenizer, {})
    engine = load_engine(str(path))
    context = pairs[1].context
    prompt = engine.template.render(engine.tokenizer, context, add_generation_prompt=True)[0]
    s = Sampling(temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=6, seed=3)
    for d in (Decoding(num_candidates=5, candidates="sample", discriminator=str(tmp_path / "d")),
              Decoding(beam_size=4, scorer="discriminator", discriminator=str(tmp_path / "d"))):
        cands, winner = Decoder(engine, d).candidates(prompt, context, s)
        assert len(cands) >= 2
        probs = disc.prob_human([disc.encode_pair(smol_tokenizer, context, c.text) for c in cands])
        assert [c.scores["p_human"] for c in cands] == pytest.approx(probs, abs=1e-6)
        assert winner == max(range(len(cands)), key=lambda i: probs[i])


def test_chat_cli_with_rnn_checkpoint(taught_rnn):
    path = taught_rnn[0]
    exe = os.path.join(os.path.dirname(sys.executable), "dialogen")
    run = subprocess.run([exe, "chat", "--model", str(path), "--temperature", "0", "--repetition-penalty", "1",
                          "--max-new-tokens", "20"],
                         input="hi\n", capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].strip() == "nice to meet you"


def test_bad_rnn_config_names_the_field(tmp_path, taught_rnn):
    from dialogen.models.loading import load

    path = taught_rnn[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    conf = json.loads((bad / "config.json").read_text())
    conf["attention"] = "cosine"
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match=r"config.json: rnn attention must be one of"):
        load(str(bad))
    conf["attention"], conf["hidden"] = "dot", "big"
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match=r"field 'hidden' must be int"):
        load(str(bad))
    conf["hidden"] = 8  # weights no longer fit the config
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="do not match config.json"):
        load(str(bad))


# --- dialogen train --arch rnn ----------------------------------------------------------------------
QA = [("hi", "hello there"), ("how are you?", "i am fine thanks"), ("what is your name?", "my name is bob"),
      ("bye", "see you later")]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("toy") / "qa.jsonl"
    with open(path, "w") as f:
        for _ in range(60):
            msgs = []
            for _ in range(3):
                q, a = QA[rng.randrange(4)]
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def test_train_arch_rnn_learns_and_chats(tmp_path, toy_data, capsys):
    from dialogen.chat.session import Session, load_engine
    from dialogen.cli import main
    from dialogen.decoding.settings import Sampling

    out = tmp_path / "run"
    code = main(["train", "--arch", "rnn", "--init", "scratch", "--data", str(toy_data), "--out", str(out),
                 "--vocab-size", "400", "--rnn-emb-dim", "32", "--rnn-hidden", "32", "--rnn-cell", "lstm",
                 "--rnn-attention", "bahdanau", "--context-turns", "2", "--max-steps", "60", "--lr", "1e-2",
                 "--batch-size", "8", "--eval-every", "30", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    conf = json.loads((out / "best" / "config.json").read_text())
    assert (conf["model_type"], conf["cell"], conf["attention"], conf["context_turns"]) == \
        ("dialogen-rnn", "lstm", "additive", 2)
    engine = load_engine(str(out / "best"))
    session = Session(engine, sampling=Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=12))
    for q, a in QA[::-1]:
        assert session.send(q).run().text == a


def test_train_arch_rnn_refuses_a_pretrained_transformer_init(tmp_path, toy_data, tiny_llama, capsys):
    from dialogen.cli import main

    base = ["train", "--arch", "rnn", "--data", str(toy_data), "--no-progress"]
    for init, says in (("default", "--init default (the pretrained SmolLM2 transformer)"),
                       (str(tiny_llama[0]), "a pretrained llama transformer")):
        assert main(base + ["--init", init, "--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dialogen: error: --arch rnn cannot start from --init") and says in err
        assert err.count("\n") == 1
    assert main(base + ["--init", "scratch", "--freeze-layers", "1", "--out", str(tmp_path / "b")]) == 2
    assert "--freeze-layers" in capsys.readouterr().err


def test_train_arch_rnn_is_reproducible_and_resumes_exactly(tmp_path, toy_data):
    """Dropout draws are seeded: a run stopped mid-way and resumed ends on the same weights as a
    run straight through."""
    from safetensors.torch import load_file

    from dialogen.training.options import TrainOptions
    from dialogen.training.sft import train

    def opts(out, resume=False):
        return TrainOptions(out=str(out), arch="rnn", init="scratch", data=str(toy_data), vocab_size=400,
                            rnn_emb_dim=16, rnn_hidden=16, rnn_dropout=0.3, lr=1e-2, batch_size=8, max_steps=24,
                            eval_every=0, save_every=5, progress=False, resume=resume)

    class Stop(Exception):
        pass

    def crash(step, record, model):
        if step == 13:
            raise Stop

    with pytest.raises(Stop):
        train(opts(tmp_path / "a"), on_step=crash)
    assert json.loads((tmp_path / "a" / "last" / "trainer_state.json").read_text())["step"] == 10
    train(opts(tmp_path / "a", resume=True))
    train(opts(tmp_path / "b"))
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
