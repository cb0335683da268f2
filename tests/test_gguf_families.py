"""GGUF files of the families beyond llama and qwen, written as llama.cpp's converter writes them
(gguf-py's writer, llama.cpp's key and tensor names): gemma2 (soft-capping, alternating sliding
window, norms on the block outputs), gemma3 (q/k norms, a local rotary base, linear scaling on the
global layers), phi3 (fused projections, LongRoPE factors, partial rotary), granite (multipliers,
output and MLP biases), smollm3 (no rotary on every fourth layer), olmo2 and olmo3's sliding
window. Logits equal transformers' within 1e-4 in float32 and greedy tokens are the same; keys the
loader does not compute are refused in one line naming the file and the key."""

import math

import pytest
import torch

from dialogen.models.loading import load
from gguf_files import assert_refused, tiny_hf, with_weights, write_gguf
from test_families import greedy

IDS = torch.tensor([[1, 52, 200, 77, 9, 280, 33, 120, 5, 270, 11, 64] * 4])  # 48 positions
WINDOW = 16
LONG, SHORT = [1.0 + i / 3 for i in range(8)], [1.0 + i / 10 for i in range(8)]
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
               "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}


def _longrope_attn(max_pos: int, original: int) -> float:
    """The attention factor llama.cpp's converter writes for LongRoPE."""
    scale = max_pos / original
    return math.sqrt(1 + math.log(scale) / math.log(original))


# name -> (tiny_hf family and config, GGUF architecture, metadata beyond the sizes, extra tensors)
CASES = {
    "gemma2": (("gemma2", dict(tied=True, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                               attn_logit_softcapping=2.0, final_logit_softcapping=4.0)), "gemma2",
               {"gemma2.attn_logit_softcapping": 2.0, "gemma2.final_logit_softcapping": 4.0,
                "gemma2.attention.sliding_window": WINDOW}, {}),
    "gemma3": (("gemma3", dict(tied=True, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                               final_logit_softcapping=5.0, rope_parameters=GEMMA3_ROPE,
                               layer_types=["sliding_attention", "full_attention"])), "gemma3",
               {"gemma3.final_logit_softcapping": 5.0, "gemma3.attention.sliding_window": WINDOW,
                "gemma3.attention.sliding_window_pattern": [True, False], "gemma3.rope.freq_base_swa": 100.0,
                "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 2.0}, {}),
    "phi3-longrope": (("phi3", dict(num_key_value_heads=4, original_max_position_embeddings=32, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "long_factor": LONG, "short_factor": SHORT})), "phi3",
        {"phi3.rope.scaling.original_context_length": 32, "phi3.rope.scaling.attn_factor": _longrope_attn(256, 32),
         "phi3.attention.sliding_window": 0},
        {"rope_factors_long.weight": LONG, "rope_factors_short.weight": SHORT}),
    "phi3-partial-window": (("phi3", dict(sliding_window=WINDOW, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})), "phi3",
        {"phi3.rope.dimension_count": 8, "phi3.attention.sliding_window": WINDOW}, {}),
    "granite": (("granite", dict(embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5,
                                 logits_scaling=2.0, attention_bias=True, mlp_bias=True)), "granite",
                {"granite.embedding_scale": 3.0, "granite.attention.scale": 0.2, "granite.residual_scale": 0.5,
                 "granite.logit_scale": 2.0}, {}),
    "smollm3": (("smollm3", dict(num_hidden_layers=4, tied=True)), "smollm3", {}, {}),
    "olmo2": (("olmo2", {}), "olmo2", {}, {}),
    "olmo3": (("olmo3", dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})), "olmo2",
        {"olmo2.attention.sliding_window": WINDOW, "olmo2.attention.sliding_window_pattern": [True, False],
         "olmo2.rope.freq_base_swa": 100.0}, {}),
}


