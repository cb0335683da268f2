"""Property-based fuzzing (hypothesis) of the HTTP API and the CLI's readers, at a size for CI.

The HTTP API: random bodies for every field of every route (mostly valid, one field replaced
by any JSON, any JSON, bytes that are not JSON), random session ids, methods and content types,
against the real app in this process: never a 5xx, never a hang, errors in OpenAI's shape, and
the app still answers afterwards. The CLI: messages files and stdin for `generate`, every data
format for `train` (with and without --skip-bad), piped stdin for `chat`: never a traceback,
exit 2 with one line naming the file. `bench/fuzz.py` runs the same checks 10,000+ times.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fuzzing as F
from inprocess import InProcessServer

EXAMPLES = int(os.environ.get("DIALOGEN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    srv = InProcessServer(tiny_llama[0], tmp_path_factory.mktemp("fuzz") / "sessions.db")
    sid = srv.request("POST", "/v1/sessions", json={"persona": "You are kind."}).json()["id"]
    yield srv, sid
    srv.close()


def test_http_api_never_fails_on_the_server_side(server):
    srv, sid = server

    @FUZZ
    @given(F.REQUEST)
    def one(req):
        found = F.check_request(srv, sid, req)
        assert found is None, found

    one()
    assert srv.request("GET", "/health").json()["status"] == "ok"  # still answering
    ok = srv.request("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_cli_messages_files_and_stdin(tmp_path):
    @FUZZ
    @given(F.MESSAGES_FILE, st.booleans())
    def one(raw, via_stdin):
        found = F.check_messages_file(tmp_path, raw, via_stdin)
        assert found is None, found

    one()


def test_cli_data_formats(tmp_path):
    @FUZZ
    @given(F.DATA_FILE, st.booleans())
    def one(data, skip_bad):
        found = F.check_data_file(tmp_path, data[0], data[1], skip_bad)
        assert found is None, found

    one()


def test_cli_chat_stdin(tiny_llama):
    from dialogen.chat.session import Session, load_engine
    from dialogen.decoding.settings import Sampling

    session = Session(load_engine(str(tiny_llama[0]), "chatml"), sampling=Sampling(max_new_tokens=1))

    @settings(FUZZ, max_examples=max(10, EXAMPLES // 3))
    @given(F.CHAT_STDIN)
    def one(raw):
        found = F.check_chat_stdin(session, raw)
        assert found is None, found

    one()


def test_a_tiny_temperature_samples_a_token():
    """Found by the fuzzer: logits / 1e-300 overflowed to inf and softmax gave NaN (a 500)."""
    from dialogen.decoding.processors import next_token
    from dialogen.decoding.settings import Sampling

    logits = torch.tensor([1.0, 3.0, 2.0])
    for t in (1e-300, 1e-30, 5e-324):
        s = Sampling(temperature=t, top_k=0, top_p=1.0, repetition_penalty=1.0)
        assert next_token(logits, s, torch.Generator().manual_seed(0), [], []) == 1
