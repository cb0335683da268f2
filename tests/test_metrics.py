"""Metrics against hand-computed values on tiny fixtures, and BLEU against sacrebleu."""

import math

import pytest
import sacrebleu

from dialogen.eval.metrics import avg_length, bleu, distinct_n, entropy_n, reply_metrics, words

REPLIES = ["The cat sat", "the cat ran away"]


def test_words_lowercase_and_split_punctuation():
    assert words("Hello, World! It's 3pm.") == ["hello", ",", "world", "!", "it", "'", "s", "3pm", "."]


def test_distinct_n_by_hand():
    # unigrams: the cat sat the cat ran away -> 5 distinct of 7
    assert distinct_n(REPLIES, 1) == pytest.approx(5 / 7)
    # bigrams: (the cat) twice, (cat sat), (cat ran), (ran away) -> 4 distinct of 5
    assert distinct_n(REPLIES, 2) == pytest.approx(4 / 5)
    assert distinct_n(["hi"], 2) == 0.0  # no bigram at all


def test_entropy_by_hand():
    # bigram counts 2, 1, 1, 1 of 5
    expected = -(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2))
    assert entropy_n(REPLIES, 2) == pytest.approx(expected)
    # 4-grams: (a b c d) twice, (b c d e), (b c d f) -> p = 1/2, 1/4, 1/4
    assert entropy_n(["a b c d e", "a b c d f"], 4) == pytest.approx(1.5 * math.log(2))
    assert entropy_n(["same words here", "same words here"], 1) == pytest.approx(math.log(3))


def test_avg_length_by_hand():
    assert avg_length(REPLIES) == 3.5
    assert avg_length(["Yes!", "no"]) == 1.5


def test_bleu2_by_hand_single_reference():
    # unigram precision 5/6 (sat unmatched), bigram 3/5 (the cat, on the, the mat); equal lengths: BP = 1
    got = bleu(["the cat sat on the mat"], [["the cat is on the mat"]], max_order=2)
    assert got == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5), abs=1e-6)


def test_bleu2_by_hand_multi_reference_corpus():
    # reply 1 against two references: unigrams 3/3 (clipped by the max count over references),
    # bigrams 1/2 (cat sat); reply 2: 2/2 and 1/1. Corpus: 5/5 and 2/3; closest reference
    # lengths 3 + 2 = reply lengths: BP = 1
    got = bleu(["the cat sat", "a dog"], [["a cat sat", "the dog"], ["a dog"]], max_order=2)
    assert got == pytest.approx(100 * math.sqrt(2 / 3), abs=1e-6)


def test_bleu_equals_sacrebleu_with_a_variable_number_of_references():
    replies = ["i think so , yes", "no idea what you mean", "Sounds great! See you then."]
    refs = [["i think so too", "yes , i think so"], ["what do you mean ?"],
            ["Sounds good, see you then!", "great , see you", "ok"]]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(3)]
    for order in (2, 4):
        expected = sacrebleu.metrics.BLEU(max_ngram_order=order, lowercase=True).corpus_score(replies, streams).score
        assert bleu(replies, refs, order) == pytest.approx(expected)
    assert bleu(replies, refs, 4) != bleu(replies, [r[:1] for r in refs], 4)  # the extra references count


def test_reply_metrics_has_every_column():
    m = reply_metrics(REPLIES, [["the cat sat"], ["a cat ran off"]])
    assert set(m) == {"bleu2", "bleu4", "dist1", "dist2", "entropy4", "avg_len"}
    assert m["dist1"] == pytest.approx(5 / 7) and m["avg_len"] == 3.5


def test_bad_reference_lists():
    with pytest.raises(ValueError):
        bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        bleu(["a"], [[]])
