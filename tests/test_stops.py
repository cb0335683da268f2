"""Stop strings matched incrementally (KMP) agree with the plain definition, in linear time."""

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from dialogen.decoding.stops import StopMatcher, prefix_table

small = st.text(alphabet="abc", max_size=12)


def _naive(text: str, stops: list[str]) -> tuple[int | None, int]:
    """(the earliest start of a stop string in text, the longest proper stop prefix text ends with)."""
    starts = [text.index(s) for s in stops if s and s in text]
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return (min(starts) if starts else None), hold


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(small, max_size=8), stops=st.lists(small, max_size=4))
def test_incremental_matching_equals_the_definition(pieces, stops):
    m, text = StopMatcher(stops), ""
    for piece in pieces:
        text += piece
        cut = m.update(text)
        want_cut, want_hold = _naive(text, stops)
        assert cut == want_cut
        if cut is not None:
            break
        assert m.hold == want_hold


def test_a_rewritten_tail_is_matched_afresh():
    m = StopMatcher(["xy"])
    assert m.update("ab\ufffd") is None and m.hold == 0
    assert m.update("abx") is None and m.hold == 1  # the decoder replaced a character it had shown
    assert m.update("abxy") == 2


def test_prefix_table():
    assert prefix_table("abab") == [0, 0, 1, 2] and prefix_table("aaaa") == [0, 1, 2, 3] and prefix_table("") == []


def test_long_stops_cost_linear_time():
    """4 stop strings of 100k characters that a reply keeps almost matching: the old per-token
    prefix scan was quadratic in their length (minutes); this is a fraction of a second."""
    stops = ["a" * 99_999 + c for c in "bcde"]
    m = StopMatcher(stops)
    t0 = time.perf_counter()
    text = ""
    for _ in range(200):  # 200 tokens of 5 characters, each keeping every stop's prefix alive
        text += "aaaaa"
        assert m.update(text) is None
    assert m.hold == 1000
    assert time.perf_counter() - t0 < 5


def test_total_stop_length_is_capped_in_the_cli_and_the_api():
    import pytest

    from dialogen.decoding.settings import MAX_STOP_CHARS, Sampling
    from dialogen.errors import UserError
    from dialogen.serve.protocol import ApiError, validate
    from dialogen.serve.schema import ChatRequest

    half = "x" * (MAX_STOP_CHARS // 2)
    assert Sampling(stop=[half, half]).stop == [half, half]
    with pytest.raises(UserError, match="--stop"):
        Sampling(stop=[half, half + "y"])
    body = {"messages": [{"role": "user", "content": "hi"}], "stop": [half, half + "y"]}
    with pytest.raises(ApiError) as e:
        validate(ChatRequest, body)
    assert e.value.param == "stop" and str(MAX_STOP_CHARS) in e.value.message
