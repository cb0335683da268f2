"""From-scratch models: a byte-level BPE tokenizer trained on the training split, and a
GPT-2-style configuration sized by flags."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from ..chat.messages import Message
from ..errors import UserError
from ..paths import atomic_dir
from ..models.tokenizer import Tokenizer
from ..models.transformer import Config

EOS = "<|endoftext|>"
# the special tokens each built-in template writes, so each is one token
TEMPLATE_SPECIALS = {
    "dialogpt": [],
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama2": ["<s>", "</s>"],
}


def train_tokenizer(conversations: list[list[Message]], vocab_size: int, template: str) -> Tokenizer:
    if template not in TEMPLATE_SPECIALS:
        raise UserError(f"--init scratch needs a built-in template ({', '.join(TEMPLATE_SPECIALS)}), got {template!r}")
    specials = [EOS] + TEMPLATE_SPECIALS[template]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, on bytes
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = (m.content for conv in conversations for m in conv)
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf, eos_token=EOS, bos_token=EOS, pad_token=EOS)  # as GPT-2 has them


def gpt2_config(vocab_size: int, n_layer: int, n_head: int, d_model: int, context: int) -> Config:
    if d_model % n_head:
        raise UserError(f"--d-model ({d_model}) must be a multiple of --n-head ({n_head})")
    return Config(arch="gpt2", vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_head,
                  d_model=d_model, d_ff=4 * d_model, max_seq_len=context, tie_embeddings=True)


def scratch_tokenizer(opts, d, train_convs, tname: str) -> Tokenizer:
    """Rank 0 trains the BPE vocabulary and writes it to the run dir; every rank reads it."""
    where = Path(opts.out) / "tokenizer"
    if d.main:
        tok = train_tokenizer(train_convs, opts.vocab_size, tname)
        atomic_dir(where, tok.save)
    d.barrier()
    return Tokenizer.from_dir(where)
