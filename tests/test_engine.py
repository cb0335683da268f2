"""The decode engine: native kernels against plain torch, quantized weights against float32, the
server's batched step against single steps, and GGUF blocks kept exactly as shipped."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dialogen.errors import UserError
from dialogen.models.kernels import formats, library, ops
from dialogen.models.loading import load
from dialogen.models.native import BlockEmbedding, BlockLinear, HalfLinear
from dialogen.models.transformer import CacheBatch, rope_tables

pytestmark = pytest.mark.skipif(not library.enabled(), reason="no C compiler: the native kernels are not built")

KINDS = ["q4_0", "q4_1", "q8_0"]


def _ids(n, seed=0, vocab=49152):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _q4_0(w: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks as llama.cpp writes them: d = max-magnitude / -8, q = round(w / d) + 8."""
    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    idx = g.abs().argmax(-1, keepdim=True)
    d = (g.gather(-1, idx) / -8).squeeze(-1).half()
    inv = torch.where(d.float() != 0, 1 / d.float(), torch.zeros(()))
    q = (g * inv[..., None] + 8.5).floor().clamp(0, 15).to(torch.uint8)
    nib = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([d.view(torch.uint8).reshape(n, -1, 2), nib], -1).reshape(n, -1).contiguous()


def _blocks(w, kind):
    return _q4_0(w) if kind == "q4_0" else formats.quantize(w, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_block_product_equals_the_dequantized_weight_product(kind):
    """The kernel multiplies the blocks' own values: against dequantize(blocks) @ x, the only error
    is the activations' int8 rounding (under 1% of the output scale), for any number of rows."""
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(96, 128, generator=g), torch.randn(96, generator=g)
    blocks = _blocks(w, kind)
    t = formats.GGML_TYPES[kind]
    wd = formats.dequantize(t, blocks, 96, 128)
    assert (wd - w).abs().max() < (0.1 if kind == "q8_0" else 0.8)
    for rows in (1, 3, 70):
        x = torch.randn(rows, 128, generator=g)
        got = ops.qmatmul(t, blocks, 96, 128, x, bias=bias)
        ref = x @ wd.T + bias
        assert (got - ref).abs().max() < 1e-2 * ref.abs().max()


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_int8_from_4_bit_blocks_rounds_less_than_from_their_floats(kind):
    """`--dtype int8` on a 4-bit file moves each block onto the 8-bit grid from the blocks: Q4_0
    exactly, Q4_1 with no block further from the values than quantizing their floats afresh, and
    less in all."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) + 0.3 * torch.rand(64, 256, generator=g)
    src = _blocks(w, kind)
    values = formats.dequantize(formats.GGML_TYPES[kind], src, 64, 256)
    moved = formats.dequantize(8, formats.requantize_q8_0(kind, src, 64, 256), 64, 256)
    afresh = formats.dequantize(8, formats.quantize(values, "q8_0"), 64, 256)
    ours, theirs = ((x - values).view(64, 8, 32).square().sum(-1) for x in (moved, afresh))
    if kind == "q4_0":
        assert torch.equal(moved, values)
    assert (ours <= theirs + 1e-12).all() and ours.sum() < 0.5 * theirs.sum()


@pytest.mark.parametrize("kind", KINDS)
def test_tiled_weights_give_the_blocks_products(kind):
    """`tile` reorders the blocks (16 output rows together); products through it are the blocks'
    own integer sums, for any number of activation rows, with a bias and accumulating."""
    g = torch.Generator().manual_seed(5)
    w, bias = torch.randn(48, 160, generator=g), torch.randn(48, generator=g)
    blocks, t = _blocks(w, kind), formats.GGML_TYPES[kind]
    tiled = formats.tile(t, blocks, 48, 160)
    if tiled is None:
        pytest.skip("this build multiplies the blocks as they are")
    assert formats.tile(t, blocks[:40], 40, 160) is None  # 40 rows are not whole groups of 16
    for rows in (1, 2, 8, 9, 17):
        x = torch.randn(rows, 160, generator=g) * 3
        want = ops.qmatmul(t, blocks, 48, 160, x, bias=bias)
        got = ops.qmatmul(t | formats.TILED, tiled, 48, 160, x, bias=bias)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        acc = torch.randn(rows, 48, generator=g)
        expected = acc + ops.qmatmul(t, blocks, 48, 160, x)
        ops.qmatmul(t | formats.TILED, tiled, 48, 160, x, out=acc)
        assert (acc - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_failed_scratch_allocation_is_a_memory_error():
    """A product whose scratch memory cannot be allocated returns OUT_OF_MEMORY before it touches its
    arguments (2**52 bytes exceed any x86-64 or arm64 address space), and Python raises MemoryError."""
    status = library.lib().qmatmul(8, None, 32, 1 << 20, None, 1 << 30, None, None, 0, None, 0.0, 0, 1)
    assert status == library.OUT_OF_MEMORY
    with pytest.raises(MemoryError, match="qmatmul"):
        library.check(status, "qmatmul")


@pytest.mark.parametrize("kind", KINDS)
def test_fused_norm_swiglu_and_residual_equal_the_torch_ops(kind):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g)
    blocks, t = _blocks(w, kind), formats.GGML_TYPES[kind]
    wd = formats.dequantize(t, blocks, 64, 96)
    x, norm = torch.randn(2, 96, generator=g), torch.rand(96, generator=g) + 0.5
    ref = F.rms_norm(x, (96,), norm, 1e-5) @ wd.T
    got = ops.qmatmul(t, blocks, 64, 96, x, norm=norm, eps=1e-5)
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()
    gu = torch.randn(2, 192, generator=g)
    ref = (F.silu(gu[:, :96]) * gu[:, 96:]) @ wd.T
    got = ops.qmatmul(t, blocks, 64, 96, gu, swiglu=True)
    assert (got - ref).abs().max() < 2e-2 * ref.abs().max()  # heavier-tailed inputs round coarser
    acc = torch.randn(2, 64, generator=g)
    expected = acc + x @ wd.T
    ops.qmatmul(t, blocks, 64, 96, x, out=acc)
    assert (acc - expected).abs().max() < 1e-2 * expected.abs().max()


@pytest.mark.parametrize("march", [None, "x86-64-v3", "x86-64"])  # this machine's build, AVX2, plain C
def test_dequantize_into_bfloat16_is_torchs_rounding_bit_for_bit(march, monkeypatch):
    """The bfloat16 copy of a frozen base's weight (a LoRA run's `--compute-dtype bfloat16`) is made
    straight from the blocks, tiled or not, and holds what float32 dequantizing and `.to(bfloat16)`
    give, to the bit; F16 weights bring the subnormals and infinities through as torch does."""
    import platform

    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 160, generator=g)
    cases = [(formats.GGML_TYPES[kind], _blocks(w, kind)) for kind in KINDS]
    cases += [(t | formats.TILED, formats.tile(t, [b], 48, 160)) for t, b in cases]  # by this machine's build
    half = w.half()
    half[0, :4] = torch.tensor([1e-7, -6e-8, float("inf"), -float("inf")])
    cases.append((formats.GGML_TYPES["f16"], half.view(torch.uint8)))
    if march is not None:
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("the variants are x86-64 targets")
        monkeypatch.setattr(library, "_lib", library.load_library(march))
    for t, blocks in cases:
        want = formats.dequantize(t, blocks, 48, 160).to(torch.bfloat16)
        got = formats.dequantize(t, blocks, 48, 160, out=torch.full((48, 160), float("nan"), dtype=torch.bfloat16))
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), t


def test_default_model_blocks_are_kept_exactly_as_shipped():
    """The GGUF file's Q4_1/Q8_0 blocks reach the kernels unchanged (or only reordered, tiled):
    dequantizing what the kernels multiply gives the gguf package's own dequantization of the file,
    bit for bit (rows put back in rotary order)."""
    import gguf

    from dialogen.models.gguf_file import unpermute_rows
    from dialogen.models.loading import default_model_path

    model = load(None, "auto").model
    reader = gguf.GGUFReader(str(default_model_path()))
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.cfg
    for name, lin, rows in [("blk.3.ffn_down.weight", model.blocks[3].mlp.down, slice(None)),
                            ("blk.0.attn_k.weight", model.blocks[0].attn.qkv,
                             slice(cfg.n_head * cfg.head_dim, (cfg.n_head + cfg.n_kv_head) * cfg.head_dim)),
                            ("token_embd.weight", model.lm_head, slice(None))]:
        t = tensors[name]
        theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        if "attn_k" in name:
            theirs = unpermute_rows(theirs, cfg.n_kv_head)
        ours = formats.dequantize(lin.product_type, lin.blocks, lin.out_features, lin.in_features)  # as multiplied
        assert torch.equal(ours[rows], theirs), name
    assert model.blocks[0].mlp.gate_up.kind == "q4_1" and model.lm_head.kind == "q8_0"


@pytest.fixture(scope="module")
def default_fp32():
    return load(None, "float32")


@pytest.mark.parametrize("dtype,tol", [("float16", 0.005), ("bfloat16", 0.03), ("int8", 0.09), ("int4", 0.07),
                                       ("auto", 0.07)])
@torch.no_grad()
def test_each_decode_dtype_stays_near_float32(default_fp32, dtype, tol):
    """Decode-step logits of every dtype against float32, as the largest error over the largest logit.
    Measured on the default model's real weights (about 0.15%, 1.3%, 6.3%, 4.7%, 4.7%; with blocks the
    prompt's products are integer ones too, so the cache carries their rounding): a tiny random
    model amplifies any rounding through its saturated attention, so it cannot tell a bug from noise.
    The perplexity these dtypes cost is in the README (bench/quant_quality.py)."""
    base, other = default_fp32.model, load(None, dtype).model
    ids = torch.tensor([default_fp32.tokenizer.encode_text("The capital of France is Paris. The capital of Italy is")])
    ca, cb = base.new_cache(1), other.new_cache(1)
    base(ids[:, :-4], ca), other(ids[:, :-4], cb)
    for t in range(ids.shape[1] - 4, ids.shape[1]):
        a, b = base(ids[:, t:t + 1], ca)[0, -1], other(ids[:, t:t + 1], cb)[0, -1]
        assert (a - b).abs().max() < tol * a.abs().max(), (dtype, t)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@torch.no_grad()
def test_greedy_tokens_equal_float32_where_the_dtype_is_exact_enough(default_fp32, dtype):
    """On the default model, float16 decode steps pick float32's greedy tokens. int8 does too, step by
    step on float32's reply, wherever float32's best two tokens are at least 0.5 apart (int8's
    logits are up to ~1 off, its prompt's included): closer calls (0.04, 0.19 and 0.23 here) go
    either way with the summation order of the products (the thread count, the kernel)."""
    from dialogen.decoding.generate import Generation
    from dialogen.decoding.settings import Sampling

    base, tok = default_fp32.model, default_fp32.tokenizer
    other = load(None, dtype).model
    prompt = tok.encode_text("The capital of France is Paris. The capital of Italy is")
    s = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=12)
    a = Generation(base, tok, prompt, base.new_cache(1), s, stop_ids=set()).run()
    if dtype == "float16":
        assert Generation(other, tok, prompt, other.new_cache(1), s, stop_ids=set()).run().tokens == a.tokens
        return
    ca, cb = base.new_cache(1), other.new_cache(1)
    checked = 0
    for ids, want in zip([prompt] + [[t] for t in a.tokens[:-1]], a.tokens):
        top = base(torch.tensor([ids]), ca)[0, -1].topk(2).values
        picked = int(other(torch.tensor([ids]), cb)[0, -1].argmax())
        if top[0] - top[1] >= 0.5:
            assert picked == want
            checked += 1
    assert checked >= 8


@torch.no_grad()
def test_swapped_model_agrees_with_the_no_kernels_reference(monkeypatch):
    """Loaded with --no-kernels, the default model is the reference (nothing swapped in). The
    swapped-in model (its blocks, native attention, fused blocks) gives decode-step logits within
    the block rounding's tolerance of it (as `test_each_decode_dtype_stays_near_float32`), and with
    the kernels off computes the reference math on the file's values: the same logits."""
    from dialogen.models.layers import Embedding, Linear, RMSNorm
    from dialogen.models.native import FusedBlock, NativeAttention
    from dialogen.models.transformer import MLP, Attention, Block, Transformer

    monkeypatch.setenv("DIALOGEN_KERNELS", "0")
    loaded = load(None, "float32")
    monkeypatch.delenv("DIALOGEN_KERNELS")
    reference, tok = loaded.model, loaded.tokenizer
    assert reference.native is None
    assert {type(m) for m in reference.modules()} == {Transformer, torch.nn.ModuleList, Block, Attention, MLP, Linear,
                                                     RMSNorm, Embedding}
    swapped = load(None, "auto").model
    assert swapped.native.blocks and swapped.native.attention
    assert all(type(b) is FusedBlock and type(b.attn) is NativeAttention for b in swapped.blocks)
    ids = torch.tensor([tok.encode_text("The capital of France is Paris. The capital of Italy is")])
    ca, cb = reference.new_cache(1), swapped.new_cache(1)
    reference(ids[:, :-4], ca), swapped(ids[:, :-4], cb)
    for t in range(ids.shape[1] - 4, ids.shape[1]):
        a, b = reference(ids[:, t:t + 1], ca)[0, -1], swapped(ids[:, t:t + 1], cb)[0, -1]
        assert (a - b).abs().max() < 0.07 * a.abs().max(), t
    with library.disabled():
        assert torch.equal(swapped(ids), reference(ids))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@torch.no_grad()
def test_native_step_equals_the_plain_torch_step(request, fixture, dtype):
    """The native decode step (rotary, cache write and attention fused in one call per layer) against
    the plain torch path on the same weights. The block products have their own tests above."""
    path, _ = request.getfixturevalue(fixture)
    model = load(str(path), dtype).model
    ids = _ids(20, seed=3)
    with library.disabled():
        cache = model.new_cache(1)
        model(ids[:, :12], cache)
        plain = [model(ids[:, t:t + 1], cache)[0, -1] for t in range(12, 20)]
    cache = model.new_cache(1)
    model(ids[:, :12], cache)
    native = [model(ids[:, t:t + 1], cache)[0, -1] for t in range(12, 20)]
    for a, b in zip(plain, native):
        scale = a.abs().max()
        assert (a - b).abs().max() < (1e-4 if dtype == "float32" else 2e-3) * scale  # float16 rounds outputs


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@torch.no_grad()
def test_prompts_and_decode_rows_in_one_step_equal_separate_calls(request, fixture):
    """A CacheBatch with several new tokens for some caches (prompts, or chunks of them) and one for
    others (decode rows): each cache's next-token logits and its cache's contents equal feeding it
    alone."""
    from dialogen.serve.batching import step_rows

    path, _ = request.getfixturevalue(fixture)
    model = load(str(path), "int8").model
    pasts, news = [0, 9, 0, 30, 4], [7, 1, 1, 12, 1]
    segs, alone, want = [], [], []
    for i, (p, n) in enumerate(zip(pasts, news)):
        ids = _ids(p + n, seed=40 + i)
        a, b = model.new_cache(1), model.new_cache(1)
        if p:
            model(ids[:, :p], a), model(ids[:, :p], b)
        segs.append((a, ids[0, p:].tolist()))
        want.append(model(ids[:, p:], b)[0, -1])
        alone.append(b)
    got = step_rows(model, segs)
    for i, ((a, _), b) in enumerate(zip(segs, alone)):
        assert (got[i] - want[i]).abs().max() < 1e-4 * want[i].abs().max()
        assert a.length == b.length
        assert torch.allclose(a.kv[..., : a.length, :], b.kv[..., : b.length, :], atol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("lengths", [(5, 17, 120), tuple(range(3, 60, 5))])
@torch.no_grad()
def test_served_batch_step_equals_separate_single_steps(request, fixture, lengths):
    """Conversations of different lengths stepped together (one attention call per layer over their
    own caches) give each the logits it gets alone, and advance each cache by one."""
    path, _ = request.getfixturevalue(fixture)
    model = load(str(path), "int8").model
    prompts = [_ids(n, seed=10 + n)[0] for n in lengths]
    caches = [model.new_cache(1) for _ in prompts]
    alone = [model.new_cache(1) for _ in prompts]
    for p, c, d in zip(prompts, caches, alone):
        model(p[None, :-1], c), model(p[None, :-1], d)
    last = torch.tensor([int(p[-1]) for p in prompts])[:, None]
    batched = model(last, CacheBatch(caches))[:, -1]
    for i, d in enumerate(alone):
        single = model(last[i:i + 1], d)[0, -1]
        assert torch.allclose(batched[i], single, atol=1e-5, rtol=0)
        assert caches[i].length == d.length == len(prompts[i])


@torch.no_grad()
def test_left_padded_batch_decodes_like_single_rows_on_the_native_path(tiny_llama):
    from dialogen.decoding.batch import generate_batch
    from dialogen.decoding.generate import Generation
    from dialogen.decoding.settings import Sampling

    path, _ = tiny_llama
    loaded = load(str(path), "int8")
    s = Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=6)
    prompts = [_ids(n, seed=n)[0].tolist() for n in (4, 11)]
    rows = generate_batch(loaded.model, prompts, s, stop_ids=set())
    for p, row in zip(prompts, rows):
        alone = Generation(loaded.model, loaded.tokenizer, p, loaded.model.new_cache(1), s, stop_ids=set()).run()
        assert row.tokens == alone.tokens


def test_int4_on_widths_that_do_not_divide_the_group_is_a_one_line_error(tmp_path, smol_tokenizer):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=smol_tokenizer.vocab_size, hidden_size=48, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    smol_tokenizer.save(tmp_path)
    with pytest.raises(UserError, match=r"--dtype int4 needs input widths that are multiples of 32 \(this model has 48\)"):
        load(str(tmp_path), "int4")
    assert isinstance(load(str(tmp_path), "auto").model.blocks[0].mlp.down, HalfLinear)  # auto falls back to float16


def test_no_kernels_flag_decodes_on_the_plain_path(tiny_llama, tmp_path, monkeypatch, capsys):
    """`--no-kernels` turns the native path off: the same greedy reply, from the torch path."""
    import json

    from dialogen.cli import main

    monkeypatch.setenv("DIALOGEN_KERNELS", "1")  # restored after the test: --no-kernels sets it to 0
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "Hello there"}]))
    common = ["generate", str(msgs), "--model", str(tiny_llama[0]), "--template", "chatml", "--dtype", "float32",
              "--temperature", "0", "--max-new-tokens", "6"]
    assert main(common) == 0
    native = json.loads(capsys.readouterr().out)
    assert main(common + ["--no-kernels"]) == 0 and not library.enabled()
    assert json.loads(capsys.readouterr().out)["reply"] == native["reply"]
    assert main(common[:-6] + ["--dtype", "int8", "--no-kernels"]) == 2
    assert "--dtype int8 needs the native decode kernels" in capsys.readouterr().err


