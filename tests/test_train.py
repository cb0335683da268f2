"""The trainer on tiny models: exact resume, divergence, freezing, scratch and reverse runs,
and every bad-input case of `dialogen train` / `dialogen inspect-data` (one line, exit 2)."""

import json
import random

import pytest
import torch

from dialogen.cli import main
from dialogen.models.loading import load
from dialogen.training.options import TrainOptions
from dialogen.training.loss import LossModel
from dialogen.training.sft import train

WORDS = "the cat sat on a mat and dog ran fast to home in sun rain".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    r = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    with open(path, "w") as f:
        for _ in range(60):
            msgs = []
            for _ in range(r.randint(1, 4)):
                for role in ("user", "assistant"):
                    msgs.append({"role": role, "content": " ".join(r.choice(WORDS) for _ in range(r.randint(3, 9)))})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


SCRATCH = dict(init="scratch", n_layer=2, n_head=2, d_model=32, vocab_size=300, max_len=64, batch_size=4,
               lr=3e-3, warmup_steps=2, progress=False)


def records(run, key="loss"):
    return [r for r in map(json.loads, open(run / "metrics.jsonl")) if key in r]


class Killed(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_losses(data, tmp_path):
    opts = dict(SCRATCH, data=data, max_steps=7, save_every=3, eval_every=3)
    train(TrainOptions(out=str(tmp_path / "a"), **opts))

    def crash(step, record, model):
        if step == 5:  # dies after step 5; the last checkpoint is from step 3
            raise Killed

    with pytest.raises(Killed):
        train(TrainOptions(out=str(tmp_path / "b"), **opts), on_step=crash)
    assert json.loads((tmp_path / "b/last/trainer_state.json").read_text())["step"] == 3
    summary = train(TrainOptions(out=str(tmp_path / "b"), resume=True, **opts))
    assert summary["steps"] == 7
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 8))  # steps 4-5 of the crashed run were replaced
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-6
    assert a[-1]["loss"] < a[0]["loss"]
    wa, wb = load(str(tmp_path / "a/last")).model, load(str(tmp_path / "b/last")).model
    for (name, pa), pb in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    # best/ and the plot exist; validation ran at steps 0, 3, 6 and 7
    val = records(tmp_path / "a", "val_ppl")
    assert [r["step"] for r in val] == [0, 3, 6, 7] and val[-1]["val_ppl"] < val[0]["val_ppl"]
    assert (tmp_path / "a/best/model.safetensors").exists() and (tmp_path / "a/metrics.png").stat().st_size > 1000


