"""EM, answer extraction and ARCap diagnostics on hand-derived cases."""

import pytest

from dgpo_jax.evaluation import (
    TrajectoryRecord,
    arcap_summary,
    exact_match,
    extract_answer,
    has_gold_hit,
    normalize_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Beatles!", "beatles"),
        ("  An   apple, a day. ", "apple day"),
        ("U.S.A.", "usa"),
        ("theater", "theater"),  # 'the' only as a whole word
        ("Hello\tWorld\n", "hello world"),
    ],
)
def test_normalize(text, expected):
    assert normalize_answer(text) == expected


def test_extract_last_answer():
    r = "<think>x</think><answer> Paris </answer> then <answer>Lyon</answer>"
    assert extract_answer(r) == "Lyon"
    assert extract_answer("<answer>multi\nline</answer>") == "multi\nline"
    assert extract_answer("no tags here") is None
    assert extract_answer("<answer>unclosed") is None


def test_exact_match():
    assert exact_match("the Eiffel Tower", ["Eiffel tower", "x"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match(None, ["a"]) == 0.0
    assert exact_match("Paris.", "paris") == 1.0


def test_hit_is_normalised_and_whole_word():
    resp = "<search>q</search><information>Doc 1(Title: X) The city of PARIS, France.</information>"
    assert has_gold_hit(resp, ["paris"])
    assert not has_gold_hit(resp, ["par"])  # substring of a word is not a hit
    assert not has_gold_hit("<answer>paris</answer>", ["paris"])  # only retrieved text counts


def test_arcap_summary_hand_counted():
    recs = [
        TrajectoryRecord(
            "nq",
            "<search>a</search><information>Doc 1(Title: T) Oslo</information><answer>Oslo</answer>",
            ["oslo"],
            1,
        ),
        TrajectoryRecord("nq", "<think><answer>Rome</answer></think>", ["rome"], 0),
        TrajectoryRecord("hotpotqa", "<answer>wrong</answer>", ["right"], 2),
    ]
    s = arcap_summary(recs)
    assert s["nq"] == {
        "em": 1.0,
        "em_without_think": 0.5,
        "hit_ratio": 0.5,
        "search_calls": 0.5,
        "search_share": 0.5,
        "count": 2.0,
    }
    assert s["hotpotqa"]["em"] == 0.0 and s["hotpotqa"]["search_calls"] == 2.0
    assert s["all"]["em"] == pytest.approx(2 / 3)
    assert s["all"]["search_share"] == pytest.approx(2 / 3)
