"""Every GGUF format the kernels take (`kernels.formats.FORMATS`), on random valid blocks: dequantized
exactly as the gguf package dequantizes them, multiplied like x @ dequantized.T, and the same on
every SIMD path."""

import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dialogen.models.kernels import formats, library, ops

pytestmark = pytest.mark.skipif(not library.enabled(), reason="no C compiler: the native kernels are not built")

# byte offset and range of each f16 scale in a block, per format (the rest of a block is random bits)
SCALES = {"q4_0": [(0, -0.1, 0.1)], "q8_0": [(0, -0.02, 0.02)], "q5_0": [(0, -0.1, 0.1)],
          "iq4_nl": [(0, -0.01, 0.01)], "q4_1": [(0, 0, 0.1), (2, -0.5, 0.5)], "q5_1": [(0, 0, 0.05), (2, -0.5, 0.5)],
          "q2_k": [(80, 0, 0.05), (82, 0, 0.05)], "q3_k": [(108, -0.01, 0.01)], "q4_k": [(0, 0, 0.01), (2, 0, 0.01)],
          "q5_k": [(0, 0, 0.005), (2, 0, 0.01)], "q6_k": [(208, -0.005, 0.005)], "iq4_xs": [(0, -0.002, 0.002)]}
TYPES = sorted(formats.FORMATS)


