"""`dialogen export --gguf`: llama and gpt2 models written as GGUF and read back by our own GGUF
loader. The logits equal transformers' on the checkpoint for f32, and equal the checkpoint with its
matrices rounded to the stored type (the gguf package's own dequantization) for f16, Q8_0, Q4_0;
a fine-tuned llama and a scratch GPT-2 give the same greedy replies from their GGUF export."""

import json

import numpy as np
import pytest
import torch

from dialogen.cli import main
from dialogen.export import export_gguf
from dialogen.models.gguf_file import read_gguf
from dialogen.models.loading import build, load
from test_train import data as chats  # noqa: F401 (a fixture: 60 random chats)

PROMPT = torch.tensor([[1, 52, 200, 77, 9, 300, 33, 120, 5, 290]])
GREEDY = {"temperature": 0, "repetition_penalty": 1.0, "max_new_tokens": 12}
STORED = {"f16": None, "q8_0": "Q8_0", "q4_0": "Q4_0"}


def rounded(model, kind: str):
    """The model with every matrix (but GPT-2's position table) passed through the stored type."""
    import gguf

    sd = {}
    for name, t in model.state_dict().items():
        if t.dim() == 2 and name != "pos_embed.weight" and kind != "f32":
            a = t.float().numpy()
            if kind == "f16":
                a = a.astype(np.float16).astype(np.float32)
            else:
                qtype = gguf.GGMLQuantizationType[STORED[kind]]
                a = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        sd[name] = t.clone()
    return build(model.cfg, sd)


def logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(ids).float()


@pytest.fixture(scope="module")
def small_models(tmp_path_factory, chats):
    """A tiny llama (GQA, untied head) and a tiny GPT-2 on a 320-token BPE vocabulary (GGUF files of a
    49k vocabulary take seconds to index): {family: (path, transformers model)}."""
    from conftest import _save_tiny
    from dialogen.data import read_conversations
    from dialogen.training.scratch import train_tokenizer

    tok = train_tokenizer(read_conversations(chats).conversations, 320, "chatml")
    out = {}
    for family in ("llama", "gpt2"):
        path = tmp_path_factory.mktemp(f"small_{family}")
        out[family] = (path, _save_tiny(path, family, tok.vocab_size))
        tok.save(path)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
def test_logits_of_the_export_equal_the_checkpoints(small_models, tmp_path, family, kind):
    path, hf = small_models[family]
    out = tmp_path / f"{family}-{kind}.gguf"
    summary = export_gguf(str(path), out, kind, "chatml")
    assert summary["arch"] == family and out.stat().st_size > 0
    back = load(str(out), "float32").model
    assert back.cfg.arch == summary["arch"] and back.cfg.n_kv_head == load(str(path)).model.cfg.n_kv_head
    got = logits(back)
    if kind == "f32":  # the checkpoint's logits, as transformers computes them
        with torch.no_grad():
            want = hf(PROMPT).logits.float()
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
        return
    ckpt = load(str(path), "float32").model
    want = logits(rounded(ckpt, kind))
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    # and the rounding itself stays within what the type allows (relative RMS error of the logits)
    exact = logits(ckpt)
    error = ((got - exact).norm() / exact.norm()).item()
    assert error < {"f16": 3e-3, "q8_0": 0.06, "q4_0": 0.8}[kind]


def test_the_file_carries_tokenizer_and_template(tiny_llama, tmp_path):
    from dialogen.chat.templates import CHATML
    from dialogen.models.tokenizer import Tokenizer

    path, _ = tiny_llama
    out = tmp_path / "t.gguf"
    export_gguf(str(path), out, "q8_0", "chatml")
    _, meta = read_gguf(out)
    source = Tokenizer.from_dir(path)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.chat_template"] == CHATML
    assert meta["tokenizer.ggml.eot_token_id"] == source.token_id("<|im_end|>")
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["general.file_type"] == 7
    again = Tokenizer.from_gguf(meta)
    for text in ["Hello, world!", "  2024-11-29: 12345 apples", "naïve café 😀\n\tend", "<|im_start|>user\nhi"]:
        assert again.encode_template(text) == source.encode_template(text)
        assert again.encode_text(text) == source.encode_text(text)


