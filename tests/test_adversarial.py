"""Adversarial training: the REINFORCE update, the loop on a toy problem, logs, plot and commands."""

import json

import pytest
import torch
from tokenizers import AddedToken, Tokenizer as HFTokenizer, models, pre_tokenizers

from dialogen.chat.messages import Message
from dialogen.chat.templates import get_template
from dialogen.cli import main
from dialogen.errors import UserError
from dialogen.models.discriminator import DiscConfig, Discriminator, save_discriminator
from dialogen.models.rnn import RNNConfig, RNNSeq2Seq, save_rnn
from dialogen.models.tokenizer import Tokenizer
from dialogen.models.transformer import Config, Transformer
from dialogen.training.adversarial import Adversarial, AdversarialSettings, plot_log, reinforce_loss, train_adversarial
from dialogen.training.replies import make_pairs, reply_logprobs

WORDS = ["<pad>", "<unk>", "<eos>", "hi", "good", "great", "fine", "bad", "awful", "meh", "car", "tree",
         "blue", "run", "yes", "no"]
HUMAN = ["good", "great", "fine"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def words():
    """A real word-level tokenizer over a 16-word vocabulary: toy problems stay tiny."""
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in WORDS[:3]])
    return Tokenizer(hf, eos_token="<eos>", pad_token="<pad>")