def _write_gguf(path, hf_model, meta: dict, types: dict):
    """A llama GGUF of `hf_model` as llama.cpp's converter lays it out (q/k rows permuted for its
    rotary), each tensor in types[name] (default F32); returns the weights as written, dequantized."""
    import gguf

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)  # the tiny model's (conftest)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    written = {}
    for hf_name, t in hf_model.state_dict().items():
        stem = hf_name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            i, rest = stem.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{i}.{per_layer[rest]}.weight"
        else:
            name = f"{names[stem]}.weight"
        a = t.detach().float().numpy()
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(name.split(".")[-2])
        if heads:  # llama.cpp's order: the two rotary halves of each head interleaved
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(a.shape)
        kind = gguf.GGMLQuantizationType[types.get(name, "F32")]
        data = gguf.quants.quantize(np.ascontiguousarray(a), kind) if kind.name != "F32" else a
        w.add_tensor(name, data, raw_dtype=kind)
        back = gguf.quants.dequantize(data, kind).reshape(a.shape) if kind.name != "F32" else a
        if heads:
            back = back.reshape(heads, back.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
        written[hf_name] = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@torch.no_grad()
def test_gguf_read_directly_matches_transformers_and_keeps_its_blocks(tiny_llama, tmp_path, capsys):
    """A GGUF mixing Q4_0, Q4_1, Q8_0, Q5_1 and MXFP4 tensors: the reference model (float32) equals
    transformers on the weights as written; the swapped-in model multiplies the natively kept
    layouts as blocks, and with the kernels off computes the reference math on the same values;
    MXFP4 (not a kernel format) is dequantized, and a line says so."""
    import copy

    from dialogen.models.loading import default_model_path, read_gguf

    path, ref = tiny_llama
    _, meta = read_gguf(default_model_path())
    types = {"token_embd.weight": "Q8_0", "output.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_1",
             "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "Q4_1", "blk.1.attn_q.weight": "Q4_0",
             "blk.1.attn_k.weight": "Q4_1", "blk.1.attn_v.weight": "MXFP4", "blk.0.ffn_down.weight": "Q4_0",
             "blk.1.attn_output.weight": "Q8_0", "blk.0.ffn_gate.weight": "Q4_1", "blk.0.ffn_up.weight": "Q4_1",
             "blk.1.ffn_gate.weight": "Q5_1", "blk.1.ffn_up.weight": "Q5_1"}
    written = _write_gguf(tmp_path / "tiny.gguf", ref, meta, types)
    theirs = copy.deepcopy(ref)
    theirs.load_state_dict(written)
    reference = load(str(tmp_path / "tiny.gguf"), "float32").model
    model = load(str(tmp_path / "tiny.gguf"), "auto").model
    assert "MXFP4 tensors are dequantized" in capsys.readouterr().err
    ids = _ids(24, seed=9)
    with library.disabled():
        assert (reference(ids) - theirs(ids).logits).abs().max() < 1e-4
    b0, b1 = model.blocks
    assert (b0.attn.qkv.kind, b0.mlp.gate_up.kind, b0.mlp.down.kind, model.lm_head.kind) == ("q4_1", "q4_1", "q4_0", "q8_0")
    assert b1.attn.o_proj.kind == "q8_0" and b1.attn.qkv.kind == "q8_0"  # mixed q/k/v: quantized here (auto: int8)
    assert b1.mlp.gate_up.kind == "q5_1"
    qkv = b0.attn.qkv.reference_weight()  # the values the kernels multiply
    assert torch.equal(qkv, reference.blocks[0].attn.qkv.weight)  # the file's own values, in rotary order
    with library.disabled():  # block 1's q/k/v were quantized at load: the reference on their Q8_0 values
        assert (model(ids) - theirs(ids).logits).abs().max() < 0.05 * theirs(ids).logits.abs().max()
    cache = model.new_cache(1)
    model(ids[:, :20], cache)
    steps = torch.stack([model(ids[:, t:t + 1], cache)[0, -1] for t in range(20, 24)])
    full = theirs(ids).logits[0, 20:]
    assert (steps - full).abs().max() < 0.05 * full.abs().max()


@pytest.fixture
def mixed_gguf(tiny_llama, tmp_path):
    from dialogen.models.loading import default_model_path, read_gguf

    _, meta = read_gguf(default_model_path())
    types = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_1", "blk.0.attn_k.weight": "Q4_1",
             "blk.0.attn_v.weight": "Q4_1", "blk.1.ffn_down.weight": "Q4_0", "blk.1.attn_output.weight": "Q8_0"}
    _write_gguf(tmp_path / "tiny.gguf", tiny_llama[1], meta, types)
    return tmp_path / "tiny.gguf"


