"""Each family of models/families.py against transformers: tiny random models built from
transformers' own config classes, saved with save_pretrained, loaded by dialogen.

Logits match at every position of a prompt longer than the sliding window, and greedy decoding
with the KV cache gives transformers' generate tokens. Every config field that changes the math,
moved off its default, either still matches or is refused in one line naming the key."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from dialogen.errors import UserError
from dialogen.models.loading import load, save_transformer
from dialogen.models.tokenizer import Tokenizer

VOCAB = 260
WINDOW = 8
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + i / 10 for i in range(8)],
            "long_factor": [1.0 + i / 3 for i in range(8)]}

CASES = {  # name -> (config class, its arguments)
    "llama": (transformers.LlamaConfig, {}),
    "llama-biases-gelu": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True, hidden_act="gelu")),
    "llama-llama3": (transformers.LlamaConfig, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-linear": (transformers.LlamaConfig, dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                     "factor": 2.0})),
    "llama-dynamic": (transformers.LlamaConfig, dict(max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})),
    "llama-yarn": (transformers.LlamaConfig, dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=WINDOW)),
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
    "gemma": (transformers.GemmaConfig, {}),
    "gemma2": (transformers.Gemma2Config, dict(sliding_window=WINDOW, query_pre_attn_scalar=24)),
    "gemma3_text": (transformers.Gemma3TextConfig, dict(sliding_window=WINDOW, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phi3": (transformers.Phi3Config, dict(original_max_position_embeddings=16, rope_parameters=dict(LONGROPE))),
    "phi3-partial": (transformers.Phi3Config, dict(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5})),
    "granite": (transformers.GraniteConfig, dict(embedding_multiplier=3.0, attention_multiplier=0.2,
                                                 residual_multiplier=0.5, logits_scaling=2.0)),
    "smollm3": (transformers.SmolLM3Config, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                 no_rope_layer_interval=2)),
    "olmo2": (transformers.Olmo2Config, dict(attention_bias=True)),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)),
}


def byte_tokenizer() -> Tokenizer:
    """A byte-level vocabulary of 256 bytes plus control tokens, VOCAB ids in all."""
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, pre_tokenizers

    stand_in = pre_tokenizers.ByteLevel.alphabet()
    hf = HF(models.BPE(vocab={c: i for i, c in enumerate(sorted(stand_in))}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")])
    return Tokenizer(hf, eos_token="<|endoftext|>")


def build(path, cls, kwargs: dict, seed: int = 0):
    """(transformers model, path) of a tiny random model written with save_pretrained, with weights
    wide enough that a wrong detail shows in the logits."""
    sizes = {} if cls is transformers.GPT2Config else dict(SIZES)
    if cls is transformers.Phi3Config:  # phi3's head width is hidden_size / heads
        sizes.pop("head_dim")
        sizes["hidden_size"] = 64
    cfg = cls(**{**sizes, **kwargs})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() == 2 else 0.1) if "norm" not in name or p.dim() != 1 else p.add_(
                torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    byte_tokenizer().save(path)
    return model


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens after ids, fed one at a time through the KV cache after the prompt."""
    cache = model.new_cache(1)
    out, logits = [], model.next_logits(ids, cache)
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits = model.next_logits(torch.tensor([[out[-1]]]), cache)
    return out


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_family_matches_transformers(name, tmp_path):
    cls, kwargs = CASES[name]
    theirs = build(tmp_path, cls, kwargs)
    ours = load(str(tmp_path), dtype="float32").model
    ids = prompt(3 * WINDOW)
    want = theirs(ids).logits
    got = ours(ids)
    assert (got - want).abs().max() < 1e-4, float((got - want).abs().max())
    start = prompt(12, seed=2)
    theirs.generation_config.eos_token_id = None
    gen = theirs.generate(start, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    assert greedy(ours, start, 16) == gen


@pytest.mark.parametrize("name", ["gemma3_text", "phi3", "qwen2", "llama-llama3", "olmo2", "gpt2"])
@torch.no_grad()
def test_family_checkpoint_round_trips(name, tmp_path):
    """A family read from Hugging Face is saved as the same family: transformers reads it back to the
    same logits."""
    cls, kwargs = CASES[name]
    build(tmp_path / "a", cls, kwargs)
    loaded = load(str(tmp_path / "a"), dtype="float32")
    save_transformer(tmp_path / "b", loaded.model, loaded.tokenizer, {"template": "chatml"})
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", attn_implementation="eager").eval()
    ids = prompt(3 * WINDOW)
    assert (back(ids).logits - loaded.model(ids)).abs().max() < 1e-4
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == cls.model_type


def test_unknown_key_and_family_are_refused_naming_the_key(tmp_path, capsys):
    from dialogen.cli import main

    build(tmp_path, transformers.LlamaConfig, {})
    conf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**conf, "quantization_config": {"bits": 4}}))
    with pytest.raises(UserError, match=r"config\.json: quantization_config=.* is not supported") as e:
        load(str(tmp_path), dtype="float32")
    assert "\n" not in str(e.value)
    capsys.readouterr()  # (save_pretrained's progress bar)
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    assert main(["generate", str(msgs), "--model", str(tmp_path), "--template", "chatml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dialogen: error: ") and "quantization_config" in err and err.count("\n") == 1
    (tmp_path / "config.json").write_text(json.dumps({**conf, "rope_interleaved": True}))
    with pytest.raises(UserError, match=r"config\.json: rope_interleaved=true is not supported"):
        load(str(tmp_path), dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps({**conf, "rope_interleaved": False, "is_llama_config": True}))
    load(str(tmp_path), dtype="float32")  # SmolLM2's config.json
    (tmp_path / "config.json").write_text(json.dumps({**conf, "model_type": "cohere"}))
    with pytest.raises(UserError, match=r"config\.json: model_type 'cohere' is not supported"):
        load(str(tmp_path), dtype="float32")


BASE = {}  # config class -> the arguments of its first case above
for _cls, _kwargs in CASES.values():
    BASE.setdefault(_cls, _kwargs)
ODD = {str: {"hidden_act": "relu", "hidden_activation": "gelu", "activation_function": "relu"},
       type(None): {"sliding_window": WINDOW, "final_logit_softcapping": 20.0, "attn_logit_softcapping": 30.0,
                    "n_inner": 64, "use_bidirectional_attention": True, "num_key_value_heads": 1}}


def moved(cls, kwargs: dict) -> list[tuple[str, object]]:
    """(field, a value off its default) for every field of a config class that may change the math."""
    import dataclasses

    from dialogen.models.families import FAMILIES, INERT

    out = []
    for f in dataclasses.fields(cls):
        if f.name in INERT or f.name in FAMILIES[cls.model_type].inert or f.name == "rope_parameters":
            continue  # rotary scalings have their own cases above
        v = kwargs.get(f.name, SIZES.get(f.name, f.default))
        if isinstance(v, bool):
            out.append((f.name, not v))
        elif isinstance(v, int):
            out.append((f.name, v * 2))
        elif isinstance(v, float):
            out.append((f.name, v * 1.5 + 0.5))
        elif type(v) in ODD and f.name in ODD[type(v)]:
            out.append((f.name, ODD[type(v)][f.name]))
    return out


REFUSALS = [(cls, key, value) for cls, kwargs in BASE.items() for key, value in moved(cls, kwargs)]


@pytest.mark.parametrize("cls,key,value", REFUSALS, ids=[f"{c.model_type}-{k}" for c, k, _ in REFUSALS])
@torch.no_grad()
def test_each_field_off_its_default_is_exact_or_refused(cls, key, value, tmp_path):
    try:
        theirs = build(tmp_path, cls, {**BASE[cls], key: value})
    except Exception:  # transformers itself rejects the value
        pytest.skip(f"transformers refuses {key}={value}")
    try:
        ours = load(str(tmp_path), dtype="float32").model
    except UserError as e:
        assert key in str(e) and "\n" not in str(e), str(e)
        return
    ids = prompt(3 * WINDOW)
    # float32 rounding stays near 1e-4 on these wide random weights; a detail left out shows as 1e-2 or more
    assert (ours(ids) - theirs(ids).logits).abs().max() < 2e-4


@pytest.mark.parametrize("name", ["mistral", "gemma2", "qwen3", "llama", "llama-yarn"])
@torch.no_grad()
def test_decode_weights_keep_each_familys_attention(name, tmp_path):
    """With decode weights in blocks (the native kernels' products), a family whose attention the
    native kernel does not compute keeps the reference attention: greedy decoding through the KV
    cache picks the tokens the whole sequence's forward pass ranks first, past the window."""
    from dialogen.models.kernels import library
    from dialogen.models.native import BlockLinear

    if not library.enabled():
        pytest.skip("no native kernels (no C compiler)")
    cls, kwargs = CASES[name]
    build(tmp_path, cls, {**kwargs, "intermediate_size": 64})
    model = load(str(tmp_path), dtype="int8").model
    assert isinstance(model.blocks[0].mlp.down, BlockLinear)
    assert model.native.attention == name.startswith("llama")
    start = prompt(6, seed=3)
    tokens = greedy(model, start, 3 * WINDOW)
    full = model(torch.cat([start, torch.tensor([tokens])], dim=1))[0, 5:-1].argmax(-1).tolist()
    assert tokens == full


def test_docs_table_is_the_code_table():
    from pathlib import Path

    from dialogen.models.families import table_markdown

    assert table_markdown() in (Path(__file__).parent.parent / "docs" / "models.md").read_text()


def test_gguf_export_refuses_what_a_gguf_llama_cannot_say(tmp_path):
    from dialogen.models.gguf_export import write_gguf

    build(tmp_path, *CASES["gemma2"])
    loaded = load(str(tmp_path), dtype="float32")
    with pytest.raises(UserError, match=r"GGUF export writes plain llama and gpt2 models; this gemma2 model has"):
        write_gguf(tmp_path / "x.gguf", loaded.model.cfg, loaded.model.state_dict(), loaded.tokenizer, "f32", "x",
                   "", set())
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("name", ["mistral", "gemma2", "smollm3", "phi3"])
@torch.no_grad()
def test_absent_keys_take_the_config_classs_defaults(name, tmp_path):
    """A config.json without the keys whose defaults differ between families reads as transformers does."""
    cls, kwargs = CASES[name]
    theirs = build(tmp_path, cls, kwargs)
    conf = json.loads((tmp_path / "config.json").read_text())
    for key in ("num_key_value_heads", "tie_word_embeddings", "rms_norm_eps"):
        if conf.get(key) == dict(cls().to_dict()).get(key):  # leave out what equals the class default
            conf.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = prompt(3 * WINDOW)
    assert (load(str(tmp_path), dtype="float32").model(ids) - back(ids).logits).abs().max() < 1e-4
    assert (back(ids).logits - theirs(ids).logits).abs().max() == 0


def test_a_model_no_config_json_can_describe_is_not_saved(tmp_path):
    """A model whose math no config.json it came from describes (e.g. a windowed llama built here)
    is refused in one line, and nothing is written."""
    from dialogen.models.transformer import Config, Transformer

    model = Transformer(Config(vocab_size=VOCAB, n_layer=1, d_model=32, n_head=2, n_kv_head=2, d_ff=32, window=4,
                               window_layers=[0]))
    with pytest.raises(UserError, match=r"cannot be saved: it has window, window_layers set"):
        save_transformer(tmp_path / "out", model, byte_tokenizer(), {"template": "chatml"})
    assert not (tmp_path / "out").exists()
