"""Two CPU processes under torchrun (gloo) against one process with the same global batch:
the same first-step loss and the same gradients. The two recompute each block's activations in
the backward pass (--gradient-checkpointing), so the gradients of recomputed blocks, reduced
across processes, are checked against plain ones too.

This file is also the worker torchrun starts: `python -m torch.distributed.run ... THIS_FILE`.
"""

import json
import os
import subprocess
import sys

import torch

from dialogen.training.options import TrainOptions
from dialogen.training.sft import train


def options(data, out, init, grad_accum, checkpointing=False):
    # batch 2 x accumulation: the global batch is 4 examples either way
    return TrainOptions(out=out, data=data, init=init, template="chatml", max_len=48, batch_size=2,
                        grad_accum=grad_accum, max_steps=1, eval_every=0, save_every=0, lr=1e-3, progress=False,
                        clip=0.0, gradient_checkpointing=checkpointing)


def dump_first_step(path):
    def on_step(step, record, model):
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": record["loss"], "trained": record["trained_tokens"], "grads": grads}, path)
    return on_step


def test_two_processes_match_one(tiny_llama, tmp_path):
    import random

    path, _ = tiny_llama
    r = random.Random(1)
    words = "hello there how are you fine thanks what about the weather today it rains".split()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": role, "content": " ".join(r.choice(words) for _ in range(r.randint(2, 8)))}
        for _ in range(2) for role in ("user", "assistant")]}) + "\n" for _ in range(40)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_TEST_ARGS": json.dumps([str(data), str(tmp_path), str(path)])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(options(str(data), str(tmp_path / "single"), str(path), grad_accum=2),
          on_step=dump_first_step(tmp_path / "single.pt"))
    one = torch.load(tmp_path / "single.pt")
    for rank in (0, 1):
        two = torch.load(tmp_path / f"rank{rank}.pt")
        assert two["trained"] == one["trained"] > 0
        assert abs(two["loss"] - one["loss"]) < 1e-6 * abs(one["loss"])
        assert two["grads"].keys() == one["grads"].keys()
        for name, g in one["grads"].items():
            assert torch.allclose(two["grads"][name], g, rtol=1e-4, atol=1e-7), name
    # rank 0 alone wrote the checkpoint
    assert (tmp_path / "ddp/last/model.safetensors").exists()


if __name__ == "__main__":  # a torchrun worker
    data, tmp, init = json.loads(os.environ["DDP_TEST_ARGS"])
    rank = int(os.environ["RANK"])
    train(options(data, os.path.join(tmp, "ddp"), init, grad_accum=1, checkpointing=True),
          on_step=dump_first_step(os.path.join(tmp, f"rank{rank}.pt")))
