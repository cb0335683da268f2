"""A config.json whose values are wrong: one line naming the file and the key, before any model is
built (exit 2 from the CLI), never a traceback; shapes are checked against the weights."""

import json
import shutil

import pytest
import torch

from dialogen.cli import main
from dialogen.errors import UserError
from dialogen.models.hf import expected_shapes
from dialogen.models.loading import load
from dialogen.models.transformer import Config, Transformer


def _copy_with(src, tmp_path, **changes):
    out = tmp_path / "model"
    shutil.copytree(src, out)
    conf = json.loads((out / "config.json").read_text())
    conf.update(changes)
    (out / "config.json").write_text(json.dumps(conf))
    return out


LLAMA_BAD = [
    ({"hidden_size": 128}, "hidden_size"),  # does not match the weights
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"vocab_size": 49153}, "vocab_size"),
    ({"num_attention_heads": 3}, "num_attention_heads=3 is not a multiple of num_key_value_heads=2"),
    ({"head_dim": None, "num_attention_heads": 6, "num_key_value_heads": 3},
     "hidden_size=64 is not divisible by num_attention_heads=6"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"hidden_size": 64.0}, "hidden_size"),
    ({"intermediate_size": 100}, "intermediate_size"),
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"max_position_embeddings": 10**12}, "max_position_embeddings"),
    ({"rope_theta": -1}, "rope_theta"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"head_dim": 32}, "head_dim"),
]


@pytest.mark.parametrize("changes,key", LLAMA_BAD, ids=[str(c) for c, _ in LLAMA_BAD])
def test_llama_config_values(tiny_llama, tmp_path, changes, key):
    path = _copy_with(tiny_llama[0], tmp_path, **changes)
    with pytest.raises(UserError) as e:
        load(str(path))
    msg = str(e.value)
    assert f"{path}/config.json" in msg and key in msg and "\n" not in msg


GPT2_BAD = [({"n_head": 0}, "n_head"), ({"n_embd": 65}, "n_embd"), ({"n_positions": 100}, "n_positions"),
            ({"n_embd": 128}, "n_embd"), ({"layer_norm_epsilon": 0}, "layer_norm_epsilon"),
            ({"n_inner": -1}, "n_inner")]


@pytest.mark.parametrize("changes,key", GPT2_BAD, ids=[str(c) for c, _ in GPT2_BAD])
def test_gpt2_config_values(tiny_gpt2, tmp_path, changes, key):
    path = _copy_with(tiny_gpt2[0], tmp_path, **changes)
    with pytest.raises(UserError) as e:
        load(str(path))
    assert f"{path}/config.json" in str(e.value) and key in str(e.value)


def test_cli_prints_one_line_and_exits_2(tiny_llama, tmp_path, capsys):
    path = _copy_with(tiny_llama[0], tmp_path, num_attention_heads=0)
    msgs = tmp_path / "m.json"
    msgs.write_text('[{"role": "user", "content": "hi"}]')
    assert main(["generate", str(msgs), "--model", str(path), "--template", "chatml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_attention_heads" in err and "config.json" in err


@pytest.mark.parametrize("cfg", [Config(arch="llama", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                        d_ff=48, tie_embeddings=False, attn_bias=True),
                                 Config(arch="gpt2", vocab_size=50, n_layer=2, n_head=4, n_kv_head=4, d_model=32,
                                        d_ff=48, max_seq_len=64)])
def test_expected_shapes_are_the_models(cfg):
    want = {name: shape for name, (shape, _) in expected_shapes(cfg).items()}
    got = {name: tuple(t.shape) for name, t in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        got.pop("lm_head.weight", None)
    assert want == got


def _rnn_checkpoint(tmp_path, smol_tokenizer, **changes):
    from dialogen.models.rnn import RNNConfig, RNNSeq2Seq, save_rnn

    torch.manual_seed(0)
    model = RNNSeq2Seq(RNNConfig(vocab_size=smol_tokenizer.vocab_size, emb_dim=16, hidden=16))
    path = save_rnn(tmp_path / "rnn", model, smol_tokenizer, {"template": "chatml"})
    conf = json.loads((path / "config.json").read_text())
    conf.update(changes)
    (path / "config.json").write_text(json.dumps(conf))
    return path


@pytest.mark.parametrize("changes,key", [({"hidden": 32}, "hidden"), ({"hidden": 0}, "hidden"),
                                         ({"emb_dim": 1.5}, "emb_dim"), ({"vocab_size": 2**40}, "vocab_size"),
                                         ({"dropout": "x"}, "dropout"), ({"n_layer": None, "cell": 3}, "cell")])
def test_rnn_config_values(tmp_path, smol_tokenizer, changes, key):
    path = _rnn_checkpoint(tmp_path, smol_tokenizer, **changes)
    with pytest.raises(UserError) as e:
        load(str(path))
    assert str(path) in str(e.value) and key in str(e.value) and "\n" not in str(e.value)
    if changes.get("hidden") == 32:
        assert "hidden=32" in str(e.value)


@pytest.mark.parametrize("changes,key", [({"hidden": 2.5}, "hidden"), ({"vocab_size": True}, "vocab_size"),
                                         ({"emb_dim": 2**30}, "emb_dim"), ({"hidden": 8}, "weights do not match config.json")])
def test_discriminator_config_values(tmp_path, smol_tokenizer, changes, key):
    from dialogen.models.discriminator import DiscConfig, Discriminator, load_discriminator, save_discriminator

    disc = Discriminator(DiscConfig(vocab_size=smol_tokenizer.vocab_size, sep_id=1, emb_dim=8, hidden=4))
    path = save_discriminator(tmp_path / "disc", disc, smol_tokenizer, {})
    conf = json.loads((path / "config.json").read_text())
    conf.update(changes)
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError) as e:
        load_discriminator(path)
    assert "--discriminator" in str(e.value) and key in str(e.value) and "\n" not in str(e.value)