@torch.no_grad()
def test_block_linears_hold_no_float_weight(tiny_llama, tmp_path):
    """Swapped in from a GGUF file whose matrices are all blocks, every Linear keeps only the blocks
    (and their tiled order): no float32 copy of a weight exists, and chat never makes one."""
    from dialogen.models.loading import default_model_path, read_gguf

    _, meta = read_gguf(default_model_path())
    per_layer = {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1", "attn_output": "Q8_0", "ffn_gate": "Q4_0",
                 "ffn_up": "Q4_0", "ffn_down": "Q4_1"}
    types = {"token_embd.weight": "Q8_0", "output.weight": "Q8_0",
             **{f"blk.{i}.{n}.weight": t for i in range(2) for n, t in per_layer.items()}}
    _write_gguf(tmp_path / "blocks.gguf", tiny_llama[1], meta, types)
    model = load(str(tmp_path / "blocks.gguf"), "auto").model
    linears = [m for m in model.modules() if isinstance(m, BlockLinear)]
    assert len(linears) == 9 and {m.kind for m in linears} == {"q4_0", "q4_1", "q8_0"}
    assert all(m.shipped is None and not hasattr(m, "weight") for m in linears)
    assert all(b.dtype == torch.uint8 for b in model.buffers())  # blocks and their tiled order only

    def float_matrices():
        return {n for n, p in model.named_parameters() if p.dim() == 2}

    assert isinstance(model.embed, BlockEmbedding) and model.embed.kind == "q8_0"
    assert float_matrices() == set()  # the token embedding too: a lookup dequantizes its rows
    cache = model.new_cache(1)
    model(_ids(12, seed=4), cache)
    model(_ids(1, seed=5), cache)
    assert float_matrices() == set() and model.native is not None