def random_blocks(t: int, n: int, k: int, rng) -> torch.Tensor:
    """(n, k) weights of GGUF type t as blocks: random quant bits, small finite f16 scales."""
    f = formats.FORMATS[t]
    count = n * k // f.block
    if f.name == "f16":
        b = rng.standard_normal(count).astype(np.float16).view(np.uint8)
    elif f.name == "bf16":
        b = (rng.standard_normal(count).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        b = rng.integers(0, 256, size=(count, f.bytes), dtype=np.uint8)
        for at, lo, hi in SCALES[f.name]:
            b[:, at:at + 2] = rng.uniform(lo, hi, count).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(np.ascontiguousarray(b).reshape(n, -1))


def reference(t: int, blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    import gguf
    from gguf.quants import dequantize

    w = dequantize(blocks.numpy(), gguf.GGMLQuantizationType(t))
    return torch.from_numpy(np.asarray(w, dtype=np.float32)).reshape(n, k)


def shape(t: int) -> tuple[int, int]:
    """a weight shape for type t: 768 inputs (3 super-blocks), or 224 (7 blocks: a short last unit of 8);
    32 outputs, two of the groups of 16 the AVX-512 build takes prompt rows by"""
    return (32, 768) if formats.FORMATS[t].block in (1, 256) else (32, 224)


def test_the_format_table_is_the_kernels_own():
    L = library.lib()
    for t, f in formats.FORMATS.items():
        assert (L.block_bytes(t), L.block_values(t)) == (f.bytes, f.block), f.name
    assert L.block_bytes(16) == 0  # IQ2_XXS: not one of them


@pytest.mark.parametrize("t", TYPES, ids=[formats.FORMATS[t].name for t in TYPES])
def test_dequantize_equals_gguf(t):
    """Bit for bit: the kernels compute each weight as gguf.quants does (scale times level, less the
    minimum), in float32."""
    n, k = shape(t)
    blocks = random_blocks(t, n, k, np.random.default_rng(t))
    ref = reference(t, blocks, n, k)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    assert torch.equal(formats.dequantize(t, blocks, n, k), ref)


def rounded_like_the_kernels(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels multiply it: per 32 values, int8 levels of the scale max|x|/127, times it."""
    g = x.reshape(x.shape[0], -1, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros(()))
    return (torch.round(g * inv) * d).reshape(x.shape)


@pytest.mark.parametrize("t", TYPES, ids=[formats.FORMATS[t].name for t in TYPES])
def test_product_equals_the_dequantized_weight_product(t):
    """qmatmul against x @ dequantize(blocks).T, 1 row (decode) to 21 (prompt rows, past the kernels'
    groups of 4, 8 and 16), with a bias. The quantized formats take x rounded to int8 per 32 values: with
    that rounding done here too, only float summation order differs; against the float x the error
    is at most sum |w| * |x - rounded x| per output. F16/BF16 take the float activations."""
    n, k = shape(t)
    g = torch.Generator().manual_seed(t)
    blocks = random_blocks(t, n, k, np.random.default_rng(t + 100))
    w, bias = reference(t, blocks, n, k).double(), torch.randn(n, generator=g)
    floats = formats.FORMATS[t].block == 1
    for rows in (1, 2, 21):
        x = torch.randn(rows, k, generator=g)
        got = ops.qmatmul(t, blocks, n, k, x, bias=bias).double()
        xr = x if floats else rounded_like_the_kernels(x)
        ref = xr.double() @ w.T + bias
        assert (got - ref).abs().max() < 1e-5 * ref.abs().max()
        bound = (x - xr).double().abs() @ w.abs().T
        assert ((got - (x.double() @ w.T + bias)).abs() <= bound + 1e-5 * ref.abs().max()).all()


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "bf16"])
def test_fused_norm_swiglu_and_residual(name):
    t = formats.GGML_TYPES[name]
    n, k = shape(t)
    g = torch.Generator().manual_seed(2)
    blocks = random_blocks(t, n, k, np.random.default_rng(2))
    w = reference(t, blocks, n, k)
    x, norm = torch.randn(3, k, generator=g), torch.rand(k, generator=g) + 0.5
    ref = F.rms_norm(x, (k,), norm, 1e-5) @ w.T
    got = ops.qmatmul(t, blocks, n, k, x, norm=norm, eps=1e-5)
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()
    gu = torch.randn(3, 2 * k, generator=g)
    ref = (F.silu(gu[:, :k]) * gu[:, k:]) @ w.T
    got = ops.qmatmul(t, blocks, n, k, gu, swiglu=True)
    assert (got - ref).abs().max() < 2e-2 * ref.abs().max()  # heavier-tailed inputs round coarser
    acc = torch.randn(3, n, generator=g)
    expected = acc + x @ w.T
    ops.qmatmul(t, blocks, n, k, x, out=acc)
    assert (acc - expected).abs().max() < 1e-2 * expected.abs().max()


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # AVX2 + FMA + F16C without VNNI; plain C
def test_every_simd_path_gives_the_native_results(march, monkeypatch):
    """The AVX2 and plain C builds against this machine's: the same integer sums (the AVX2 build
    multiplies IQ4's levels signed, where its byte multiply-add would saturate on them offset), so
    products agree to float summation order and dequantized weights exactly."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the variants are x86-64 targets")
    variant = library.load_library(march)
    assert variant is not None, f"cc -march={march} failed"
    rng, g = np.random.default_rng(5), torch.Generator().manual_seed(5)
    cases = []
    for t in TYPES:
        n, k = shape(t)
        blocks = random_blocks(t, n, k, rng)
        cases += [(t, blocks, n, k, torch.randn(rows, k, generator=g) * 2) for rows in (1, 3, 17)]

    def run():
        return [(ops.qmatmul(t, b, n, k, x), formats.dequantize(t, b, n, k)) for t, b, n, k, x in cases]

    native = run()
    monkeypatch.setattr(library, "_lib", variant)
    other = run()
    for (t, *_), (pa, da), (pb, db) in zip(cases, native, other):
        name = formats.FORMATS[t].name
        assert torch.equal(da, db), name
        assert (pa - pb).abs().max() <= 1e-5 * pa.abs().max(), name


@torch.no_grad()
def test_a_gguf_of_float_and_5_bit_matrices_decodes_from_them_as_shipped(tiny_llama, tmp_path):
    """F16, BF16, Q5_0 and Q5_1 matrices are kept as the file ships them (no float copy) and the
    swapped-in model decodes like transformers on the weights as written."""
    import copy

    from test_engine import _write_gguf

    from dialogen.models.loading import default_model_path, load, read_gguf

    path, ref = tiny_llama
    _, meta = read_gguf(default_model_path())
    per_layer = {"attn_q": "F16", "attn_k": "F16", "attn_v": "F16", "attn_output": "BF16", "ffn_gate": "Q5_0",
                 "ffn_up": "Q5_0", "ffn_down": "Q5_1"}
    types = {"token_embd.weight": "F16", "output.weight": "BF16",
             **{f"blk.{i}.{n}.weight": t for i in range(2) for n, t in per_layer.items()}}
    written = _write_gguf(tmp_path / "tiny.gguf", ref, meta, types)
    theirs = copy.deepcopy(ref)
    theirs.load_state_dict(written)
    model = load(str(tmp_path / "tiny.gguf"), "auto").model
    b = model.blocks[0]
    kinds = (b.attn.qkv.kind, b.attn.o_proj.kind, b.mlp.gate_up.kind, b.mlp.down.kind, model.lm_head.kind)
    assert kinds == ("f16", "bf16", "q5_0", "q5_1", "bf16")
    ids = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(1)
    model(ids[:, :16], cache)
    steps = torch.stack([model(ids[:, t:t + 1], cache)[0, -1] for t in range(16, 20)])
    full = theirs(ids).logits[0, 16:]
    assert (steps - full).abs().max() < 0.05 * full.abs().max()