IDS_IN_VOCAB = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # phi3's defaults lie past the tiny vocabulary


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_family_gguf_matches_transformers(name, tmp_path):
    (family, config), arch, meta, extra = CASES[name]
    hf = tiny_hf(family, **{"max_position_embeddings": 256, **IDS_IN_VOCAB, **config})
    written = write_gguf(tmp_path / f"{name}.gguf", hf, arch=arch, meta=meta, extra=extra)
    if hf.config.tie_word_embeddings:
        written["lm_head.weight"] = written["model.embed_tokens.weight"]
    theirs = with_weights(hf, written)
    model = load(str(tmp_path / f"{name}.gguf"), "float32").model
    want = theirs(IDS).logits
    assert (model(IDS) - want).abs().max() < 1e-4, float((model(IDS) - want).abs().max())
    start = IDS[:, :12]
    theirs.generation_config.eos_token_id = None
    gen = theirs.generate(start, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    assert greedy(model, start, 24) == gen


def test_family_fields_are_read(tmp_path):
    """What each architecture switches on, as llama.cpp reads it."""
    hf = tiny_hf("gemma2", tied=True, head_dim=16, query_pre_attn_scalar=16)
    write_gguf(tmp_path / "g.gguf", hf, arch="gemma2", meta={"gemma2.attention.sliding_window": WINDOW})
    cfg = load(str(tmp_path / "g.gguf"), "float32").model.cfg
    assert (cfg.attn_softcap, cfg.final_softcap) == (50.0, 30.0)  # llama.cpp's defaults when the keys are absent
    assert cfg.window == WINDOW and cfg.window_layers == [0] and cfg.post_norms and cfg.norm_offset == 0
    hf = tiny_hf("smollm3", num_hidden_layers=8, **IDS_IN_VOCAB)
    write_gguf(tmp_path / "s.gguf", hf, arch="smollm3")
    assert load(str(tmp_path / "s.gguf"), "float32").model.cfg.nope_layers == [3, 7]


BAD = [
    ("gemma3", {"gemma3.attn_logit_softcapping": 50.0}, {}, "gemma3.attn_logit_softcapping"),
    ("gemma2", {"gemma2.attention.sliding_window_pattern": [True]}, {}, "gemma2.attention.sliding_window_pattern"),
    ("granite", {"granite.rope.scaling.finetuned": False}, {}, "granite.rope.scaling.finetuned"),
    ("phi3", {}, {"rope_factors_long.weight": LONG}, "rope_factors_long.weight"),
    ("phi3", {"phi3.rope.scaling.attn_factor": 1.5}, {}, "phi3.rope.scaling.attn_factor"),
    ("olmo2", {"olmo2.rope.dimension_count": 8}, {}, "olmo2.rope.dimension_count"),
    ("smollm3", {"smollm3.attention.sliding_window": 8}, {}, "smollm3.attention.sliding_window"),
]


@pytest.mark.parametrize("family, meta, extra, named", BAD, ids=[b[-1] for b in BAD])
def test_unread_keys_are_refused_in_one_line(tmp_path, capsys, family, meta, extra, named):
    hf = tiny_hf(family, **IDS_IN_VOCAB, **({"head_dim": 16} if family.startswith("gemma") else {}))
    path = tmp_path / "bad.gguf"
    write_gguf(path, hf, arch=family, meta=meta, extra=extra)
    assert_refused(path, named, tmp_path, capsys)


@pytest.mark.parametrize("name", ["phi3-longrope", "gemma2", "olmo2"])
@torch.no_grad()
def test_blocks_stay_blocks(name, tmp_path):
    """Q8_0 matrices (phi3's fused attn_qkv and [gate; up] ffn_up among them) multiplied as shipped;
    the reference path on the same blocks gives transformers' logits on the weights as written."""
    from dialogen.models.kernels import library
    from dialogen.models.native import BlockLinear

    (family, config), arch, meta, extra = CASES[name]
    hf = tiny_hf(family, **{"max_position_embeddings": 256, **IDS_IN_VOCAB, **config})
    import gguf

    write_gguf(tmp_path / "names.gguf", hf, arch=arch, meta=meta, extra=extra)  # llama.cpp's names of the matrices
    types = {t.name: "Q8_0" for t in gguf.GGUFReader(str(tmp_path / "names.gguf")).tensors if len(t.shape) == 2}
    path = tmp_path / "q8.gguf"
    written = write_gguf(path, hf, arch=arch, meta=meta, extra=extra, types=types)
    if hf.config.tie_word_embeddings:
        written["lm_head.weight"] = written["model.embed_tokens.weight"]
    want = with_weights(hf, written)(IDS).logits
    model = load(str(path), "auto").model
    assert isinstance(model.blocks[0].attn.qkv, BlockLinear) and isinstance(model.blocks[0].mlp.gate_up, BlockLinear)
    assert (model(IDS) - want).abs().max() < 0.1 * want.abs().max()  # activations rounded to 8 bits in the kernels
    with library.disabled():
        assert (model(IDS) - want).abs().max() < 1e-4