@pytest.mark.parametrize("dtype", ["auto", "int8"])
def test_state_dict_and_training_see_the_weights_as_shipped(mixed_gguf, dtype):
    """A swapped model's state dict has the reference's keys and the float32 values of a float32
    load of the same file (blocks dequantized; blocks made at load do not stand in for the file's
    weights); `train()` puts the reference modules back with those weights, trainable."""
    eager = load(str(mixed_gguf), "float32").model
    swapped = load(str(mixed_gguf), dtype).model
    assert swapped.blocks[0].attn.qkv.kind == ("q4_1" if dtype == "auto" else "q8_0")
    ours, theirs = swapped.state_dict(), eager.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert swapped.native is not None  # saving does not unswap
    trained = swapped.train()
    assert trained.native is None
    assert not any(isinstance(m, (BlockLinear, BlockEmbedding, HalfLinear)) for m in trained.modules())
    assert type(trained.blocks[0]).__name__ == "Block" and type(trained.blocks[0].attn).__name__ == "Attention"
    params = dict(trained.named_parameters())
    assert params.keys() == dict(eager.named_parameters()).keys()
    assert all(torch.equal(p, theirs[n]) and p.requires_grad for n, p in params.items())
    trained(_ids(10, seed=2)).logsumexp(-1).mean().backward()
    assert trained.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # AVX2 + FMA + F16C without VNNI; plain C