def _rnn(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    m = RNNSeq2Seq(RNNConfig(vocab_size=len(WORDS), emb_dim=8, hidden=8, dropout=dropout, start_id=2))
    m.init_weights(seed)
    return m


def _gpt(seed=0):
    m = Transformer(Config(arch="gpt2", vocab_size=len(WORDS), n_layer=1, n_head=2, n_kv_head=2, d_model=16,
                           d_ff=32, max_seq_len=32))
    m.init_weights(seed)
    return m


def _disc(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return Discriminator(DiscConfig(vocab_size=len(WORDS), sep_id=2, emb_dim=8, hidden=8, dropout=dropout))


@pytest.mark.parametrize("family", [_rnn, _gpt])
def test_reinforce_gradient_moves_probability_toward_the_rewarded_reply(family):
    model = family()
    prompt, good, bad = [3, 2], [4, 2], [7, 2]  # "hi" -> "good" (reward 1) or "bad" (reward 0)
    logp = reply_logprobs(model, [prompt, prompt], [good, bad])
    before = logp.detach().clone()
    reinforce_loss(logp, torch.tensor([1.0, 0.0]), baseline=0.5).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
        after = reply_logprobs(model, [prompt, prompt], [good, bad])
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3
    # a reward equal to the baseline teaches nothing
    model.zero_grad()
    reinforce_loss(reply_logprobs(model, [prompt, prompt], [good, bad]), torch.tensor([0.7, 0.7]), 0.7).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


@pytest.mark.parametrize("family", [_rnn, _gpt])
def test_reply_logprobs_and_batched_sampling_handle_padding(family):
    from dialogen.training.replies import sample_replies

    model = family(3).eval()
    prompts = [[3, 2], [5, 9, 11, 2], [3, 4, 2, 7, 2]]
    targets = [[4, 2], [8, 9, 10, 2], [6]]
    with torch.no_grad():
        got = reply_logprobs(model, prompts, targets)
        for i, (p, t) in enumerate(zip(prompts, targets)):
            if hasattr(model, "teacher_forced"):
                logits = model.teacher_forced(torch.tensor([p]), None, torch.tensor([t]))[0]
            else:
                logits = model(torch.tensor([p + t]))[0, len(p) - 1:-1]
            want = logits.log_softmax(-1)[torch.arange(len(t)), torch.tensor(t)].sum()
            assert abs(float(got[i]) - float(want)) < 1e-4
    g = torch.Generator().manual_seed(0)
    together = sample_replies(model, prompts, {2}, 6, g, temperature=1e-6)  # left-padded batch, ~greedy
    alone = [sample_replies(model, [p], {2}, 6, g, temperature=1e-6)[0] for p in prompts]
    assert together == alone
    assert all(r[-1] == 2 or len(r) == 6 for r in together) and all(2 not in r[:-1] for r in together)


def _first_word_mass(model, words, names):
    """P(the reply's first token is one of `names` | "hi")."""
    with torch.no_grad():
        probs = model(torch.tensor([[3, 2]]), model.new_cache(1))[0, -1].softmax(-1)
    return float(sum(probs[words.token_id(n)] for n in names))


def _toy_pairs(words, n=24):
    convs = [[Message("user", "hi"), Message("assistant", HUMAN[i % 3])] for i in range(n)]
    return make_pairs(convs, words, get_template("dialogpt", words), both_speakers=False)


def test_adversarial_rounds_teach_the_generator_what_the_discriminator_calls_human(words):
    """The g-steps of the loop on a toy problem: D learns that humans answer "hi" with
    good/great/fine; REINFORCE against it (D held fixed, no MLE steps) moves G's replies there."""
    g, d = _rnn(), _disc()
    pairs = _toy_pairs(words)
    s = AdversarialSettings(batch_size=16, d_lr=1e-2, g_lr=3e-2, max_new_tokens=3, d_steps=0, mle_steps=0, seed=0)
    state = Adversarial(g, d, words, {2}, s)
    for _ in range(40):  # pretrain D on G's samples
        _, acc = state.d_step(state.batch(pairs))
    assert acc > 0.9
    before = _first_word_mass(g, words, HUMAN)
    rewards = [state.round(pairs)["mean_reward"] for _ in range(30)]
    after = _first_word_mass(g, words, HUMAN)
    assert before < 0.3 and after > 0.8
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3


def test_g_step_and_logged_accuracy_take_no_dropout_draws(words):
    """With dropout in G and D, the REINFORCE gradient is that of the policy that sampled (eval
    mode) and D's logged accuracy is D as it judges: neither depends on the global random stream."""
    pairs = _toy_pairs(words, 12)
    s = AdversarialSettings(batch_size=8, max_new_tokens=3, seed=0)
    results = []
    for noise in (1, 2):
        g, d = _rnn(dropout=0.5), _disc(dropout=0.5)
        state = Adversarial(g, d, words, {2}, s)
        torch.manual_seed(noise)  # what dropout would draw from
        state.g_step(state.batch(pairs))
        _, acc = state.d_step(state.batch(pairs))  # D's own update does use dropout
        results.append((acc, [p.detach().clone() for p in g.parameters()]))
    (acc1, g1), (acc2, g2) = results
    assert acc1 == acc2 and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_human_replies_are_cut_like_samples(words):
    """D never sees a human reply longer than the sampled ones: both stop at the sampling limit."""
    from dialogen.training.adversarial import human_pairs

    convs = [[Message("user", "hi"), Message("assistant", "good great fine blue tree car")]]
    pair = make_pairs(convs, words, get_template("dialogpt", words), both_speakers=False, max_reply=3)[0]
    d = Discriminator(DiscConfig(vocab_size=len(WORDS), sep_id=2, emb_dim=8, hidden=8, max_reply=64))
    (_, reply), = human_pairs(d, words, [pair], {2})
    assert words.decode(reply) == "good great fine"


def test_log_rows_and_plot(tmp_path, words):
    g, d = _gpt(), _disc()
    pairs = _toy_pairs(words, 12)
    s = AdversarialSettings(rounds=2, batch_size=4, max_new_tokens=3, seed=1)
    rows = train_adversarial(g, d, words, {2}, pairs[:8], pairs[8:], s, tmp_path / "log.jsonl")
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == rows and [r["round"] for r in rows] == [0, 1, 2]
    for key in ("d_accuracy", "mean_reward", "baseline", "valid_ppl", "mle_loss", "g_loss", "d_loss"):
        assert all(isinstance(r[key], float) for r in rows[1:]), key
    assert 0 <= rows[1]["d_accuracy"] <= 1 and rows[0]["valid_ppl"] > 1
    png = plot_log(rows, tmp_path / "log.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the commands ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, words):
    """A toy JSONL dataset and a generator checkpoint over the word vocabulary."""
    root = tmp_path_factory.mktemp("adv")
    lines = [json.dumps({"messages": [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": HUMAN[i % 3] + " yes"}]}) for i in range(40)]
    (root / "toy.jsonl").write_text("\n".join(lines) + "\n")
    save_rnn(root / "g", _rnn(), words, {"template": "dialogpt"})
    return root


@pytest.fixture(scope="module")
def toy_d(toy_run):
    """A discriminator trained by the command on the toy data against the toy generator."""
    r = toy_run
    code = main(["train-discriminator", "--generator", str(r / "g"), "--out", str(r / "d"), "--steps", "30",
                 "--lr", "1e-2", "--emb-dim", "8", "--hidden", "8", "--data", str(r / "toy.jsonl"),
                 "--batch-size", "8", "--max-new-tokens", "3", "--max-conversations", "0"])
    assert code == 0
    return r / "d"


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_discriminator_then_adversarial_commands(toy_run, toy_d, capsys):
    from dialogen.models.discriminator import load_discriminator
    from dialogen.models.loading import load

    r = toy_run
    common = ["--data", str(r / "toy.jsonl"), "--batch-size", "8", "--max-new-tokens", "3", "--max-conversations", "0"]
    disc, _, meta = load_discriminator(toy_d)
    assert meta["generator"] == str(r / "g") and meta["valid_accuracy"] > 0.5
    code, out, err = _run(["train-discriminator", "--generator", str(r / "g"), "--generator", str(r / "g"),
                           "--out", str(r / "d2"), "--steps", "2", "--emb-dim", "4", "--hidden", "4", *common], capsys)
    assert code == 0, err
    assert len(json.loads(out)["valid_accuracy_per_generator"]) == 2
    code, out, err = _run(["train-adversarial", "--generator", str(r / "g"), "--discriminator", str(toy_d),
                           "--out", str(r / "g2"), "--rounds", "3", *common], capsys)
    assert code == 0, err
    result = json.loads(out)
    rows = [json.loads(x) for x in open(result["log"])]
    assert len(rows) == 4 and rows[-1]["round"] == 3
    assert open(result["plot"], "rb").read(4) == b"\x89PNG"
    before, after = load(str(r / "g")).model, load(str(r / "g2")).model
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    assert load_discriminator(result["discriminator_out"])[0] is not None
    assert "round 3/3" in err


def test_eval_reports_adversarial_success(toy_run, toy_d, tmp_path, capsys):
    from dialogen.chat.messages import parse_messages
    from dialogen.eval.adversarial import Evaluator

    r = toy_run
    argv = ["eval", "--model", str(r / "g"), "--dataset", str(r / "toy.jsonl"), "--split", "train", "--examples",
            "6", "--compare", "greedy,top-p", "--max-new-tokens", "3", "--seed", "0", "--evaluator", str(toy_d)]
    code, out, err = _run(argv + ["--output", str(tmp_path / "res.json")], capsys)
    assert code == 0, err
    assert "AdvSuc" in out.splitlines()[0]
    res = json.loads((tmp_path / "res.json").read_text())
    ev = Evaluator(str(toy_d))
    contexts = [parse_messages(ex["context"]) for ex in res["data"]]
    for entry in res["configs"]:
        assert entry["metrics"]["adv_success"] == ev.success(contexts, entry["replies"])
    human = [ex["reference"] for ex in res["data"]]
    assert res["human"]["adv_success"] == ev.success(contexts, human) > 0.5
    code, _, err = _run(argv[:-1] + [str(tmp_path / "none")], capsys)
    assert code == 2 and err.startswith("dialogen: error: --evaluator ") and err.count("\n") == 1


def test_command_errors_name_the_flag(toy_run, capsys, words):
    r = toy_run
    data = ["--data", str(r / "toy.jsonl")]
    code, _, err = _run(["train-adversarial", "--discriminator", str(r / "d"), "--out", str(r / "x"), *data], capsys)
    assert code == 2 and err.startswith("dialogen: error: --generator is required") and err.count("\n") == 1
    code, _, err = _run(["train-adversarial", "--generator", str(r / "g"), "--out", str(r / "x"), *data], capsys)
    assert code == 2 and "--discriminator is required" in err
    code, _, err = _run(["train-discriminator", "--generator", str(r / "nowhere"), "--out", str(r / "x"), *data], capsys)
    assert code == 2 and err.startswith("dialogen: error: --generator: ") and "no such model" in err
    other = Tokenizer.from_dir(r / "g")
    other._tmpl.add_tokens(["zebra"])
    save_discriminator(r / "d_other", _disc(), other, {})
    code, _, err = _run(["train-adversarial", "--generator", str(r / "g"), "--discriminator", str(r / "d_other"),
                         "--out", str(r / "x"), *data], capsys)
    assert code == 2 and err.startswith("dialogen: error: --discriminator: its tokenizer") and err.count("\n") == 1
    save_rnn(r / "g_other", _rnn(), other, {"template": "dialogpt"})
    code, _, err = _run(["train-discriminator", "--generator", str(r / "g"), "--generator", str(r / "g_other"),
                         "--out", str(r / "x"), *data], capsys)
    assert code == 2 and err.startswith(f"dialogen: error: --generator {r / 'g_other'}: its tokenizer")
    code, _, err = _run(["train-adversarial", "--generator", str(r / "d_other"), "--discriminator", str(r / "d_other"),
                         "--out", str(r / "x"), *data], capsys)
    assert code == 2 and err.startswith("dialogen: error: --generator: ") and "dialogen-discriminator" in err
    code, _, err = _run(["train-adversarial", "--generator", str(r / "g"), "--discriminator", str(r / "d_other"),
                         "--out", str(r / "x"), "--temperature", "0", *data], capsys)
    assert code == 2 and "--temperature must be > 0" in err
    assert not (r / "x").exists()


@pytest.mark.parametrize("flags, named", [
    (["--turns", "0"], "--turns must be >= 1"), (["--valid-pairs", "-1"], "--valid-pairs must be >= 0"),
    (["--max-conversations", "-5"], "--max-conversations must be >= 0"), (["--lr", "0.0"], "--lr must be > 0"),
])
def test_train_discriminator_bad_numbers_name_their_flag(toy_run, capsys, flags, named):
    r = toy_run
    code, _, err = _run(["train-discriminator", "--generator", str(r / "g"), "--out", str(r / "y"),
                         "--data", str(r / "toy.jsonl"), *flags], capsys)
    assert code == 2 and err == f"dialogen: error: {named}, got {flags[1]}\n"
    assert not (r / "y").exists()


def test_eval_refuses_the_generators_own_adversary_as_evaluator(toy_run, toy_d, tmp_path, capsys):
    """The discriminator a generator was trained against (the one its run started from, or the one
    the run wrote) cannot judge it fairly; one trained apart can."""
    r = toy_run
    common = ["--data", str(r / "toy.jsonl"), "--batch-size", "8", "--max-new-tokens", "3", "--max-conversations", "0"]
    code, out, err = _run(["train-adversarial", "--generator", str(r / "g"), "--discriminator", str(toy_d),
                           "--out", str(tmp_path / "g3"), "--rounds", "1", *common], capsys)
    assert code == 0, err
    written = json.loads(out)["discriminator_out"]
    argv = ["eval", "--model", str(tmp_path / "g3"), "--dataset", str(r / "toy.jsonl"), "--examples", "2",
            "--max-new-tokens", "3", "--compare", "greedy", "--evaluator"]
    for own in (written, str(toy_d)):
        code, _, err = _run(argv + [own], capsys)
        assert code == 2 and "trained apart" in err and err.count("\n") == 1, err
    apart = tmp_path / "apart"
    save_discriminator(apart, _disc(), Tokenizer.from_dir(r / "g"), {})
    code, out, err = _run(argv + [str(apart)], capsys)
    assert code == 0 and "AdvSuc" in out, err


def test_a_short_context_generator_gets_prompts_that_leave_room_for_the_reply(words, tmp_path):
    """A gpt2-family generator with 32 positions (beside one with 128): prompts keep their newest
    tokens so that the sampled reply still fits, instead of failing past the last position."""
    import argparse

    from dialogen.training.adversarial_cli import load_pairs

    long = " ".join(["hi"] * 60)
    lines = [json.dumps({"messages": [{"role": "user", "content": long},
                                      {"role": "assistant", "content": "good"}]}) for _ in range(6)]
    (tmp_path / "long.jsonl").write_text("\n".join(lines) + "\n")
    args = argparse.Namespace(data=str(tmp_path / "long.jsonl"), format=None, turns=3, max_conversations=0,
                              valid_pairs=10, max_new_tokens=5, seed=0, split_seed=0, skip_bad=False)
    g = _gpt()
    roomy = Transformer(Config(arch="gpt2", vocab_size=len(WORDS), n_layer=1, n_head=2, n_kv_head=2, d_model=16,
                               d_ff=32, max_seq_len=128))
    train, _ = load_pairs(args, [roomy, g], words, get_template("dialogpt", words))  # the shortest one counts
    assert train and max(len(p.prompt) for p in train) == 32 - 5
    state = Adversarial(g, _disc(), words, {2}, AdversarialSettings(batch_size=4, max_new_tokens=5, seed=0))
    assert len(state.sample(train[:4])) == 4
    args.max_new_tokens = 30
    with pytest.raises(UserError, match="--max-new-tokens 30 leaves no room"):
        load_pairs(args, [g], words, get_template("dialogpt", words))
