"""Exact match (the outcome reward and the reported metric) and ARCap diagnostics.

Follows the Search-R1 / DGPO protocol (PeterGriffinJin/Search-R1
``verl/utils/reward_score/qa_em.py``):

* the answer is the *last* ``<answer>...</answer>`` in the response (the reference counts the
  prompt's example answer too; scoring the response alone gives the same answer whenever the
  response has one, and no answer otherwise);
* normalisation: lowercase, drop ASCII punctuation, drop the words a/an/the, collapse
  whitespace; EM = 1 when the normalised prediction equals any normalised gold answer.

ARCap (agentic RAG capability) diagnostics, per data source: EM; EM with the think blocks
removed from the response before scoring (a response whose only answer sat inside a think block
loses it); hit ratio: a gold answer appears in some retrieved ``<information>`` block, with
*both sides normalised* (the reference used a case-sensitive raw substring test; normalising is
deliberate and documented here); mean search calls; share of trajectories that search at all.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Sequence

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_INFO = re.compile(r"<information>(.*?)</information>", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, remove ASCII punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_answer(response: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` in ``response`` (stripped), or None."""
    matches = _ANSWER.findall(response)
    return matches[-1].strip() if matches else None


def exact_match(prediction: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    if prediction is None:
        return 0.0
    if isinstance(golds, str):
        golds = [golds]
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def strip_think(response: str) -> str:
    """The response with every ``<think>...</think>`` block removed."""
    return _THINK.sub("", response)


def has_gold_hit(response: str, golds: str | Sequence[str]) -> bool:
    """A normalised gold answer occurs (as whole words) in a retrieved information block."""
    if isinstance(golds, str):
        golds = [golds]
    blocks = [" " + normalize_answer(b) + " " for b in _INFO.findall(response)]
    targets = [" " + normalize_answer(g) + " " for g in golds if normalize_answer(g)]
    return any(t in b for b in blocks for t in targets)


@dataclasses.dataclass
class TrajectoryRecord:
    """What evaluation needs from one finished trajectory."""

    data_source: str
    response: str  # generated text, observations included (prompt excluded)
    golds: Sequence[str]
    num_searches: int


def search_tags(response: str) -> int:
    """``<search>`` tags the model wrote in its response (the DGPO reference's count,
    ``verl/trainer/main_ppo.py``, over prompt and response minus the prompt's own mention),
    whether or not the search ran (a tag after the turn budget is not executed)."""
    return response.count("<search>")


def arcap_summary(records: Iterable[TrajectoryRecord]) -> dict[str, dict[str, float]]:
    """Per data source (and ``"all"``): em, em_without_think, hit_ratio, search_calls (searches
    the sampler executed), search_share (trajectories with at least one executed search),
    search_tags and search_tag_share (the same from the ``<search>`` tags written, the DGPO
    reference's definition), count."""
    groups: dict[str, list[TrajectoryRecord]] = defaultdict(list)
    for r in records:
        groups[r.data_source].append(r)
        groups["all"].append(r)
    out = {}
    for source, rs in sorted(groups.items()):
        n = len(rs)
        out[source] = {
            "em": sum(exact_match(extract_answer(r.response), r.golds) for r in rs) / n,
            "em_without_think": sum(
                exact_match(extract_answer(strip_think(r.response)), r.golds) for r in rs
            )
            / n,
            "hit_ratio": sum(has_gold_hit(r.response, r.golds) for r in rs) / n,
            "search_calls": sum(r.num_searches for r in rs) / n,
            "search_share": sum(r.num_searches > 0 for r in rs) / n,
            "search_tags": sum(search_tags(r.response) for r in rs) / n,
            "search_tag_share": sum(search_tags(r.response) > 0 for r in rs) / n,
            "count": float(n),
        }
    return out


def greedy_vs_sampled(greedy: Iterable[dict], sampled: Iterable[dict]) -> dict[str, dict]:
    """Does a policy *know* an answer or only *prefer* it? Greedy against sampled decoding of
    the same questions.

    ``greedy``: one prediction row per question; ``sampled``: k rows per question (k >= 1, the
    same k for every question). A row needs ``index`` (the question's position in the evaluated
    records), ``data_source`` and ``em``. Per data source (and ``"all"``): ``greedy_em``,
    ``sampled_em`` (the mean over all sampled rows), ``pass_at_k`` (share of questions with a
    correct sample), ``k``, and the sampled EM split by the greedy outcome:
    ``sampled_em_greedy_right`` / ``sampled_em_greedy_wrong`` over ``n_greedy_right`` /
    ``n_greedy_wrong`` questions (None when that count is 0).

    Reading it: RL that only sharpens raises ``sampled_em_greedy_right`` (the greedy answer was
    already right) and leaves greedy EM where it was; learning something new shows up as
    ``sampled_em_greedy_wrong`` and greedy EM rising (docs/quickstart.md).
    """
    first: dict[int, tuple[str, float]] = {}
    for row in greedy:
        i = int(row["index"])
        if i in first:
            raise ValueError(f"greedy_vs_sampled: question {i} has two greedy predictions")
        first[i] = (row["data_source"], float(row["em"]))
    draws: dict[int, list[float]] = defaultdict(list)
    for row in sampled:
        i = int(row["index"])
        if i not in first:
            raise ValueError(f"greedy_vs_sampled: sampled question {i} has no greedy prediction")
        draws[i].append(float(row["em"]))
    counts = {len(v) for v in draws.values()}
    if set(draws) != set(first) or len(counts) != 1:
        raise ValueError(
            "greedy_vs_sampled: every question needs the same number (>= 1) of "
            f"sampled predictions; got counts {sorted(counts)} over "
            f"{len(draws)} of {len(first)} questions"
        )
    k = counts.pop()
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (source, _) in first.items():
        groups[source].append(i)
        groups["all"].append(i)

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    out = {}
    for source, idx in sorted(groups.items()):
        right = [i for i in idx if first[i][1] > 0]
        wrong = [i for i in idx if first[i][1] == 0]
        out[source] = {
            "greedy_em": mean([first[i][1] for i in idx]),
            "sampled_em": mean([x for i in idx for x in draws[i]]),
            "pass_at_k": mean([float(max(draws[i]) > 0) for i in idx]),
            "k": k,
            "sampled_em_greedy_right": mean([x for i in right for x in draws[i]]),
            "sampled_em_greedy_wrong": mean([x for i in wrong for x in draws[i]]),
            "n_greedy_right": len(right),
            "n_greedy_wrong": len(wrong),
        }
    return out