def equal_greedy_replies(ckpt, gguf, dtype):
    import dialogen

    a, b = dialogen.load(str(ckpt), dtype=dtype), dialogen.load(str(gguf), dtype=dtype)
    prompts = ["the cat sat", "dog ran fast to home", [{"role": "system", "content": "in sun"},
                                                        {"role": "user", "content": "rain and mat"}]]
    replies = [a.chat(p, **GREEDY) for p in prompts]
    assert replies == [b.chat(p, **GREEDY) for p in prompts]
    return replies


def test_a_fine_tuned_llama_exports_with_equal_greedy_replies(tiny_llama, chats, tmp_path, capsys):
    run = tmp_path / "ft"
    assert main(["train", "--init", str(tiny_llama[0]), "--template", "chatml", "--data", chats, "--out", str(run),
                 "--max-steps", "3", "--batch-size", "4", "--max-len", "64", "--lr", "1e-3", "--warmup-steps", "1",
                 "--eval-every", "0", "--no-progress"]) == 0
    out = tmp_path / "ft.gguf"
    assert main(["export", "--gguf", str(out), "--model", str(run / "last"), "--type", "f32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["template"] == "chatml" and summary["type"] == "f32"
    replies = equal_greedy_replies(run / "last", out, "float32")
    assert any(replies)
    equal_greedy_replies(run / "last", out, "auto")  # both quantized to Q8_0 at load, from equal weights


def test_a_scratch_gpt2_exports_with_equal_greedy_replies(chats, tmp_path, capsys):
    run = tmp_path / "gpt"
    assert main(["train", "--init", "scratch", "--template", "dialogpt", "--data", chats, "--out", str(run),
                 "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--vocab-size", "300", "--max-len", "64",
                 "--max-steps", "3", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "0",
                 "--no-progress"]) == 0
    config = json.loads((run / "last/config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 64  # llama.cpp's own converter reads n_ctx
    out = tmp_path / "gpt.gguf"
    assert main(["export", "--gguf", str(out), "--model", str(run / "last"), "--type", "f32"]) == 0
    _, meta = read_gguf(out)
    assert meta["general.architecture"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert "eos_token" in meta["tokenizer.chat_template"]  # dialogpt: turns joined by the end-of-text token
    equal_greedy_replies(run / "last", out, "float32")
    # the Q8_0 file's blocks drive the decode kernels of a GPT-2 as shipped
    q8 = tmp_path / "gpt-q8.gguf"
    export_gguf(str(run / "last"), q8, "q8_0")
    kept = load(str(q8), "auto").model
    assert kept.blocks[0].attn.qkv.kind == "q8_0" and kept.lm_head.kind == "q8_0"


@pytest.mark.parametrize("argv,message", [
    (["--gguf", "{tmp}/x.bin"], "x.bin: the output file must end in .gguf"),
    (["--gguf", "{tmp}/no/such/x.gguf"], "no/such: no such directory"),
    (["--gguf", "{tmp}/x.gguf", "--model", "{tmp}/missing"], "missing: no such model file or directory"),
])
def test_export_bad_input_is_one_line(tmp_path, capsys, argv, message):
    code = main(["export", *[a.format(tmp=tmp_path) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_an_rnn_is_refused(smol_tokenizer, tmp_path, capsys):
    from dialogen.models.rnn import RNNConfig, RNNSeq2Seq, save_rnn

    model = RNNSeq2Seq(RNNConfig(vocab_size=smol_tokenizer.vocab_size, emb_dim=8, hidden=8, dropout=0.0,
                                 start_id=smol_tokenizer.token_id("<|im_start|>"), max_seq_len=64))
    model.init_weights(0)
    save_rnn(tmp_path / "rnn", model.eval(), smol_tokenizer, {"template": "chatml", "arch": "rnn"})
    code = main(["export", "--gguf", str(tmp_path / "rnn.gguf"), "--model", str(tmp_path / "rnn")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("only llama and gpt2 models can be exported to GGUF (this one is an RNN)")
    assert not (tmp_path / "rnn.gguf").exists()
