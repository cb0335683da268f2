"""The GGUF loader on mutated files (hypothesis): header numbers of a tiny model file rewritten
(dimensions, types, offsets, counts, lengths) or the file cut short. Every mutation either loads
and answers or is refused with one line (exit 2); none crashes the process, raises a traceback,
runs over 10 s or takes more than twice the file's size plus a fixed bound in memory.

DIALOGEN_GGUF_FUZZ sets the number of mutations (default 150; bench/fuzz.py --gguf runs 10,000)."""

import os

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

import gguf_fuzz as G

EXAMPLES = int(os.environ.get("DIALOGEN_GGUF_FUZZ", "150"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    where = tmp_path_factory.mktemp("gguf_fuzz")
    base = G.base_file(where)
    worker = G.Worker()
    yield where, base, G.header_fields(base), worker
    worker.close()


def test_the_base_file_loads_and_answers(setup):
    _, base, _, worker = setup
    result = worker.run(base)
    assert result["outcome"] == "ok", result
    assert G.finding(result, base.stat().st_size) is None


def test_mutated_headers_load_or_exit_2_in_one_line(setup):
    where, base, fields, worker = setup
    raw, size = base.read_bytes(), base.stat().st_size
    outcomes, findings = {"ok": 0, "exit 2": 0}, []

    @seed(2027)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(G.mutations(fields))
    def one(mutation):
        path = where / f"m{sum(outcomes.values())}.gguf"  # a new file each time: its own index
        path.write_bytes(G.apply(raw, mutation))
        result = worker.run(path)
        outcomes[result["outcome"]] = outcomes.get(result["outcome"], 0) + 1
        path.unlink()
        found = G.finding(result, size)
        if found:
            findings.append((found, mutation))

    one()
    assert not findings, findings[:3]
    assert sum(outcomes.values()) == EXAMPLES and outcomes["exit 2"] > EXAMPLES // 3, outcomes


def test_a_block_count_past_the_tensors_is_refused_at_once(setup):
    """The one finding of a 10,000-mutation run: block_count rewritten to 13,009,223 built the
    expected-tensor table of that many blocks (minutes, gigabytes) before any check."""
    where, base, _, worker = setup
    from dialogen.models.gguf_header import read_header

    pos, fmt = next((p, f) for what, p, f in read_header(base).fields if what == "llama.block_count")
    path = where / "blocks.gguf"
    path.write_bytes(G.apply(base.read_bytes(), ([((pos, fmt), 13_009_223)], None)))
    result = worker.run(path)
    assert result["outcome"] == "exit 2" and "llama.block_count=13009223" in result["text"], result
