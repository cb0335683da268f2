"""DPO: the loss against TRL's sigmoid formula, a short run that widens the chosen reply's margin,
and bad preference records refused with file:line."""

import json

import torch
import torch.nn.functional as F

from dialogen.cli import main
from dialogen.training.dpo import dpo_loss


def test_loss_equals_trls_sigmoid_formula():
    # TRL's DPOTrainer, loss_type="sigmoid" (its documentation): logits = (pi_c - pi_r) - (ref_c - ref_r),
    # losses = -logsigmoid(beta * logits) (label_smoothing 0), rewards = beta * (pi - ref). TRL itself is
    # not installed here (it pulls datasets and pandas), so the formula is written out.
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    beta = 0.3
    logits = (pc - pr) - (rc - rr)
    want = (-F.logsigmoid(beta * logits)).mean()
    loss, c, r = dpo_loss(pc, pr, rc, rr, beta)
    assert abs(float(loss) - float(want)) < 1e-5
    assert torch.allclose(c, beta * (pc - rc)) and torch.allclose(r, beta * (pr - rr))


WORDS = "the cat sat on a mat and dog ran fast to home in sun rain".split()


def prefs(path, n=20):
    import random

    r = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            ask = " ".join(r.choice(WORDS) for _ in range(4))
            prompt = ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] if i % 2 else []) + [
                {"role": "user", "content": ask}]
            f.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "the cat sat on a mat"}],
                                "rejected": [{"role": "assistant", "content": "rain rain " + ask}]}) + "\n")


def test_dpo_run_prefers_the_chosen_reply(tiny_llama, tmp_path, capsys):
    path, _ = tiny_llama
    data = tmp_path / "prefs.jsonl"
    prefs(data)
    code = main(["train", "--dpo", "--init", str(path), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--template", "chatml", "--lora-r", "4", "--max-len", "64", "--batch-size", "4", "--max-steps", "6",
                 "--lr", "1e-2", "--warmup-steps", "1", "--dpo-beta", "0.5"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["val_pairs"] == 2
    log = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    val = [r for r in log if "val_reward_margin" in r]
    assert val[0]["step"] == 0 and abs(val[0]["val_reward_margin"]) < 1e-6  # the adapter starts as the base
    assert val[-1]["val_reward_margin"] > 0.5 and val[-1]["val_reward_accuracy"] == 1.0
    assert (tmp_path / "run/last/adapter_model.safetensors").exists()


def test_equal_chosen_and_rejected_is_refused(tiny_llama, tmp_path, capsys):
    path, _ = tiny_llama
    data = tmp_path / "prefs.jsonl"
    prefs(data, 3)
    lines = data.read_text().splitlines()
    rec = json.loads(lines[1])
    lines[1] = json.dumps({**rec, "rejected": rec["chosen"]})
    data.write_text("\n".join(lines) + "\n")
    code = main(["train", "--dpo", "--init", str(path), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--lora-r", "4", "--max-len", "64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{data}:2: chosen and rejected are the same" in err
    assert not (tmp_path / "run").exists()


def test_dpo_resume_continues_the_same_run(tiny_llama, tmp_path):
    """Stopped after step 3 (last saved at 2) and resumed: the loss curve, held-out metrics and adapter
    equal those of the uninterrupted run (the adapter's dropout and a batch across two passes included)."""
    import pytest
    from safetensors.torch import load_file

    from dialogen.training.dpo import train_dpo
    from dialogen.training.options import TrainOptions

    path, _ = tiny_llama
    data = tmp_path / "prefs.jsonl"
    prefs(data)
    opts = dict(init=str(path), data=str(data), template="chatml", dpo=True, lora_r=4, lora_alpha=8.0, lora_dropout=0.1,
                max_len=64, batch_size=4, max_steps=6, save_every=2, eval_every=2, lr=1e-2, warmup_steps=1,
                dpo_beta=0.5, progress=False)

    class Killed(Exception):
        pass

    def crash(step, record, model):
        if step == 3:
            raise Killed

    train_dpo(TrainOptions(out=str(tmp_path / "a"), **opts))
    with pytest.raises(Killed):
        train_dpo(TrainOptions(out=str(tmp_path / "b"), **opts), on_step=crash)
    assert json.loads((tmp_path / "b/last/trainer_state.json").read_text())["step"] == 2
    train_dpo(TrainOptions(out=str(tmp_path / "b"), resume=True, **opts))
    a, b = ([json.loads(line) for line in open(tmp_path / r / "metrics.jsonl")] for r in "ab")
    drop = lambda log: [{k: v for k, v in r.items() if k != "elapsed"} for r in log]  # noqa: E731
    assert drop(a) == drop(b) and len([r for r in a if "loss" in r]) == 6
    wa, wb = (load_file(str(tmp_path / r / "last/adapter_model.safetensors")) for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dpo_resume_with_other_options_is_refused(tiny_llama, tmp_path, capsys):
    path, _ = tiny_llama
    data = tmp_path / "prefs.jsonl"
    prefs(data, 4)
    argv = ["train", "--dpo", "--init", str(path), "--data", str(data), "--out", str(tmp_path / "run"),
            "--template", "chatml", "--lora-r", "4", "--max-len", "64", "--max-steps", "2"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--resume", "--dpo-beta", "0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume: dpo_beta was 0.1, now 0.3" in err


@torch.no_grad()
def test_reply_log_probabilities_are_transformers_with_the_familys_logit_scale(tmp_path):
    from test_families import CASES, VOCAB, build

    from dialogen.models.loading import load
    from dialogen.training.dpo import sequence_logps

    cls, kwargs = CASES["granite"]  # logits_scaling=2: the head divides the logits
    ref = build(tmp_path, cls, kwargs)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    got = sequence_logps(load(str(tmp_path), "float32").model, ids, labels)
    logp = torch.log_softmax(ref(ids).logits.float(), dim=-1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    want = (logp * (labels[:, 1:] != -100)).sum(1)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
