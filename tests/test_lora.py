"""LoRA: training adapters on a frozen base, PEFT's files (checked with peft on transformers' base),
exact resume, and adapters made for another base refused."""

import copy
import json
import shutil

import pytest
import torch

from dialogen.cli import main
from dialogen.models.loading import load
from dialogen.training.options import TrainOptions
from dialogen.training.sft import train

from test_train import Killed, data, records  # noqa: F401 (data: the fixture)

LORA = dict(template="chatml", max_len=64, batch_size=2, lr=1e-2, warmup_steps=1, progress=False, lora_r=4,
            lora_alpha=8.0)


@pytest.fixture(scope="module")
def run(tiny_llama, data, tmp_path_factory):  # noqa: F811
    path, _ = tiny_llama
    out = tmp_path_factory.mktemp("lora") / "run"
    train(TrainOptions(out=str(out), init=str(path), data=data, max_steps=3, eval_every=0,
                       lora_targets="q_proj,v_proj,o_proj,up_proj,down_proj", **LORA))
    return out


def test_adapter_matches_peft_on_transformers_base(tiny_llama, run):
    from peft import PeftModel

    path, base = tiny_llama
    files = sorted(p.name for p in (run / "last").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    ref = PeftModel.from_pretrained(copy.deepcopy(base), str(run / "last")).eval()
    ours = load(str(path), "float32", adapter=str(run / "last")).model
    ids = torch.tensor([[1, 50, 300, 7, 900, 12, 4000, 3]])
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
        plain = load(str(path), "float32").model(ids)
    assert (want - plain).abs().max() > 1e-3  # the adapter trained: it changes the logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()



def test_a_frozen_heads_loss_in_chunks_equals_the_whole_logits(tiny_llama, monkeypatch):
    import dialogen.training.loss as loss_mod

    path, _ = tiny_llama
    model = load(str(path), "float32").model.requires_grad_(False)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    h0 = model.hidden(ids[:, :-1]).detach()
    keep = labels[:, 1:] != -100

    def loss_and_grad(chunked: bool):
        h = h0.clone().requires_grad_()
        if chunked:  # 3 positions a chunk: several chunks and a short last one
            monkeypatch.setattr(loss_mod, "HEAD_CHUNK_VALUES", 3 * model.cfg.vocab_size)
            loss = loss_mod.FrozenHeadLoss.apply(h[keep], model, labels[:, 1:][keep])
        else:
            loss = torch.nn.functional.cross_entropy(model.head(h[keep]), labels[:, 1:][keep], reduction="sum")
        (2.0 * loss).backward()
        return loss.detach(), h.grad

    (want, want_grad), (got, got_grad) = loss_and_grad(False), loss_and_grad(True)
    assert torch.allclose(got, want, rtol=1e-6) and torch.allclose(got_grad, want_grad, atol=1e-6)
    assert want_grad[keep].abs().sum() > 0 and not want_grad[~keep].any()


@pytest.mark.parametrize("scale, cap, confident", [(1.0, 0.0, False), (0.5, 3.0, False), (1.0, 0.0, True)])
def test_a_blocked_heads_loss_by_vocabulary_slices_equals_the_whole_logits(tiny_llama, monkeypatch, scale, cap,
                                                                           confident):
    """The frozen head of blocks in bfloat16 in one pass over slices of its vocabulary (several slices,
    several chunks of positions), against the whole logits of `model.head` (its bfloat16 products,
    the family's logit scale and soft cap) and torch's cross entropy; also where the targets are
    almost certain, whose small gradient the bfloat16 products must not swamp."""
    import dialogen.models.kernels.grad as grad_mod
    import dialogen.training.loss as loss_mod
    from dialogen.models.kernels import library
    from dialogen.models.native import BlockLinear
    from dialogen.models.quantized import set_compute_dtype

    if not library.enabled():
        pytest.skip("the native kernels are not built here")
    path, _ = tiny_llama
    model = load(str(path), "int8").model
    model.frozen_blocks = True
    set_compute_dtype(model, torch.bfloat16)
    model.requires_grad_(False).train()
    model.cfg.logit_scale, model.cfg.final_softcap = scale, cap
    assert isinstance(model.lm_head, BlockLinear) and model.cfg.vocab_size > 3 * grad_mod.BACKWARD_ROWS
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    targets = ids[:, 1:].flatten()
    h0 = torch.randn(len(targets), model.cfg.d_model, generator=torch.Generator().manual_seed(4)) * 3
    if confident:  # h along each target's own row of the head: p(target) near 1
        rows = model.lm_head.weight_rows(0, model.cfg.vocab_size)[targets]
        h0 = rows * (24 / rows.pow(2).sum(1).mean())
    h = h0.clone().requires_grad_()
    logits = model.head(h)
    if confident:
        assert logits.softmax(-1).gather(1, targets[:, None]).mean() > 0.95
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    want.backward()
    monkeypatch.setattr(grad_mod, "LOW_PRECISION_VALUES", grad_mod.BACKWARD_ROWS * model.cfg.d_model)
    monkeypatch.setattr(loss_mod, "HEAD_CHUNK_VALUES", 5 * grad_mod.BACKWARD_ROWS)  # 5 positions a chunk
    g = h0.clone().requires_grad_()
    got = loss_mod.FrozenHeadLoss.apply(g, model, targets)
    (2.0 * got).backward()
    # float32's rounding of logits this large, summed over the positions in another order
    assert abs(float(got - want)) <= 1e-5 * float(want) + 1e-6 * len(targets) * float(logits.abs().max())
    assert (g.grad / 2 - h.grad).norm() < 0.01 * h.grad.norm()
    if confident:  # against float64 on the same bfloat16 operands: the small gradient kept, not rounded away
        w = model.lm_head.weight_rows(0, model.cfg.vocab_size).to(torch.bfloat16).double()
        p = (h0.to(torch.bfloat16) @ w.T.to(torch.bfloat16)).double().softmax(-1)  # the logits as rounded
        exact = (p - torch.nn.functional.one_hot(targets, p.shape[1])) @ w
        assert (g.grad / 2 - exact).norm() < 0.002 * exact.norm()


def test_adapter_on_the_native_path_matches_the_reference(tiny_llama, run):
    path, _ = tiny_llama
    ref = load(str(path), "float32", adapter=str(run / "last")).model
    fast = load(str(path), "int8", adapter=str(run / "last")).model
    ids = torch.tensor([[1, 50, 300, 7, 900, 12]])
    with torch.no_grad():
        ours = fast(ids)
        cache = fast.new_cache()
        steps = [fast(ids[:, :3], cache)] + [fast(ids[:, i:i + 1], cache) for i in range(3, 6)]
    want = ref(ids).detach()
    assert fast.native is not None and not any(p.dtype == torch.float32 and p.dim() == 2 and p.shape[0] == 2 * 96
                                               for p in fast.parameters())
    tol = 0.05 * want.abs().max()  # int8 blocks of the base
    assert (ours - want).abs().max() < tol and (torch.cat(steps, 1) - want).abs().max() < tol


def test_lora_resume_is_exact(tiny_llama, data, tmp_path):  # noqa: F811
    path, _ = tiny_llama
    opts = dict(LORA, init=str(path), data=data, max_steps=5, save_every=2, eval_every=2, lora_dropout=0.1)
    train(TrainOptions(out=str(tmp_path / "a"), **opts))

    def crash(step, record, model):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(TrainOptions(out=str(tmp_path / "b"), **opts), on_step=crash)
    train(TrainOptions(out=str(tmp_path / "b"), resume=True, **opts))
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / r / "last/adapter_model.safetensors")) for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a/best/adapter_config.json").exists()