def test_scratch_model_is_a_loadable_gpt2_with_its_own_bpe(data, tmp_path):
    train(TrainOptions(out=str(tmp_path / "s"), data=data, max_steps=2, eval_every=0, template="chatml", **{
        k: v for k, v in SCRATCH.items()}))
    loaded = load(str(tmp_path / "s/last"))
    assert loaded.model.cfg.arch == "gpt2" and loaded.meta["template"] == "chatml"
    tok = loaded.tokenizer
    assert tok.vocab_size <= 300 and len(tok.encode_template("<|im_start|>")) == 1
    assert tok.decode(tok.encode_text("the cat sat")) == "the cat sat"
    from transformers import AutoModelForCausalLM  # our checkpoint is a Hugging Face directory

    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s/last"))
    ids = torch.tensor([tok.encode_text("the dog ran home")])
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, loaded.model(ids), atol=1e-4)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["train", "--data", data, "--out", str(out), "--init", "scratch", "--n-layer", "1", "--n-head", "2",
                 "--d-model", "32", "--vocab-size", "300", "--max-len", "64", "--lr", "1e20", "--warmup-steps", "1",
                 "--max-steps", "5", "--save-every", "1", "--eval-every", "0", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "step 2: loss is nan" in err and "last good checkpoint" in err
    assert json.loads((out / "last/trainer_state.json").read_text())["step"] == 1
    assert all(torch.isfinite(p).all() for p in load(str(out / "last")).model.parameters())


def test_finetune_with_frozen_embeddings_and_layers(tiny_llama, data, tmp_path):
    path, _ = tiny_llama
    before = load(str(path)).model.state_dict()
    train(TrainOptions(out=str(tmp_path / "f"), init=str(path), data=data, template="chatml", max_len=64,
                       batch_size=2, max_steps=2, lr=1e-2, warmup_steps=1, eval_every=0, progress=False,
                       freeze_embeddings=True, freeze_layers=1))
    after = load(str(tmp_path / "f/last")).model.state_dict()
    assert torch.equal(before["embed.weight"], after["embed.weight"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.0."))
    assert not torch.equal(before["blocks.1.attn.qkv.weight"], after["blocks.1.attn.qkv.weight"])


def test_checkpointing_recomputes_only_blocks_that_train(tiny_llama):
    """--gradient-checkpointing with frozen embeddings and a frozen first block: the same gradients as
    without, each training block run twice (forward, then again in backward) and the frozen block once."""
    path, _ = tiny_llama
    model = load(str(path)).model.materialize().train()
    model.embed.requires_grad_(False)
    model.blocks[0].requires_grad_(False)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    runs = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: runs.__setitem__(i, runs[i] + 1))
    grads = []
    for checkpointing in (False, True):
        model.checkpointing, runs[:] = checkpointing, [0] * len(runs)
        nll, _ = LossModel(model)(ids, ids)
        nll.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert runs == [1] + [2] * (len(runs) - 1)
    assert grads[0].keys() == grads[1].keys() and not any(n.startswith(("embed.", "blocks.0.")) for n in grads[0])
    assert all(torch.allclose(grads[1][n], g, rtol=1e-5, atol=1e-7) for n, g in grads[0].items())


def test_reverse_run_records_its_format(data, tmp_path):
    summary = train(TrainOptions(out=str(tmp_path / "r"), data=data, reverse=True, max_steps=1, eval_every=1,
                                 **SCRATCH))
    meta = json.loads((tmp_path / "r/last/dialogen.json").read_text())
    assert meta["reverse"] == {"context_turns": 3} and summary["steps"] == 1


def test_time_budget_stops_after_a_step_and_saves(data, tmp_path):
    summary = train(TrainOptions(out=str(tmp_path / "t"), data=data, max_steps=50, max_minutes=1e-6, eval_every=0,
                                 pack=True, **SCRATCH))
    assert summary["stopped_by"] == "time budget" and summary["steps"] == 1
    assert json.loads((tmp_path / "t/last/trainer_state.json").read_text())["step"] == 1


# --- bad input: one line, exit 2, nothing written ------------------------------------------
def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("content,expect", [
    ('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [\n', ":2: not valid JSON"),
    ('{"turns": [{"role": "user", "content": "a"}]}\n', ":1: expected an object with a 'messages' list"),
])
def test_bad_jsonl_in_train_and_inspect(tmp_path, capsys, content, expect):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    for argv in (["train", "--data", str(f), "--out", str(tmp_path / "o"), "--init", "scratch"],
                 ["inspect-data", "--data", str(f)]):
        code, err = run_cli(capsys, *argv)
        assert code == 2 and len(err.splitlines()) == 1 and f"{f}{expect}" in err
    assert not (tmp_path / "o/last").exists()


def test_missing_file_and_unknown_format(tmp_path, capsys):
    out = str(tmp_path / "o")
    code, err = run_cli(capsys, "train", "--data", str(tmp_path / "none.jsonl"), "--out", out)
    assert code == 2 and "none.jsonl: no such data file" in err and len(err.splitlines()) == 1
    (tmp_path / "d.xml").write_text("<x/>")
    code, err = run_cli(capsys, "train", "--data", str(tmp_path / "d.xml"), "--out", out)
    assert code == 2 and "unknown format for extension '.xml'" in err
    code, err = run_cli(capsys, "inspect-data", "--data", str(tmp_path / "d.xml"), "--format", "yaml")
    assert code == 2 and "unknown format 'yaml'" in err


def test_skip_bad_trains_and_reports(data, tmp_path, capsys):
    f = tmp_path / "mixed.jsonl"
    f.write_text(open(data).read() + "not json\n" + '{"no": "messages"}\n')
    code, err = run_cli(capsys, "train", "--data", str(f), "--out", str(tmp_path / "o"), "--skip-bad", "--init",
                        "scratch", "--n-layer", "1", "--d-model", "32", "--vocab-size", "300", "--max-len", "64",
                        "--max-steps", "1", "--eval-every", "0", "--no-progress")
    assert code == 0 and "skipped 2 bad line(s)" in err and f"{f}:61: not valid JSON" in err
    assert (tmp_path / "o/last/model.safetensors").exists()


def test_no_trainable_tokens_fails_before_training(tmp_path, capsys):
    f = tmp_path / "users.jsonl"
    f.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"}]}) + "\n"
                         for i in range(20)))
    code, err = run_cli(capsys, "train", "--data", str(f), "--out", str(tmp_path / "o"), "--init", "scratch",
                        "--vocab-size", "300")
    assert code == 2 and "no trainable tokens" in err and "--train-on both" in err
    assert not (tmp_path / "o/last").exists() and not (tmp_path / "o/metrics.jsonl").exists()


