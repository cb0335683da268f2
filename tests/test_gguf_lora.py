"""`dialogen export --gguf-lora`: a PEFT adapter written as llama.cpp's GGUF LoRA, read back with the
gguf package's own reader (names, llama.cpp's shape checks, alpha) and checked against the merged
GGUF export (B A alpha / r is exactly what the adapter adds to the base file's tensor); the file loaded
by dialogen (`--adapter FILE.gguf`) gives the PEFT directory's logits; `export --merge OUT.gguf`."""

import json

import numpy as np
import pytest
import torch

from dialogen.cli import main
from dialogen.models.lora import Adapter, LoraSettings, default_targets
from dialogen.models.loading import load, model_config

IDS = torch.tensor([[1, 50, 300, 7, 900, 12, 4000, 3]])


def random_adapter(base, out, r=4, alpha=8.0, seed=0):
    """A PEFT adapter directory on `base` with every projection adapted and B random (not zero), so
    it changes the logits."""
    cfg = model_config(str(base))
    adapter = Adapter(cfg, LoraSettings(r, alpha, 0.0, default_targets(cfg)), str(base)).init(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for part in adapter.parts.values():
            part.B.copy_(torch.randn(part.B.shape, generator=g) * 0.2)
    out.mkdir()
    adapter.write(out)
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, tiny_llama, tiny_gpt2, tmp_path_factory):
    path, _ = tiny_llama if request.param == "llama" else tiny_gpt2
    return request.param, path, random_adapter(path, tmp_path_factory.mktemp("lora") / "adapter")