def test_bad_targets_and_foreign_adapters_are_refused(tiny_llama, tiny_gpt2, run, data, tmp_path, capsys):  # noqa: F811
    path, _ = tiny_llama
    code = main(["train", "--init", str(path), "--data", data, "--out", str(tmp_path / "x"), "--lora-r", "2",
                 "--lora-targets", "q_proj,qkv_proj", "--max-steps", "1", "--max-len", "64", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'qkv_proj' names no module" in err
    assert not (tmp_path / "x").exists()
    code = main(["train", "--init", str(path), "--data", data, "--out", str(tmp_path / "x"), "--lora-r", "2",
                 "--compute-dtype", "bfloat16", "--max-steps", "1", "--no-progress"])  # a float32 base
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--compute-dtype applies to a base kept in blocks" in err
    copy = tmp_path / "copy"  # the same shapes, another base
    shutil.copytree(path, copy)
    msgs = tmp_path / "msgs.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    code = main(["generate", str(msgs), "--model", str(copy), "--adapter", str(run / "last")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "the adapter is for the base" in err
    other = tmp_path / "other"  # another base's shapes, with no base named
    shutil.copytree(run / "last", other)
    conf = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": None}))
    gpt2, _ = tiny_gpt2
    code = main(["generate", str(msgs), "--model", str(gpt2), "--adapter", str(other)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "the adapter is for another base" in err


def test_merged_export_equals_base_plus_adapter(tiny_llama, run, tmp_path, capsys):
    path, _ = tiny_llama
    assert main(["export", "--model", str(path), "--adapter", str(run / "last"), "--merge", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    ids = torch.tensor([[1, 50, 300, 7, 900, 12, 4000, 3]])
    with torch.no_grad():
        want = load(str(path), "float32", adapter=str(run / "last")).model(ids)
        merged = load(str(tmp_path / "m"), "float32").model(ids)
    assert (want - load(str(path), "float32").model(ids)).abs().max() > 1e-3
    assert torch.allclose(merged, want, atol=1e-4)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))(ids).logits, want, atol=1e-4)


def test_adapter_flag_and_api_chat_with_the_adapted_model(run, tmp_path, capsys):
    import dialogen

    msgs = tmp_path / "msgs.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "the cat"}]))
    # the run's checkpoint names its base: --adapter alone, or the checkpoint as --model
    code = main(["generate", str(msgs), "--adapter", str(run / "last"), "--max-new-tokens", "4", "--temperature", "0"])
    first = capsys.readouterr().out
    assert code == 0 and first
    assert main(["generate", str(msgs), "--model", str(run / "last"), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == first
    chat = dialogen.load(adapter=str(run / "last"))
    assert chat.engine.model.adapter is not None and chat.engine.template.name == "chatml"


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama):
    from dialogen.models.lora import Adapter, LoraSettings
    from dialogen.training.loss import LossModel

    path, _ = tiny_llama
    model = load(str(path), "float32").model.materialize().requires_grad_(False).train()
    adapter = Adapter(model.cfg, LoraSettings(4, 8.0, 0.1, ("q_proj", "down_proj")), None).init(0).attach(model)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        torch.manual_seed(1)  # the same dropout masks
        nll, _ = LossModel(model, adapter)(ids, ids)
        nll.backward()
        grads.append([p.grad.clone() for p in adapter.parameters()])
        adapter.zero_grad()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_lora_on_a_blocked_base_matches_its_dequantized_reference(smol_tokenizer, data, tmp_path):  # noqa: F811
    import transformers

    from dialogen.models.kernels import library
    from dialogen.models.lora import Adapter, LoraSettings
    from dialogen.models.native import BlockLinear
    from dialogen.models.quantized import set_compute_dtype
    from dialogen.training.loss import LossModel

    if not library.enabled():
        pytest.skip("the native kernels are not built here")
    torch.manual_seed(0)  # transformers' own initialisation: logits of a trained model's scale
    path = tmp_path / "base"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=smol_tokenizer.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).save_pretrained(path)
    smol_tokenizer.save(path)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for blocked, backward, checkpointing in ((True, torch.float32, False), (False, None, False),
                                             (True, torch.bfloat16, False), (True, torch.bfloat16, True)):
        model = load(str(path), "int8").model
        model.checkpointing = checkpointing
        for m in model.modules():
            if isinstance(m, BlockLinear):
                m.shipped = None  # the reference is the blocks' values, not the float weights they came from
        model.frozen_blocks = blocked
        if blocked:
            set_compute_dtype(model, backward)
        model.requires_grad_(False).train()
        assert all(isinstance(b.mlp.down, BlockLinear) for b in model.blocks) == blocked
        adapter = Adapter(model.cfg, LoraSettings(4, 8.0, 0.0, ("q_proj", "o_proj", "gate_proj", "down_proj")))
        adapter.init(0).attach(model)
        g = torch.Generator().manual_seed(5)  # the same adapter both times
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        nll, n = LossModel(model, adapter)(ids, ids)
        (nll / n).backward()
        losses.append((nll / n).item())
        grads.append(torch.cat([p.grad.flatten() for p in adapter.parameters()]))
        if blocked and not checkpointing:  # the training forward is the native products of inference
            model.eval()
            with torch.no_grad():
                native, _ = LossModel(model, adapter)(ids, ids)
            assert abs(native.item() / n.item() - losses[0]) < 1e-5 * losses[0]
    # blocks (native products, activations rounded to 8 bits as the kernels do) against their float values
    assert abs(losses[0] - losses[1]) < 1e-3 * abs(losses[1])
    assert (grads[0] - grads[1]).norm() < 0.04 * grads[1].norm()
    # the blocks' products in bfloat16 (activations and gradients rounded to 8 bits of mantissa)
    assert losses[2] != losses[0] and abs(losses[2] - losses[1]) < 1e-3 * abs(losses[1])
    assert (grads[2] - grads[1]).norm() < 0.04 * grads[1].norm()
    # blocks recomputed in the backward pass (--gradient-checkpointing): the same products, the same gradients
    assert losses[3] == losses[2] and torch.allclose(grads[3], grads[2], rtol=1e-5, atol=1e-8)
    # the same through `dialogen train --base-dtype int8 --compute-dtype bfloat16`
    summary = train(TrainOptions(out=str(tmp_path / "q"), init=str(path), data=data, max_steps=2, eval_every=2,
                                 base_dtype="int8", compute_dtype="bfloat16", **LORA))
    assert summary["steps"] == 2 and (tmp_path / "q/last/adapter_model.safetensors").exists()


def test_a_held_bfloat16_weight_slice_is_reused_for_that_weight_only():
    """The bfloat16 products of a blocked base share one weight buffer and skip dequantizing the slice it
    already holds: each product must still use its own weight, after another of the same shape, after its
    blocks change in place, and after they are replaced; forward and backward against W in bfloat16."""
    from dialogen.models.kernels import formats, library
    from dialogen.models.kernels.grad import BlockProduct
    from dialogen.models.native import BlockLinear

    if not library.enabled():
        pytest.skip("the native kernels are not built here")
    g = torch.Generator().manual_seed(2)

    def blocked():
        lin = BlockLinear("q4_1", formats.quantize(torch.randn(64, 96, generator=g), "q4_1"), 96, 64)
        lin.compute_dtype = torch.bfloat16
        return lin

    def check(lin):
        w = lin.weight_rows(0, 64).to(torch.bfloat16).float()
        x = torch.randn(5, 96, generator=g, requires_grad=True)
        y = BlockProduct.apply(x, lin)
        gy = torch.randn(5, 64, generator=g)
        y.backward(gy)
        assert torch.allclose(y, x.detach().to(torch.bfloat16).float() @ w.T, rtol=1e-2, atol=1e-2)
        assert torch.allclose(x.grad, gy.to(torch.bfloat16).float() @ w, rtol=1e-2, atol=1e-2)

    a, b = blocked(), blocked()
    for lin in (a, b, a, a):
        check(lin)
    a.blocks.copy_(blocked().blocks)  # in place: its version moves
    check(a)
    a.blocks = blocked().blocks  # another tensor
    check(a)
