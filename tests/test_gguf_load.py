"""GGUF files read as shipped: logits equal transformers' on the weights as written (llama with
mixed block types in one fused projection, qwen2 with q/k/v biases, Llama 3.1 rope factors,
linear rope scaling); blocks stay blocks (the token embedding too, looked up row by row); what
the loader cannot compute is refused in one line naming the file and the key or tensor; the
default model's memory after a reply stays within a bound of its file size."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dialogen.errors import UserError
from dialogen.models.kernels import library
from dialogen.models.native import BlockEmbedding, BlockLinear, FusedBlock, SegmentedLinear
from dialogen.models.loading import load
from gguf_files import assert_refused, tiny_hf, with_weights, write_gguf

IDS = torch.tensor([[1, 52, 200, 77, 9, 280, 33, 120, 5, 270, 11, 64] * 8])  # 96 positions
MIXED = {"token_embd.weight": "Q8_0", "output.weight": "Q4_1", "blk.0.attn_q.weight": "Q4_0",
         "blk.0.attn_k.weight": "Q4_0", "blk.0.attn_v.weight": "Q8_0", "blk.0.ffn_gate.weight": "Q4_1",
         "blk.0.ffn_up.weight": "Q8_0", "blk.0.ffn_down.weight": "Q4_0", "blk.1.attn_q.weight": "Q8_0",
         "blk.1.attn_k.weight": "Q8_0", "blk.1.attn_v.weight": "Q8_0", "blk.1.attn_output.weight": "Q4_1",
         "blk.1.ffn_gate.weight": "Q4_0", "blk.1.ffn_up.weight": "Q4_0", "blk.1.ffn_down.weight": "Q8_0"}


def reference_logits(hf, written, ids=IDS):
    with torch.no_grad():
        return with_weights(hf, written)(ids).logits


@torch.no_grad()
def test_mixed_types_in_fused_projections_stay_blocks(tmp_path):
    hf = tiny_hf("llama")
    written = write_gguf(tmp_path / "m.gguf", hf, types=MIXED)
    want = reference_logits(hf, written)
    model = load(str(tmp_path / "m.gguf"), "auto").model
    b0, b1 = model.blocks
    assert [p.kind for p in b0.attn.qkv.parts] == ["q4_0", "q4_0", "q8_0"]  # q, k, v rows in order
    assert [p.kind for p in b0.mlp.gate_up.parts] == ["q4_1", "q8_0"]
    assert b1.attn.qkv.kind == "q8_0" and b1.mlp.gate_up.kind == "q4_0" and b0.mlp.down.kind == "q4_0"
    assert not isinstance(b0, FusedBlock) and isinstance(b1, FusedBlock)  # the mixed block runs unfused
    got = model(IDS)  # blocks serve the prompt
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # activations are rounded to 8 bits in the kernels
    cache = model.new_cache(1)
    model(IDS[:, :90], cache)
    steps = torch.stack([model(IDS[:, t:t + 1], cache)[0, -1] for t in range(90, 96)])
    assert (steps - want[0, 90:]).abs().max() < 0.1 * want.abs().max()
    # blocks only: the 7 Linears the file ships as blocks, the F32 blk.0.attn_output quantized (auto: int8),
    # the head and the embedding; no float32 matrix
    kept = [m for m in model.modules() if isinstance(m, (BlockLinear, SegmentedLinear, BlockEmbedding))]
    assert len(kept) == 7 + 1 + 2 and b0.attn.o_proj.shipped is not None
    assert not any(p.dim() == 2 for p in model.parameters())
    # inference runs the kernels: every module swapped in, and each part of a mixed projection, is in eval mode
    # (a BlockLinear in training mode multiplies for autograd, graph or not); a LoRA base's train() reaches them
    parts = [p for m in kept if isinstance(m, SegmentedLinear) for p in m.parts]
    assert len(parts) == 5 and not any(m.training for m in [*model.modules(), *parts])
    model.frozen_blocks = True
    model.train()
    assert all(p.training for p in parts)
    model.eval()
    assert not any(p.training for p in parts)
    with library.disabled():  # the reference path (floats made from the blocks): the weights as written, exactly
        assert (model(IDS) - want).abs().max() < 1e-4


@torch.no_grad()
def test_a_q4_k_m_style_mix_stays_blocks(tmp_path):
    """q/k and gate in Q4_K, v, up and down in Q6_K (llama-quantize's Q4_K_M mix), embedding F16."""
    hf = tiny_hf("llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    per_layer = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
                 "ffn_up": "Q6_K", "ffn_down": "Q6_K"}
    types = {"token_embd.weight": "F16", "output.weight": "Q6_K", **{f"blk.0.{n}.weight": t for n, t in per_layer.items()}}
    written = write_gguf(tmp_path / "k.gguf", hf, types=types)
    want = reference_logits(hf, written)
    model = load(str(tmp_path / "k.gguf"), "auto").model
    a, m = model.blocks[0].attn, model.blocks[0].mlp
    assert [p.kind for p in a.qkv.parts] == ["q4_k", "q4_k", "q6_k"] and [p.kind for p in m.gate_up.parts] == ["q4_k", "q6_k"]
    assert isinstance(model.embed, BlockEmbedding) and not any(p.dim() == 2 for p in model.parameters())
    cache = model.new_cache(1)
    model(IDS[:, :90], cache)
    steps = torch.stack([model(IDS[:, t:t + 1], cache)[0, -1] for t in range(90, 96)])
    assert (steps - want[0, 90:]).abs().max() < 0.1 * want.abs().max()
    with library.disabled():
        assert (model(IDS) - want).abs().max() < 1e-4


@torch.no_grad()
def test_int8_joins_mixed_parts_on_the_8_bit_grid(tmp_path):
    hf = tiny_hf("llama")
    written = write_gguf(tmp_path / "m.gguf", hf, types=MIXED)
    model = load(str(tmp_path / "m.gguf"), "int8").model
    assert [p.kind for p in model.blocks[0].attn.qkv.parts] == ["q8_0"] * 3
    want = reference_logits(hf, written)
    assert (model(IDS) - want).abs().max() < 0.1 * want.abs().max()


@torch.no_grad()
def test_tiled_weights_replace_the_blocks(tmp_path):
    """Where the build multiplies a tiled order (AVX-512 VNNI), a Q4_0/Q4_1/Q8_0 weight is kept once, tiled
    in place of the file's blocks (Q4_0 and Q4_1 tiles take exactly the blocks' bytes; q/k/v and gate/up
    parts tiled without joining them first), and reading the tiles back gives the file's values."""
    from dialogen.models.kernels import formats

    hf = tiny_hf("llama")
    written = write_gguf(tmp_path / "m.gguf", hf, types=MIXED)
    model = load(str(tmp_path / "m.gguf"), "auto").model
    b1 = model.blocks[1]
    gate_up = b1.mlp.gate_up  # Q4_0 gate and up, not back to back in the file
    if not gate_up.product_type & formats.TILED:
        pytest.skip("this build multiplies the blocks as they are")
    assert dict(gate_up.named_buffers()).keys() == {"blocks"} and not hasattr(gate_up, "tiled")
    assert gate_up.blocks.numel() == gate_up.out_features * gate_up.in_features // 32 * 18
    up = written["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(gate_up.reference_weight()[-len(up):], up)
    assert torch.equal(gate_up.weight_rows(16, 48), written["model.layers.1.mlp.gate_proj.weight"][16:48])
    qkv = b1.attn.qkv.reference_weight()  # Q8_0 q, k (their rows put back in rotary order) and v
    v = written["model.layers.1.self_attn.v_proj.weight"]
    assert b1.attn.qkv.product_type & formats.TILED and torch.equal(qkv[-len(v):], v)


@torch.no_grad()
def test_tied_embedding_rows_are_dequantized_from_the_blocks(tmp_path):
    hf = tiny_hf("llama", tied=True)
    written = write_gguf(tmp_path / "t.gguf", hf, types={"token_embd.weight": "Q8_0"})
    model = load(str(tmp_path / "t.gguf"), "auto").model
    assert isinstance(model.embed, BlockEmbedding) and model.embed.kind == "q8_0"
    assert model.lm_head.blocks.data_ptr() == model.embed.blocks.data_ptr()  # the head multiplies the same blocks
    x = model.embed(IDS[:, :5])
    assert torch.equal(x[0], written["model.embed_tokens.weight"][IDS[0, :5]])
    assert not any(p.dim() == 2 for p in model.parameters())  # no float table was made
    want = reference_logits(hf, {**written, "lm_head.weight": written["model.embed_tokens.weight"]})
    with library.disabled():
        assert (model(IDS) - want).abs().max() < 1e-4


@torch.no_grad()
def test_qwen2_biases(tmp_path):
    hf = tiny_hf("qwen2")
    written = write_gguf(tmp_path / "q.gguf", hf, arch="qwen2")
    model = load(str(tmp_path / "q.gguf"), "float32").model
    want = reference_logits(hf, written)
    assert model.cfg.attn_bias
    assert (model(IDS) - want).abs().max() < 1e-4
    blocks = {f"blk.{i}.{n}.weight": "Q8_0" for i in range(2) for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                         "ffn_gate", "ffn_up", "ffn_down")}
    written = write_gguf(tmp_path / "q8.gguf", hf, arch="qwen2", types=blocks)
    model = load(str(tmp_path / "q8.gguf"), "auto").model
    assert all(isinstance(b, FusedBlock) for b in model.blocks)  # the fused native block adds the q/k/v biases
    want = reference_logits(hf, written)
    cache = model.new_cache(1)
    model(IDS[:, :90], cache)
    steps = torch.stack([model(IDS[:, t:t + 1], cache)[0, -1] for t in range(90, 96)])
    assert (steps - want[0, 90:]).abs().max() < 0.1 * want.abs().max()


@torch.no_grad()
def test_qwen3_qk_norms(tmp_path):
    hf = tiny_hf("qwen3", head_dim=32)  # wider heads than hidden_size / heads: key_length in the file
    written = write_gguf(tmp_path / "q3.gguf", hf, arch="qwen3")
    model = load(str(tmp_path / "q3.gguf"), "float32").model
    assert model.cfg.qk_norm and model.cfg.head_dim == 32
    assert (model(IDS) - reference_logits(hf, written)).abs().max() < 1e-4


@torch.no_grad()
def test_gemma(tmp_path):
    hf = tiny_hf("gemma", tied=True, head_dim=16, hidden_activation="gelu_pytorch_tanh")
    written = write_gguf(tmp_path / "g.gguf", hf, arch="gemma", types={"token_embd.weight": "Q8_0"})
    model = load(str(tmp_path / "g.gguf"), "float32").model
    assert model.cfg.embed_scale == 8.0 and model.cfg.act == "gelu_tanh"
    want = reference_logits(hf, {**written, "lm_head.weight": written["model.embed_tokens.weight"]})
    assert (model(IDS) - want).abs().max() < 1e-4


@torch.no_grad()
def test_llama3_rope_factors_from_rope_freqs(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    hf = tiny_hf("llama", rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert not torch.allclose(scaled, base)  # the test's positions see the scaling
    written = write_gguf(tmp_path / "r.gguf", hf, extra={"rope_freqs.weight": (base / scaled).numpy()})
    model = load(str(tmp_path / "r.gguf"), "float32").model
    assert (model(IDS) - reference_logits(hf, written)).abs().max() < 1e-4


@torch.no_grad()
def test_linear_rope_scaling(tmp_path):
    hf = tiny_hf("llama", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    written = write_gguf(tmp_path / "l.gguf", hf, meta={"llama.rope.scaling.type": "linear",
                                                         "llama.rope.scaling.factor": 4.0})
    model = load(str(tmp_path / "l.gguf"), "float32").model
    assert (model(IDS) - reference_logits(hf, written)).abs().max() < 1e-4


@pytest.mark.parametrize("change, named", [
    (dict(meta={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}), "llama.rope.scaling.type"),
    (dict(meta={"llama.attention.sliding_window": 64}), "llama.attention.sliding_window"),
    (dict(arch="phi2"), "GGUF architecture \"phi2\""),
    (dict(extra={"blk.0.attn_q_norm.weight": [1.0] * 16}), "tensor blk.0.attn_q_norm.weight"),
    (dict(types={"blk.0.attn_norm.weight": "Q8_0"}), "tensor blk.0.attn_norm.weight"),
])
def test_refused_in_one_line_naming_file_and_key(tmp_path, capsys, change, named):
    path = tmp_path / "bad.gguf"
    write_gguf(path, tiny_hf("llama"), **change)
    assert_refused(path, named, tmp_path, capsys)


def test_default_model_memory_after_a_reply_is_bounded_by_the_file():
    """RSS after loading the default model and one reply, less the process's RSS before loading,
    stays within 2x the file's size (one copy of each weight: a view of the mapping, or its tiles;
    the heap's free pages returned after the load and the prompt)."""
    script = Path(__file__).resolve().parent.parent / "bench" / "gguf_rss.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["after_reply_mb"] - r["baseline_mb"] < 2 * r["file_mb"], r


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "t.gguf"
    write_gguf(path, tiny_hf("llama"), types=MIXED)
    return path


def patched(tiny_file, tmp_path, field: str, value: int):
    """A copy of the tiny file with the header number named `field` (gguf_header's names) set to `value`."""
    import struct

    from dialogen.models.gguf_header import read_header

    pos, fmt = next((pos, fmt) for what, pos, fmt in read_header(tiny_file).fields if what == field)
    data = bytearray(tiny_file.read_bytes())
    struct.pack_into(fmt, data, pos, value)
    out = tmp_path / "patched.gguf"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("field, value, named", [
    ("dimension 1 of blk.1.ffn_gate.weight", 1, "blk.1.ffn_gate.weight"),  # 1 row declared: not the data's size
    ("dimension 1 of blk.0.attn_q.weight", 1, "blk.0.attn_q.weight"),
    ("type of blk.0.attn_q.weight", 8, "blk.0.attn_q.weight"),  # a valid but wrong type id (Q4_0 -> Q8_0)
    ("type of blk.0.ffn_up.weight", 2, "blk.0.ffn_up.weight"),  # Q8_0 -> Q4_0: fewer bytes than its data
    ("type of blk.0.attn_norm.weight", 99, "blk.0.attn_norm.weight"),
    ("length of tokenizer.ggml.tokens", 1 << 32, "tokenizer.ggml.tokens"),
    ("length of tokenizer.ggml.merges", 1 << 40, "tokenizer.ggml.merges"),
    ("offset of blk.1.ffn_down.weight", 1 << 40, "blk.1.ffn_down.weight"),
    ("tensor count", 1 << 60, "tensor count"),
])
def test_untrusted_header_numbers_are_refused_before_use(tiny_file, tmp_path, field, value, named):
    import time

    path = patched(tiny_file, tmp_path, field, value)
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        load(str(path), "auto")
    msg = str(e.value)
    assert str(path) in msg and named in msg and "\n" not in msg, msg
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("vocab, named", [
    (dict(tokens=[], types=[], merges=[]), "tokenizer.ggml.tokens"),  # an empty vocabulary
    (dict(merges=["t h", "Ġ nothere"]), "tokenizer.ggml.merges[1]"),  # a merge of a token not in the vocabulary
    (dict(types=[1, 2]), "tokenizer.ggml.token_type"),
])
def test_inconsistent_vocabularies_are_refused(tmp_path, vocab, named):
    path = tmp_path / "v.gguf"
    write_gguf(path, tiny_hf("llama"), vocab=vocab)
    with pytest.raises(UserError) as e:
        load(str(path), "auto")
    assert str(path) in str(e.value) and named in str(e.value) and "\n" not in str(e.value)