def export(*argv, capsys):
    assert main(["export", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def tensors(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in r.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def test_the_file_is_what_llama_cpp_reads(family, tmp_path, capsys):
    kind, base, adapter = family
    summary = export("--gguf-lora", tmp_path / "a.gguf", "--adapter", adapter, "--type", "f32", capsys=capsys)
    assert summary["arch"] == kind and summary["r"] == 4 and summary["alpha"] == 8.0
    meta, lora = tensors(tmp_path / "a.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == kind and meta["adapter.lora.alpha"] == 8.0
    # the merged model's file, and the base's: what the adapter adds to each base tensor is B A alpha / r
    export("--gguf", tmp_path / "base.gguf", "--model", base, "--type", "f32", capsys=capsys)
    export("--gguf", tmp_path / "merged.gguf", "--model", base, "--adapter", adapter, "--type", "f32", capsys=capsys)
    _, plain = tensors(tmp_path / "base.gguf")
    _, merged = tensors(tmp_path / "merged.gguf")
    names = {n.rsplit(".lora_", 1)[0] for n in lora}
    want = 7 if kind == "llama" else 4  # q k v o gate up down / c_attn attn.c_proj c_fc mlp.c_proj
    assert len(names) == 2 * want and len(lora) == 2 * len(names)
    changed = {n for n in plain if n in merged and not np.array_equal(plain[n].data, merged[n].data)}
    assert changed == names  # exactly the tensors the adapter names
    for name in names:
        a, b, w = lora[name + ".lora_a"], lora[name + ".lora_b"], plain[name]
        # llama.cpp's checks (src/llama-adapter.cpp): a.ne[0] = W.ne[0] (in), b.ne[1] = W.ne[1] (out), a.ne[1] = b.ne[0] (r)
        assert a.shape[0] == w.shape[0] and b.shape[1] == w.shape[1] and a.shape[1] == b.shape[0] == 4
        delta = np.asarray(b.data, np.float64) @ np.asarray(a.data, np.float64) * 8.0 / 4
        got = np.asarray(merged[name].data, np.float64) - np.asarray(w.data, np.float64)
        assert np.abs(got - delta).max() < 1e-5, name


@pytest.mark.parametrize("kind,tol", [("f32", 1e-5), ("f16", 2e-2)])
def test_dialogen_reads_it_back_with_the_directorys_logits(family, tmp_path, capsys, kind, tol):
    _, base, adapter = family
    export("--gguf-lora", tmp_path / "a.gguf", "--adapter", adapter, "--type", kind, capsys=capsys)
    with torch.no_grad():
        want = load(str(base), "float32", adapter=str(adapter)).model(IDS)
        got = load(str(base), "float32", adapter=str(tmp_path / "a.gguf")).model(IDS)
        plain = load(str(base), "float32").model(IDS)
    assert (want - plain).abs().max() > 0.1  # the adapter changes the logits
    assert (got - want).abs().max() < tol * want.abs().max()


def test_merge_to_a_gguf_file_equals_base_plus_adapter(tiny_llama, family, tmp_path, capsys):
    kind, base, adapter = family
    export("--merge", tmp_path / "m.gguf", "--model", base, "--adapter", adapter, "--type", "f32", capsys=capsys)
    export("--gguf", tmp_path / "g.gguf", "--model", base, "--adapter", adapter, "--type", "f32", capsys=capsys)
    assert (tmp_path / "m.gguf").read_bytes() == (tmp_path / "g.gguf").read_bytes()
    with torch.no_grad():
        want = load(str(base), "float32", adapter=str(adapter)).model(IDS)
        merged = load(str(tmp_path / "m.gguf"), "float32").model(IDS)
    assert torch.allclose(merged, want, atol=1e-4), (merged - want).abs().max()


def test_generate_with_a_gguf_lora(family, tmp_path, capsys):
    _, base, adapter = family
    export("--gguf-lora", tmp_path / "a.gguf", "--adapter", adapter, "--type", "f32", capsys=capsys)
    msgs = tmp_path / "msgs.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "the cat"}]))
    outs = []
    for a in (adapter, tmp_path / "a.gguf"):
        argv = ["generate", str(msgs), "--model", str(base), "--adapter", str(a), "--template", "chatml",
                "--max-new-tokens", "6", "--temperature", "0"]
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_bad_input_is_one_line(tiny_llama, tiny_gpt2, tmp_path, capsys):
    llama, _ = tiny_llama
    gpt2, _ = tiny_gpt2
    adapter = random_adapter(llama, tmp_path / "adapter")
    export("--gguf-lora", tmp_path / "a.gguf", "--adapter", adapter, capsys=capsys)
    export("--gguf", tmp_path / "base.gguf", "--model", llama, "--type", "f32", capsys=capsys)
    msgs = tmp_path / "msgs.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    cases = [
        (["generate", msgs, "--model", gpt2, "--adapter", tmp_path / "a.gguf"],
         "the adapter is for another base: its architecture is 'llama'"),
        (["generate", msgs, "--adapter", tmp_path / "a.gguf"],  # no --model: the default model, of other shapes
         "the adapter is for another base: blk.0.attn_q.weight.lora_a is [4, 64], this model needs [4, 576]"),
        (["generate", msgs, "--model", llama, "--adapter", tmp_path / "base.gguf"],
         "base.gguf: not a GGUF LoRA adapter (general.type None"),
        (["generate", msgs, "--model", llama, "--adapter", tmp_path / "missing"], "missing: not an adapter"),
        (["export", "--gguf-lora", tmp_path / "b.gguf"], "--gguf-lora writes an adapter: give --adapter DIR"),
        (["export", "--gguf-lora", tmp_path / "b.gguf", "--adapter", adapter, "--type", "q4_0"],
         "a GGUF LoRA stores f32 or f16"),
        (["export", "--gguf-lora", tmp_path / "b.bin", "--adapter", adapter], "b.bin: the output file must end in .gguf"),
        (["export", "--gguf-lora", tmp_path / "b.gguf", "--gguf", tmp_path / "c.gguf", "--adapter", adapter],
         "give one of --gguf OUT.gguf, --merge OUT_DIR or --gguf-lora OUT.gguf"),
    ]
    for argv, message in cases:
        code = main(list(map(str, argv)))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "b.gguf").exists() and not list(tmp_path.glob(".b.gguf*"))
