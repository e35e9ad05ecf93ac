"""The text of the agentic-search protocol (Search-R1, reused by DGPO).

Everything the rollout inserts into or reads from a trajectory as text lives here, so that the
sampler, the trainer and the retrievers agree byte for byte with the reference implementation
(see docs/retrieval.md and the protocol notes):

- `SEARCH_R1_PROMPT_TEMPLATE` / `format_prompt`: the user message for a question;
- `format_documents`: retrieved documents as ``Doc {i}(Title: {title}) {text}`` lines;
- `information_observation`: the observation appended after a search;
- `INVALID_ACTION_NOTICE`: the observation appended after a turn with neither action;
- `parse_action`: the first ``<search>`` / ``<answer>`` action of a turn.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dgpo_jax.retrieval.documents import Document

# The reference training prompt, typo ("as your want") included: the released checkpoints were
# trained on exactly this text. `{question}` is the only placeholder.
SEARCH_R1_PROMPT_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {question}\n"
)

# Observation after a turn that holds neither a <search> nor an <answer> action.
INVALID_ACTION_NOTICE = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)

# The protocol's special tags, in the order they usually appear.
PROTOCOL_TAGS = (
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<information>",
    "</information>",
    "<answer>",
    "</answer>",
)

ACTION_PATTERN = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


def format_prompt(question: str, template: str = SEARCH_R1_PROMPT_TEMPLATE) -> str:
    """Fills the prompt template: the question is stripped and gets a trailing '?' if it has none."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if "{question}" not in template:
        raise ValueError("prompt template has no '{question}' placeholder")
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return template.replace("{question}", question)


def format_documents(documents: Iterable[Document], strip_title_quotes: bool = False) -> str:
    """Documents as the reference observation text: one ``Doc {i}(Title: {title}) {text}`` line each.

    `title` is the first line of the document's contents, verbatim (the wiki corpus keeps its
    surrounding double quotes there and the reference checkpoints saw them), and `text` the
    rest. Every line ends with a newline, as in the reference; `information_observation` strips
    the trailing one. `strip_title_quotes=True` uses `Document.title` (quotes removed) instead.
    """
    lines = []
    for index, document in enumerate(documents, start=1):
        title = document.title if strip_title_quotes else document.title_line
        lines.append(f"Doc {index}(Title: {title}) {document.text}\n")
    return "".join(lines)


def information_observation(documents_text: str) -> str:
    """The observation appended after a search: ``\\n\\n<information>{docs}</information>\\n\\n``.

    `documents_text` is stripped of surrounding whitespace first, as the reference does.
    """
    return f"\n\n<information>{documents_text.strip()}</information>\n\n"


def parse_action(turn_text: str) -> tuple[str | None, str]:
    """The first well-formed action of a turn: ``("search" | "answer", stripped content)``.

    Returns ``(None, "")`` when the turn holds neither ``<search>…</search>`` nor
    ``<answer>…</answer>``; the caller then appends `INVALID_ACTION_NOTICE`.
    """
    match = ACTION_PATTERN.search(turn_text)
    if match is None:
        return None, ""
    return match.group(1), match.group(2).strip()
