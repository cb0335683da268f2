"""Assistant-token perplexity against transformers' own loss on the same tokens."""

import math

import pytest
import torch
import torch.nn.functional as F

from dialogen.chat.messages import Message
from dialogen.chat.templates import get_template
from dialogen.data.dataset import IGNORE_INDEX, build_examples
from dialogen.eval.perplexity import assistant_perplexity
from dialogen.models.loading import load
from dialogen.training.loss import nll_sum

CONVS = [
    [Message("user", "Hello, how are you today?"), Message("assistant", "I am fine, thanks. And you?"),
     Message("user", "Good. What are you reading?"), Message("assistant", "A book about the sea.")],
    [Message("system", "You are a cat."), Message("user", "What do you eat?"), Message("assistant", "Fish, mostly.")],
    [m for i in range(6) for m in (Message("user", f"Tell me part {i} of a long story, please."),
                                   Message("assistant", f"Part {i}: once upon a time there was a ship."))],
]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_perplexity_matches_transformers(request, smol_tokenizer, fixture):
    path, ref = request.getfixturevalue(fixture)
    model = load(str(path)).model
    tpl = get_template("chatml", smol_tokenizer)
    got = assistant_perplexity(model, smol_tokenizer, tpl, CONVS, max_len=64, batch_size=2)
    examples, stats = build_examples(CONVS, smol_tokenizer, tpl, 64)
    assert stats.windows > len(CONVS)  # the long conversation is windowed
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one at a time, no padding: the plain reference computation
            ids = torch.tensor([ex.ids])
            labels = torch.tensor([ex.labels])
            logits = ref(ids).logits[0, :-1]
            total += F.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels[0, 1:] != IGNORE_INDEX).sum())
    assert got["tokens"] == count == stats.trained_tokens
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # bits per character: over exactly the assistant's text, each turn once
    chars = sum(len(m.content) for conv in CONVS for m in conv if m.role == "assistant")
    assert got["chars"] == chars and got["bpc"] == pytest.approx(total / chars / math.log(2), rel=1e-5)


def test_perplexity_command(tiny_llama, tmp_path, capsys):
    import json

    from dialogen.cli import main

    path, _ = tiny_llama
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [m.to_dict() for m in c]}) + "\n" for c in CONVS * 10))
    assert main(["perplexity", "--model", str(path), "--template", "chatml", "--data", str(data), "--split", "test",
                 "--max-len", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["conversations"] == 2 and out["tokens"] > 0 and out["ppl"] > 1


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_hidden_states_then_head_equals_forward(request, fixture):
    path, _ = request.getfixturevalue(fixture)
    model = load(str(path)).model
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.lm_head(model.hidden(ids)), model(ids), atol=1e-5)
        labels = ids.clone()
        labels[0, :5] = IGNORE_INDEX
        loss, n = nll_sum(model, ids, labels)
        ref = F.cross_entropy(model(ids)[:, :-1].reshape(-1, model.cfg.vocab_size), labels[:, 1:].reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
    assert int(n) == 2 * 16 - 4 and loss.item() == pytest.approx(ref.item(), rel=1e-5)
