"""EM, answer extraction and ARCap diagnostics on hand-derived cases."""

import pytest

from dgpo_jax.evaluation import (
    TrajectoryRecord,
    arcap_summary,
    exact_match,
    extract_answer,
    greedy_vs_sampled,
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
        "search_tags": 0.5,
        "search_tag_share": 0.5,
        "count": 2.0,
    }
    # two searches executed, no tag in the response text: the two definitions differ
    assert s["hotpotqa"]["em"] == 0.0 and s["hotpotqa"]["search_calls"] == 2.0
    assert s["hotpotqa"]["search_tags"] == 0.0
    # a tag written after the turn budget is counted as a tag, not as a search
    late = arcap_summary([TrajectoryRecord("x", "<search>a</search> <search>b</search>", [], 1)])
    assert (late["x"]["search_calls"], late["x"]["search_tags"]) == (1.0, 2.0)
    assert s["all"]["em"] == pytest.approx(2 / 3)
    assert s["all"]["search_share"] == pytest.approx(2 / 3)


def test_greedy_vs_sampled_hand_counted():
    greedy = [
        {"index": 0, "data_source": "nq", "em": 1.0},
        {"index": 1, "data_source": "nq", "em": 0.0},
        {"index": 2, "data_source": "hotpotqa", "em": 0.0},
    ]
    # two draws per question, rows in any order
    sampled = [
        {"index": i, "data_source": s, "em": e}
        for i, s, e in [
            (0, "nq", 1.0),
            (1, "nq", 0.0),
            (2, "hotpotqa", 0.0),
            (2, "hotpotqa", 0.0),
            (1, "nq", 1.0),
            (0, "nq", 0.0),
        ]
    ]
    out = greedy_vs_sampled(greedy, sampled)
    assert out["nq"] == {
        "greedy_em": 0.5,
        "sampled_em": 0.5,
        "pass_at_k": 1.0,
        "k": 2,
        "sampled_em_greedy_right": 0.5,
        "sampled_em_greedy_wrong": 0.5,
        "n_greedy_right": 1,
        "n_greedy_wrong": 1,
    }
    assert out["hotpotqa"] == {
        "greedy_em": 0.0,
        "sampled_em": 0.0,
        "pass_at_k": 0.0,
        "k": 2,
        "sampled_em_greedy_right": None,
        "sampled_em_greedy_wrong": 0.0,
        "n_greedy_right": 0,
        "n_greedy_wrong": 1,
    }
    a = out["all"]
    assert (a["greedy_em"], a["sampled_em"], a["pass_at_k"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    assert (a["sampled_em_greedy_right"], a["sampled_em_greedy_wrong"]) == (0.5, 0.25)
    assert (a["n_greedy_right"], a["n_greedy_wrong"]) == (1, 2)


def test_greedy_vs_sampled_rejects_mismatched_rows():
    g = [{"index": 0, "data_source": "nq", "em": 1.0}, {"index": 1, "data_source": "nq", "em": 0.0}]
    with pytest.raises(ValueError, match="question 0 has two greedy"):
        greedy_vs_sampled(g + g[:1], [])
    with pytest.raises(ValueError, match="sampled question 5 has no greedy"):
        greedy_vs_sampled(g, [{"index": 5, "data_source": "nq", "em": 0.0}])
    with pytest.raises(ValueError, match=r"same number .* counts \[1, 2\]"):
        greedy_vs_sampled(g, [dict(g[0]), dict(g[0]), dict(g[1])])
    with pytest.raises(ValueError, match="over 1 of 2 questions"):
        greedy_vs_sampled(g, [dict(g[0])])
