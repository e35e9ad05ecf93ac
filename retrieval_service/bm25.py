"""BM25 (Lucene variant) over an index's documents, with bm25s.

Text is analysed the same way for documents and queries: lowercase, runs of letters/digits as
terms, English stop words removed (bm25s's list), no stemming.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from retrieval_service.index import IndexFormatError, IndexManifest, SearchIndex
from retrieval_service.store import DocumentStore

ANALYZER = "lowercase-alnum-words-en-stopwords-v1"
BM25_DIR = "bm25"
_TERM_PATTERN = re.compile(r"\w+")


def _import_bm25s():
    """Imports bm25s without letting it start JAX.

    bm25s.selection imports jax at import time when it can, and then runs an op on JAX's default
    device (in a server process that would claim GPU memory for nothing). When this process has
    not imported JAX itself, jax is hidden during the import so bm25s falls back to NumPy.
    """
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    hide_jax = "jax" not in sys.modules
    if hide_jax:
        sys.modules["jax"] = None  # makes `import jax` raise ImportError
    try:
        import bm25s  # noqa: PLC0415 (retrieval extra, loaded on use)
    finally:
        if hide_jax and sys.modules.get("jax", 0) is None:
            del sys.modules["jax"]
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets itself to DEBUG
    return bm25s


def analyze(text: str, stopwords: frozenset[str]) -> list[str]:
    """The BM25 terms of a text: lowercase word runs, stop words removed."""
    return [term for term in _TERM_PATTERN.findall(text.lower()) if term not in stopwords]


def english_stopwords() -> frozenset[str]:
    return frozenset(_import_bm25s().stopwords.STOPWORDS_EN)


def build_bm25(
    store: DocumentStore, out_dir: str, *, k1: float, b: float, show_progress: bool = True
) -> dict:
    """Indexes every document of `store` into ``out_dir/bm25``. Returns the manifest params."""
    bm25s = _import_bm25s()
    stopwords = english_stopwords()
    terms = []
    with tqdm(total=len(store), desc="bm25 analyse", unit="doc", disable=not show_progress) as bar:
        for chunk in store.iter_contents():
            terms.extend(analyze(text, stopwords) for text in chunk)
            bar.update(len(chunk))
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene", backend="numpy")
    retriever.index(terms, show_progress=show_progress)
    retriever.save(os.path.join(out_dir, BM25_DIR), show_progress=False)
    return {"k1": k1, "b": b, "method": "lucene", "analyzer": ANALYZER}


class BM25Index(SearchIndex):
    """Scores queries against the bm25s index arrays directly.

    bm25s stores, per term, the BM25 contribution of every document holding it (a CSC matrix:
    `data`, `indices`, `indptr`). A query's scores are the sum of its terms' columns (a repeated
    query term counts again, as in Lucene). This is bm25s's own numpy scoring with a vectorised
    scatter-add in place of `np.add.at` (several times faster), and ties are broken by the
    lower document row, so results are deterministic.
    """

    def __init__(self, index_dir: str, manifest: IndexManifest, store: DocumentStore):
        super().__init__(index_dir, manifest, store)
        analyzer = manifest.params.get("analyzer")
        if analyzer != ANALYZER:
            raise IndexFormatError(
                f"{index_dir}: built with analyzer {analyzer!r}, "
                f"this code analyses queries with {ANALYZER!r}; rebuild the index"
            )
        bm25_dir = os.path.join(index_dir, BM25_DIR)
        if not os.path.isdir(bm25_dir):
            raise IndexFormatError(f"{index_dir}: the {BM25_DIR}/ directory is missing")
        bm25s = _import_bm25s()
        retriever = bm25s.BM25.load(bm25_dir, mmap=False, load_corpus=False, show_progress=False)
        arrays = retriever.scores
        if int(arrays["num_docs"]) != manifest.num_documents:
            raise IndexFormatError(
                f"{index_dir}: bm25 index has {arrays['num_docs']} documents, "
                f"the manifest says {manifest.num_documents}"
            )
        self._data = np.asarray(arrays["data"], dtype=np.float32)
        self._indices = np.asarray(arrays["indices"])
        self._indptr = np.asarray(arrays["indptr"])
        num_terms = len(self._indptr) - 1
        self._term_ids = {
            term: term_id
            for term, term_id in retriever.vocab_dict.items()
            if 0 <= term_id < num_terms
        }
        self._stopwords = english_stopwords()

    def scores(self, query: str) -> np.ndarray:
        """float32 [num_documents]: the BM25 score of every document for one query."""
        scores = np.zeros(self.num_documents, dtype=np.float32)
        for term in analyze(query, self._stopwords):
            term_id = self._term_ids.get(term)
            if term_id is not None:
                start, end = self._indptr[term_id], self._indptr[term_id + 1]
                # Each document appears once per term, so a plain scatter-add is exact.
                scores[self._indices[start:end]] += self._data[start:end]
        return scores

    def search(self, queries: Sequence[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(topk), self.num_documents)
        rows = np.zeros((len(queries), k), dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        for position, query in enumerate(queries):
            query_scores = self.scores(query)
            rows[position] = top_k_rows(query_scores, k)
            scores[position] = query_scores[rows[position]]
        return rows, scores


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """int64 [k]: rows of the `k` highest scores, best first, ties to the lower row."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable").astype(np.int64)
    # The k-th highest score. (Partitioning the negated scores at k-1 rather than the scores at
    # n-k: numpy's introselect is ~10x slower near the end of an array of few distinct values.)
    threshold = -np.partition(-scores, k - 1)[k - 1]
    above = np.flatnonzero(scores > threshold)  # fewer than k rows
    tied = np.flatnonzero(scores == threshold)[: k - len(above)]  # the lowest rows at the threshold
    candidates = np.concatenate([above, tied])
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order].astype(np.int64)
