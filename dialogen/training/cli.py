"""`dialogen train`: flags -> TrainOptions -> the training loop."""

from __future__ import annotations

import json
from dataclasses import fields

from ..data.options import add_data_args
from .options import TrainOptions
from .rnn_train import add_rnn_args
# torch, the model code and the extras are imported inside the commands: building `--help` stays torch-free

D = TrainOptions(out="")


def register(sub):
    p = sub.add_parser("train", help="fine-tune a model or pre-train one from scratch on conversations",
                       description="Role-masked training: the loss counts only the trained turns (and their "
                                   "end-of-turn token). Writes last/ and best/ checkpoints, metrics.jsonl and "
                                   "metrics.png into --out. Multi-process: torchrun --nproc_per_node N -m dialogen train ...")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics)")
    p.add_argument("--init", default=D.init, help="'default' (SmolLM2-135M-Instruct), a model path, or 'scratch' "
                   "(a GPT-2-style model with a BPE vocabulary trained on the data) (default: %(default)s)")
    p.add_argument("--template", default=D.template, help="chat template: chatml, llama2, dialogpt, jinja; default: "
                   "the model's own (scratch: dialogpt)")
    p.add_argument("--reverse", action="store_true", help="train a backward model P(context | reply) for MMI reranking")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_data_args(p)
    add_rnn_args(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=D.batch_size, help="examples per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=D.grad_accum, help="micro-batches per step (default: %(default)s)")
    g.add_argument("--pack", action="store_true", help="join examples into full --max-len rows instead of length buckets")
    g.add_argument("--lr", type=float, default=D.lr, help="peak learning rate (default: %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=D.min_lr_ratio, help="final lr / peak lr (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=D.warmup_steps, help="(default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=D.weight_decay, help="(default: %(default)s)")
    g.add_argument("--clip", type=float, default=D.clip, help="gradient norm clip; 0 = off (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=D.max_steps, help="optimizer steps; 0 = from --epochs (default: %(default)s)")
    g.add_argument("--epochs", type=float, default=D.epochs, help="(default: %(default)s)")
    g.add_argument("--max-minutes", type=float, default=D.max_minutes,
                   help="stop (and save) once this much wall time has passed since the start, data "
                   "preparation included; 0 = no limit (default: %(default)s)")
    g.add_argument("--seed", type=int, default=D.seed, help="(default: %(default)s)")
    g.add_argument("--freeze-embeddings", action="store_true",
                   help="do not train the token (and position) embeddings; a tied output head freezes with them")
    g.add_argument("--freeze-layers", type=int, default=D.freeze_layers, help="do not train the first K blocks")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="keep only each block's input and recompute the rest in the backward pass: less memory, "
                        "about a third more compute")
    g = p.add_argument_group("LoRA (low-rank adapters on a frozen base, saved in PEFT's format)")
    g.add_argument("--lora-r", type=int, default=D.lora_r, help="adapter rank; 0 = train every weight (default: %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=D.lora_alpha, help="the adapter's output scales by alpha / r "
                   "(default: %(default)s)")
    g.add_argument("--lora-dropout", type=float, default=D.lora_dropout, help="dropout on the adapter's input "
                   "(default: %(default)s)")
    g.add_argument("--lora-targets", default=D.lora_targets, help="comma-separated module names as PEFT names them "
                   "(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; gpt2: c_attn,c_proj,c_fc); "
                   "default: all of them")
    g.add_argument("--base-dtype", default=D.base_dtype, choices=["float32", "auto", "int8", "int4"],
                   help="the frozen base's weights: float32, or blocks multiplied by the native kernels (QLoRA-style; "
                        "auto: a GGUF file's own blocks, else int8) (default: %(default)s)")
    g.add_argument("--compute-dtype", default=D.compute_dtype, choices=["float32", "bfloat16"],
                   help="with --base-dtype blocks: the dtype of the base's products while training (float32: the "
                        "native kernels forward, float32 gradients; bfloat16: both in bfloat16, as QLoRA's compute dtype, "
                        "faster on CPUs with AMX) (default: %(default)s)")
    g.add_argument("--dpo", action="store_true", help="preference tuning: --data is a JSONL file of TRL's "
                   "prompt/chosen/rejected records; the adapter-free base is the reference model")
    g.add_argument("--dpo-beta", type=float, default=D.dpo_beta, help="DPO's beta (default: %(default)s)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=D.eval_every, help="validation perplexity every N steps; 0 = off")
    g.add_argument("--save-every", type=int, default=D.save_every, help="write last/ every N steps (default: %(default)s)")
    g.add_argument("--val-conversations", type=int, default=D.val_conversations,
                   help="validation conversations used (default: %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g = p.add_argument_group("--init scratch")
    g.add_argument("--n-layer", type=int, default=D.n_layer, help="(default: %(default)s)")
    g.add_argument("--n-head", type=int, default=D.n_head, help="(default: %(default)s)")
    g.add_argument("--d-model", type=int, default=D.d_model, help="(default: %(default)s)")
    g.add_argument("--vocab-size", type=int, default=D.vocab_size, help="BPE vocabulary size (default: %(default)s)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .sft import train

    names = {f.name for f in fields(TrainOptions)}
    opts = TrainOptions(**{k: v for k, v in vars(args).items() if k in names})
    if opts.dpo:
        from .dpo import train_dpo

        print(json.dumps(train_dpo(opts)))
        return 0
    summary = train(opts)
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary))
    return 0
