"""Our transformer against transformers' on the same Hugging Face directories."""

import pytest
import torch

from dialogen.models.loading import load

ARCHS = ["tiny_llama", "tiny_gpt2"]


@pytest.fixture(params=ARCHS)
def pair(request):
    path, ref = request.getfixturevalue(request.param)
    return load(str(path)).model, ref


def _ids(n, seed=0, vocab=49152):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_full_forward_matches_transformers(pair):
    ours, ref = pair
    ids = _ids(40)
    diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff < 1e-4


@torch.no_grad()
def test_cached_incremental_decoding_matches_full_forward(pair):
    ours, ref = pair
    ids = _ids(30, seed=1)
    expected = ref(ids).logits[0]
    cache = ours.new_cache(1)
    got = [ours(ids[:, :10], cache)[0]]  # a prefill chunk, then chunks of 7 and single tokens
    got.append(ours(ids[:, 10:17], cache)[0])
    for t in range(17, 30):
        got.append(ours(ids[:, t:t + 1], cache)[0])
    assert cache.length == 30
    assert (torch.cat(got) - expected).abs().max().item() < 1e-4


@torch.no_grad()
def test_cache_grows_past_initial_capacity(pair):
    ours, ref = pair
    ids = _ids(200, seed=2)
    cache = ours.new_cache(1)
    cache._alloc(16)
    for start in range(0, 200, 50):
        out = ours(ids[:, start:start + 50], cache)
    assert (out[0, -1] - ref(ids).logits[0, -1]).abs().max().item() < 1e-4


@torch.no_grad()
def test_greedy_tokens_match_transformers_generate(pair, smol_tokenizer):
    from dialogen.decoding.generate import Generation
    from dialogen.decoding.settings import Sampling

    ours, ref = pair
    prompt = smol_tokenizer.encode_text("Hello there, how are you doing today?")
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    gen = Generation(ours, smol_tokenizer, prompt, ours.new_cache(1),
                     Sampling(temperature=0, repetition_penalty=1.0, max_new_tokens=24), stop_ids=set()).run()
    assert gen.tokens == expected


@torch.no_grad()
def test_left_padded_batch_matches_single_rows(tiny_llama):
    ours = load(str(tiny_llama[0])).model
    a, b = _ids(12, seed=3)[0], _ids(7, seed=4)[0]
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, 5:] = a, b
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, :5] = False
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = ours(batch, positions=positions, key_mask=key_mask)
    assert (out[0] - ours(a[None])[0]).abs().max() < 1e-4
    assert (out[1, 5:] - ours(b[None])[0]).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_compact_decode_weights_keep_prefill_exact(tiny_llama, dtype):
    """--dtype float16/bfloat16 changes decode steps only: a prefill is bit-identical to float32."""
    path, _ = tiny_llama
    fp32, bf16 = load(str(path)).model, load(str(path), dtype).model
    ids = _ids(20, seed=5)
    c32, c16 = fp32.new_cache(1), bf16.new_cache(1)
    assert torch.equal(fp32(ids, c32), bf16(ids, c16))
    step32, step16 = fp32(ids[:, :1], c32)[0, -1], bf16(ids[:, :1], c16)[0, -1]
    assert not torch.equal(step32, step16)  # the decode step did use the bfloat16 copy
    assert torch.allclose(step32.softmax(-1), step16.softmax(-1), atol=2e-2)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@torch.no_grad()
def test_blocks_serve_the_prompt_too(tiny_llama, dtype):
    """With blocks (--dtype int8/int4/auto), a prompt's products are the blocks' integer ones, as its
    decode steps' are: a prompt fed whole gives the logits of feeding it one token at a time, and
    stays near float32. Training (`train()`: the reference modules back) multiplies the float32 weights."""
    from dialogen.models.kernels import library

    if not library.enabled():
        pytest.skip("no native kernels: blocks are not used")
    path, _ = tiny_llama
    fp32, q = load(str(path)).model, load(str(path), dtype).model
    ids = _ids(12, seed=6)
    whole = q(ids, q.new_cache(1))[0]
    cache = q.new_cache(1)
    steps = torch.stack([q(ids[:, t:t + 1], cache)[0, -1] for t in range(12)])
    assert (whole - steps).abs().max() < 1e-3 * whole.abs().max()
    ref = fp32(ids, fp32.new_cache(1))[0]
    assert not torch.equal(whole, ref)
    assert torch.allclose(whole.softmax(-1), ref.softmax(-1), atol=2e-2)
    with torch.enable_grad():
        assert torch.equal(q.train().hidden(ids), fp32.hidden(ids))


@torch.no_grad()
def test_pytorch_model_bin_directory(tiny_gpt2, tmp_path):
    """Older Hugging Face directories (DialoGPT's) ship pytorch_model.bin, read with weights_only=True."""
    import shutil

    path, ref = tiny_gpt2
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    ids = _ids(12, seed=6)
    assert (load(str(tmp_path)).model(ids) - ref(ids).logits).abs().max().item() < 1e-4
