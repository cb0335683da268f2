"""--pack keeps examples apart: in a packed row each example attends within itself from position 0,
so its hidden states and loss are those it has alone."""

import pytest
import torch

from dialogen.data.batches import collate, collate_segments, pack
from dialogen.data.dataset import IGNORE_INDEX, Example
from dialogen.models.loading import load
from dialogen.training.loss import nll_sum


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_packed_examples_equal_the_examples_alone(family, request):
    path, _ = request.getfixturevalue(family)
    model = load(str(path), "float32").model.materialize().eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 7, 4):
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] + ids[1:]))
    rows = pack(examples, 16, seed=0)
    assert len(rows) == 1 and len(rows[0].ids) == 16 and sorted(set(rows[0].segments)) == [0, 1, 2]
    row = rows[0]
    starts = [i for i in range(16) if i == 0 or row.segments[i] != row.segments[i - 1]]
    assert all(row.labels[i] == IGNORE_INDEX for i in starts)  # nothing of its own precedes an example's first token
    ids, labels = collate(rows, 0)
    segments = collate_segments(rows)
    with torch.no_grad():
        packed = model.hidden(ids, segments)[0]
        total, count = nll_sum(model, ids, labels, segments)
        alone_total, alone_count = 0.0, 0
        for s, e in zip(starts, starts[1:] + [16]):
            alone = torch.tensor([row.ids[s:e]])
            assert torch.allclose(packed[s:e], model.hidden(alone)[0], atol=1e-5)
            t, c = nll_sum(model, alone, torch.tensor([row.labels[s:e]]))
            alone_total, alone_count = alone_total + float(t), alone_count + int(c)
        assert int(count) == alone_count and abs(float(total) - alone_total) < 1e-3
        # without the segments the examples would see each other: the test can tell
        assert not torch.allclose(model.hidden(ids)[0][starts[1]:], packed[starts[1]:], atol=1e-3)