@torch.no_grad()
def test_every_simd_path_gives_the_native_results(march, monkeypatch):
    """The kernels built for an older CPU (the AVX2 path, the plain C path) against this machine's
    build: block products of 1 to 9 rows and a whole fused decode step of the default model."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the variants are x86-64 targets")
    variant = library.load_library(march)
    assert variant is not None, f"cc -march={march} failed"
    g = torch.Generator().manual_seed(3)
    cases = []
    for kind in KINDS:
        w = torch.randn(40, 96, generator=g)
        for rows in (1, 3, 9):
            cases.append((formats.GGML_TYPES[kind], _blocks(w, kind), torch.randn(rows, 96, generator=g)))
    model = load(None, "auto").model
    ids = torch.tensor([[1, 504, 2030, 30, 3510, 28, 253, 4135]])

    def run():
        prods = [ops.qmatmul(t, b, 40, 96, x) for t, b, x in cases]
        cache = model.new_cache(1)
        model(ids[:, :-2], cache)
        x = model.embed(ids[:, 6:7])
        fork = cache.copy()
        fork.reserve(1)
        block = model.blocks[0](x, model._step(1, 1, rope_tables(model.cfg, fork.positions(1, 1)), fork, None))
        steps = [model(ids[:, t:t + 1], cache)[0, -1] for t in (6, 7)]
        return prods, [block], steps

    native = run()
    monkeypatch.setattr(library, "_lib", variant)
    other = run()
    for a, b in zip(native[0] + native[1], other[0] + other[1]):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()  # the same integer sums; only float order differs
    for a, b in zip(native[2], other[2]):  # through 30 layers, float order can flip int8 roundings of the
        assert (a - b).abs().max() <= 0.05 * a.abs().max()  # activations: as far apart as from float32
        assert a.argmax() == b.argmax()
