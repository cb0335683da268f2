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
