"""The discriminator: P(human) for (context, reply), training, checkpoints, tokenizer checks."""

import json
import random

import pytest
import torch

from dialogen.chat.messages import Message
from dialogen.errors import UserError
from dialogen.models.discriminator import (DiscConfig, Discriminator, accuracy, check_tokenizer, d_loss,
                                           load_discriminator, save_discriminator)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _toy(n, seed, human: bool):
    """Contexts of random tokens; human replies use tokens 10..29, machine replies 30..49."""
    rng = random.Random(seed)
    lo = 10 if human else 30
    out = []
    for _ in range(n):
        ctx = [rng.randrange(2, 50) for _ in range(rng.randrange(2, 9))] + [1]
        rep = [rng.randrange(lo, lo + 20) for _ in range(rng.randrange(1, 6))]
        out.append((ctx, rep))
    return out


def _disc(seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(vocab_size=50, sep_id=1, emb_dim=16, hidden=16, dropout=0.0)
    opts.update(kw)
    return Discriminator(DiscConfig(**opts))


def test_learns_to_separate_a_trivially_separable_set():
    disc = _disc()
    human, machine = _toy(64, 0, True), _toy(64, 1, False)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    held_h, held_m = _toy(40, 2, True), _toy(40, 3, False)
    before = accuracy(disc, held_h, held_m)
    for step in range(60):
        i = (step * 16) % 64
        loss, _ = d_loss(disc, human[i:i + 16], machine[i:i + 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert accuracy(disc, held_h, held_m) == 1.0 and before < 0.9
    ph, pm = disc.prob_human(held_h), disc.prob_human(held_m)
    assert sum(ph) / len(ph) > 0.9 and sum(pm) / len(pm) < 0.1


def test_padding_does_not_change_a_judgement():
    disc = _disc(cell="lstm", n_layer=2).eval()
    pairs = _toy(5, 4, True) + _toy(5, 5, False)
    alone = [disc.prob_human([p])[0] for p in pairs]
    together = disc.prob_human(pairs)
    assert max(abs(a - b) for a, b in zip(alone, together)) < 1e-6


def test_encode_pair_reads_turn_texts(smol_tokenizer):
    eos = smol_tokenizer.eos_id
    disc = _disc(vocab_size=smol_tokenizer.vocab_size, sep_id=eos, max_context=6)
    ctx = [Message("system", "be nice"), Message("user", "hello there"), Message("assistant", "hi <|im_end|>")]
    c, r = disc.encode_pair(smol_tokenizer, ctx, "fine thanks")
    full = smol_tokenizer.encode_text("hello there") + [eos] + smol_tokenizer.encode_text("hi <|im_end|>") + [eos]
    assert c == full[-6:]  # newest tokens; typed special-token text stays text
    assert r == smol_tokenizer.encode_text("fine thanks")
    assert disc.encode_pair(smol_tokenizer, ctx, "")[1] == [eos]


def test_checkpoint_round_trip_and_tokenizer_checks(tmp_path, smol_tokenizer, tiny_gpt2):
    from dialogen.models.tokenizer import Tokenizer

    disc = _disc(vocab_size=smol_tokenizer.vocab_size, sep_id=smol_tokenizer.eos_id).eval()
    pairs = [disc.encode_pair(smol_tokenizer, [Message("user", "hi")], "hello")]
    path = save_discriminator(tmp_path / "d", disc, smol_tokenizer, {"steps": 0})
    loaded, tok, meta = load_discriminator(path)
    assert loaded.prob_human(pairs) == disc.prob_human(pairs) and meta == {"steps": 0}
    check_tokenizer(tok, smol_tokenizer)  # same vocabulary: fine
    other = Tokenizer.from_dir(tiny_gpt2[0])
    other._tmpl.add_tokens(["<extra>"])
    with pytest.raises(UserError, match=r"^--discriminator: its tokenizer .* does not match the --generator"):
        check_tokenizer(tok, other)
    with pytest.raises(UserError, match=r"^--discriminator .*: model_type 'gpt2' is not a discriminator"):
        load_discriminator(tiny_gpt2[0])
    with pytest.raises(UserError, match=r"^--evaluator .*no config.json"):
        load_discriminator(tmp_path / "nothing", flag="--evaluator")
    conf = json.loads((path / "config.json").read_text())
    conf["hidden"] = 7
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="weights do not match"):
        load_discriminator(path)
