"""Retrieved documents, the `Retriever` interface, and the reading of retrieval-API answers."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from dgpo_jax.retrieval.errors import RetrievalResponseError
from dgpo_jax.retrieval.formatting import format_documents


@dataclasses.dataclass(frozen=True)
class Document:
    """One retrieved corpus passage.

    Attributes:
      id: the corpus row's id, as a string.
      contents: the corpus ``contents`` field: a title line, a newline, then the text.
      score: the retriever's score (higher is better), or None when the server sent none.
    """

    id: str
    contents: str
    score: float | None = None

    @property
    def title_line(self) -> str:
        """The first line of `contents`, verbatim (what the reference observation shows)."""
        return self.contents.split("\n", 1)[0]

    @property
    def title(self) -> str:
        """The first line of `contents`, without the double quotes the wiki corpus puts around it."""
        line = self.title_line.strip()
        if len(line) >= 2 and line.startswith('"') and line.endswith('"'):
            line = line[1:-1].strip()
        return line

    @property
    def text(self) -> str:
        """Everything after the first line of `contents` ("" when there is no second line)."""
        parts = self.contents.split("\n", 1)
        return parts[1] if len(parts) == 2 else ""


@runtime_checkable
class Retriever(Protocol):
    """What the sampler needs from a retriever (HTTP or in-process)."""

    def retrieve(self, queries: list[str], topk: int | None = None) -> list[list[Document]]:
        """Top-`topk` documents per query, best first (`topk=None`: the retriever's default)."""
        ...

    def search(self, queries: list[str], topk: int | None = None) -> list[str]:
        """Per query, the retrieved documents formatted as `format_documents` does."""
        ...


class FormattingRetriever(abc.ABC):
    """Base class implementing `search` on top of an abstract `retrieve`."""

    @abc.abstractmethod
    def retrieve(self, queries: list[str], topk: int | None = None) -> list[list[Document]]:
        raise NotImplementedError

    def search(self, queries: list[str], topk: int | None = None) -> list[str]:
        return [format_documents(documents) for documents in self.retrieve(queries, topk)]


def check_queries(queries: Sequence[str]) -> list[str]:
    """Validates a batch of queries: a list (or tuple) of strings. Returns it as a list."""
    if isinstance(queries, str) or not isinstance(queries, Sequence):
        raise TypeError(
            f"queries must be a list of strings, got {type(queries).__name__}"
            + (" (wrap a single query in a list)" if isinstance(queries, str) else "")
        )
    for position, query in enumerate(queries):
        if not isinstance(query, str):
            raise TypeError(f"queries[{position}] must be a str, got {type(query).__name__}")
    return list(queries)


def check_topk(topk: int | None, default_topk: int) -> int:
    """The effective topk: `default_topk` when None; a positive int otherwise."""
    if topk is None:
        return default_topk
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int or None, got {type(topk).__name__}")
    if topk <= 0:
        raise ValueError(f"topk must be positive, got {topk}")
    return topk


def document_from_json(item: Any, where: str) -> Document:
    """Reads one result entry of a retrieval-API answer.

    Accepts both shapes the reference server produces: ``{"document": {...}, "score": s}``
    (return_scores true) and the bare document ``{...}`` (return_scores false). The document
    needs ``contents``; corpora that carry ``title``/``text`` instead are joined the way the wiki
    corpus writes them (``"Title"\\ntext``). A missing ``id`` becomes "".
    """
    if not isinstance(item, dict):
        raise RetrievalResponseError(f"{where}: expected a JSON object, got {type(item).__name__}")
    score = None
    document = item
    if "document" in item:
        document = item["document"]
        score = item.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise RetrievalResponseError(f"{where}.score: expected a number, got {score!r}")
        if not isinstance(document, dict):
            raise RetrievalResponseError(
                f"{where}.document: expected a JSON object, got {type(document).__name__}"
            )
    contents = document.get("contents")
    if contents is None and isinstance(document.get("text"), str):
        title = document.get("title")
        contents = document["text"] if title is None else f'"{title}"\n{document["text"]}'
    if not isinstance(contents, str):
        raise RetrievalResponseError(
            f"{where}: the document has no string 'contents' field (keys: {sorted(document)})"
        )
    doc_id = document.get("id", "")
    return Document(
        id=str(doc_id), contents=contents, score=None if score is None else float(score)
    )


def documents_from_response(
    payload: Any, num_queries: int, source: str = "response"
) -> list[list[Document]]:
    """Reads a ``POST /retrieve`` answer: ``{"result": [[entry, ...] per query]}``.

    Raises RetrievalResponseError naming the offending position when the answer does not follow
    the API (including a result count that differs from `num_queries`).
    """
    if not isinstance(payload, dict) or "result" not in payload:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise RetrievalResponseError(
            f"{source}: expected an object with a 'result' field, got {keys}"
        )
    result = payload["result"]
    if not isinstance(result, list):
        raise RetrievalResponseError(
            f"{source}.result: expected a list, got {type(result).__name__}"
        )
    if len(result) != num_queries:
        raise RetrievalResponseError(
            f"{source}.result: {len(result)} result lists for {num_queries} queries"
        )
    documents = []
    for query_index, entries in enumerate(result):
        where = f"{source}.result[{query_index}]"
        if not isinstance(entries, list):
            raise RetrievalResponseError(f"{where}: expected a list, got {type(entries).__name__}")
        documents.append(
            [document_from_json(entry, f"{where}[{rank}]") for rank, entry in enumerate(entries)]
        )
    return documents
