"""`dialogen train --arch rnn`: the encoder-decoder in the shared training loop.

The loop, data, checkpoints and resume are the trainer's; this module adds the flags and
builds a new model (`setup.build_model` reloads one). The loss needs nothing here: `training.loss.nll_sum` hands an
encoder-decoder each labelled turn as a reply to the tokens before it, and the model itself
keeps only the last `--context-turns` turns of that context.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..chat.templates import get_template
from ..errors import UserError
# torch, the model code and the extras are imported inside the commands: building `--help` stays torch-free

ARCHES = ("transformer", "rnn")


def add_rnn_args(p: argparse.ArgumentParser):
    p.add_argument("--arch", default="transformer", choices=ARCHES,
                   help="transformer (decoder-only) or rnn (encoder-decoder with attention; needs --init scratch "
                        "or an RNN checkpoint) (default: %(default)s)")
    g = p.add_argument_group("--arch rnn")
    g.add_argument("--rnn-cell", default="gru", choices=("gru", "lstm"), help="(default: %(default)s)")
    g.add_argument("--rnn-attention", default="general", choices=("additive", "bahdanau", "dot", "general"),
                   help="additive = Bahdanau; dot and general = Luong (default: %(default)s)")
    g.add_argument("--rnn-emb-dim", type=int, default=256, help="(default: %(default)s)")
    g.add_argument("--rnn-hidden", type=int, default=256, help="per encoder direction (default: %(default)s)")
    g.add_argument("--rnn-layers", type=int, default=1, help="encoder and decoder layers (default: %(default)s)")
    g.add_argument("--rnn-dropout", type=float, default=0.1, help="(default: %(default)s)")
    g.add_argument("--rnn-unidirectional", dest="rnn_bidirectional", action="store_false",
                   help="a forward-only encoder (default: bidirectional)")
    g.add_argument("--rnn-no-input-feeding", dest="rnn_input_feeding", action="store_false",
                   help="do not feed the last attentional vector into the next decoder step")
    g.add_argument("--context-turns", type=int, default=3,
                   help="the encoder reads the last K turns before a reply; 0 = all (default: %(default)s)")


def _model_type(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def wants_rnn(opts) -> bool:
    """--arch rnn, or a run/init that already is an encoder-decoder."""
    from ..models.rnn import MODEL_TYPE

    if getattr(opts, "arch", "transformer") == "rnn":
        return True
    if opts.resume:
        return _model_type(Path(opts.out) / "last") == MODEL_TYPE
    return opts.init not in ("scratch", "default") and _model_type(Path(opts.init).expanduser()) == MODEL_TYPE


def check_rnn_start(opts):
    """Before any loading: no transformer-only flag, and an --init that is an encoder-decoder
    checkpoint (not a pretrained transformer)."""
    from ..models.rnn import MODEL_TYPE

    if opts.freeze_layers:
        raise UserError("--freeze-layers freezes transformer blocks; it does not apply to --arch rnn")
    init = opts.init
    if opts.resume or init == "scratch":
        return
    hint = "use --init scratch (a new encoder-decoder and vocabulary) or an RNN checkpoint"
    if init == "default":
        raise UserError(f"--arch rnn cannot start from --init default (the pretrained SmolLM2 transformer); {hint}")
    kind = _model_type(Path(init).expanduser())
    if kind != MODEL_TYPE:
        what = f"a pretrained {kind} transformer" if kind else "not a model directory"
        raise UserError(f"--arch rnn cannot start from --init {init}: {what}; {hint}")


def new_rnn(opts, tokenizer, template_name: str):
    """A freshly initialised encoder-decoder for the tokenizer and template."""
    from ..models.rnn import RNNConfig, RNNSeq2Seq

    for flag, v in (("--rnn-emb-dim", opts.rnn_emb_dim), ("--rnn-hidden", opts.rnn_hidden),
                    ("--rnn-layers", opts.rnn_layers)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    if opts.context_turns < 0:
        raise UserError(f"--context-turns must be >= 0, got {opts.context_turns}")
    if not 0 <= opts.rnn_dropout < 1:
        raise UserError(f"--rnn-dropout must be in [0, 1), got {opts.rnn_dropout}")
    template = get_template(template_name, tokenizer)
    eot = tokenizer.encode_template(template.end_of_turn)
    turn_end = eot[0] if len(eot) == 1 else -1
    start = tokenizer.token_id(tokenizer.bos_token)
    start = start if start is not None else (turn_end if turn_end >= 0 else tokenizer.pad_id)
    cfg = RNNConfig(vocab_size=tokenizer.vocab_size, cell=opts.rnn_cell, emb_dim=opts.rnn_emb_dim,
                    hidden=opts.rnn_hidden, n_layer=opts.rnn_layers, bidirectional=opts.rnn_bidirectional,
                    dropout=opts.rnn_dropout, attention=opts.rnn_attention, input_feeding=opts.rnn_input_feeding,
                    start_id=start, max_seq_len=max(opts.max_len, 1024), context_turns=opts.context_turns,
                    turn_end_id=turn_end)
    model = RNNSeq2Seq(cfg)
    model.init_weights(opts.seed)
    return model