def test_unwritable_output_dir_fails_before_training(data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = run_cli(capsys, "train", "--data", data, "--out", str(blocker / "run"), "--init", "scratch")
    assert code == 2 and "output directory is not writable" in err and len(err.splitlines()) == 1


def test_bad_flags_and_resume_mismatch(data, tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--data", data, "--out", str(tmp_path / "o"), "--batch-size", "0")
    assert code == 2 and "--batch-size must be >= 1" in err
    code, err = run_cli(capsys, "train", "--data", data, "--out", str(tmp_path / "o"), "--resume")
    assert code == 2 and "nothing to resume" in err
    base = ["train", "--data", data, "--out", str(tmp_path / "run"), "--init", "scratch", "--n-layer", "1",
            "--d-model", "32", "--vocab-size", "300", "--max-len", "64", "--max-steps", "1", "--eval-every", "0",
            "--no-progress"]
    assert run_cli(capsys, *base)[0] == 0
    code, err = run_cli(capsys, *base)
    assert code == 2 and "already holds a run" in err
    code, err = run_cli(capsys, *base, "--resume", "--batch-size", "3")
    assert code == 2 and "cannot resume: batch_size was 8, now 3" in err


def _stops_at_end_of_turn(path, eot: int):
    """transformers' generate, with the checkpoint's generation_config, stops when the end-of-turn
    token comes (forced at the third new token here; without the config it would run on)."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    class ForceAtThird(LogitsProcessor):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - self.start == 2:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, eot] = 0
            return scores

    model = AutoModelForCausalLM.from_pretrained(str(path))
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, logits_processor=LogitsProcessorList([ForceAtThird(3)]))
    return out[0, 3:].tolist()


@pytest.mark.parametrize("kind", ["scratch", "finetune"])
def test_checkpoints_behave_the_same_in_transformers(kind, data, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from dialogen.chat.messages import Message
    from dialogen.chat.templates import get_template

    opts = (dict(SCRATCH, template="chatml") if kind == "scratch" else
            dict(init=str(tiny_llama[0]), template="chatml", max_len=64, batch_size=2, lr=1e-3, warmup_steps=1,
                 progress=False))
    train(TrainOptions(out=str(tmp_path / "m"), data=data, max_steps=1, eval_every=0, **opts))
    path = tmp_path / "m/last"
    loaded = load(str(path))
    tok, vocab = loaded.tokenizer, loaded.model.cfg.vocab_size
    eot = tok.token_id("<|im_end|>")
    config = json.loads((path / "config.json").read_text())
    gen = json.loads((path / "generation_config.json").read_text())
    assert all(0 <= config[k] < vocab for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    assert eot in gen["eos_token_id"]
    if kind == "scratch":  # the vocabulary's eos (<|endoftext|>) is not where a ChatML turn ends
        assert tok.eos_id != eot
    new = _stops_at_end_of_turn(path, eot)
    assert new[-1] == eot and len(new) == 3
    ref = AutoTokenizer.from_pretrained(str(path))
    conv = [Message("user", "the cat sat"), Message("assistant", "on a mat"), Message("user", "and the dog?")]
    want = ref.apply_chat_template([m.to_dict() for m in conv], tokenize=True, add_generation_prompt=True,
                                   return_dict=False)
    assert list(want) == get_template("chatml", tok).render(tok, conv, add_generation_prompt=True)[0]


def test_every_builtin_template_is_saved_with_the_checkpoint(data, tmp_path):
    from dialogen.chat.templates import TEMPLATES
    from dialogen.models.tokenizer import Tokenizer

    for name in ("dialogpt", "llama2"):
        train(TrainOptions(out=str(tmp_path / name), data=data, max_steps=1, eval_every=0, **dict(SCRATCH, template=name)))
        saved = Tokenizer.from_dir(tmp_path / name / "last")
        assert saved.chat_template == TEMPLATES[name][0]


def test_swiglu_in_training_keeps_torchs_values_and_gradient():
    """The gated MLP's activation saves its input alone for the backward pass: the same output as
    silu(gate) * up bit for bit, the gradient torch's ops give (and the exact one, in float64)."""
    import torch.nn.functional as F

    from dialogen.models.layers import SwiGLU, activate

    x64 = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (x64,))
    x = torch.randn(2, 9, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(1))
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    (want_grad,) = torch.autograd.grad(want, x, g)
    got = activate(x, None, "swiglu")
    assert got.grad_fn is not None and "SwiGLU" in type(got.grad_fn).__name__
    (got_grad,) = torch.autograd.grad(got, x, g)
    assert torch.equal(got, want) and torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)
