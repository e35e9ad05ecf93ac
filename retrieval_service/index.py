"""Index directories: building one from a corpus, loading one, and the `SearchIndex` interface.

An index directory holds::

    manifest.json     what was built: kind, corpus hash, document count, encoder, dimension
    documents.arrow   the documents (id, contents); row i is document number i
    bm25/             bm25s files            (kind "bm25")
    dense/            faiss.index            (kind "dense")

It is built in a sibling temporary directory and renamed into place at the end, so a failed
build leaves nothing behind.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dgpo_jax.errors import InvalidArgumentError, OutputExistsError, UserError
from retrieval_service.corpus import CorpusStats, iter_corpus
from retrieval_service.store import DocumentStore, write_documents

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DOCUMENTS_NAME = "documents.arrow"
FORMAT_VERSION = 1
INDEX_KINDS = ("bm25", "dense")


class IndexFormatError(UserError, ValueError):
    """An index directory is missing files or does not match its manifest."""


@dataclasses.dataclass(frozen=True)
class IndexManifest:
    """The contents of manifest.json.

    Attributes:
      kind: "bm25" or "dense".
      num_documents: rows in documents.arrow.
      corpus_path, corpus_sha256: the corpus file the index was built from, and its hash.
      encoder: the dense encoder's settings (`TextEncoder.describe()`), None for BM25.
      dimension: embedding size for dense indexes, None for BM25.
      params: kind-specific settings (BM25 k1/b/analyzer, FAISS index type).
    """

    kind: str
    num_documents: int
    corpus_path: str
    corpus_sha256: str
    encoder: dict | None
    dimension: int | None
    params: dict
    created_at: str
    build_seconds: float
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, index_dir: str | os.PathLike) -> IndexManifest:
        path = os.path.join(index_dir, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise IndexFormatError(
                f"{index_dir} is not an index directory: {MANIFEST_NAME} is missing "
                "(build one with python -m retrieval_service.build_index)"
            )
        try:
            with open(path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except json.JSONDecodeError as exc:
            raise IndexFormatError(
                f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})"
            ) from None
        names = {field.name for field in dataclasses.fields(cls)}
        missing = sorted(names - set(raw) - {"format_version"})
        if missing:
            raise IndexFormatError(f"{path}: missing fields {missing}")
        if raw.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path}: format_version {raw['format_version']}, this code reads {FORMAT_VERSION}"
            )
        if raw["kind"] not in INDEX_KINDS:
            raise IndexFormatError(
                f"{path}: unknown kind {raw['kind']!r}, expected one of {INDEX_KINDS}"
            )
        return cls(**{name: raw[name] for name in names if name in raw})


class SearchIndex(abc.ABC):
    """A loaded index: queries in, document rows and scores out (thread-safe reads)."""

    def __init__(self, index_dir: str, manifest: IndexManifest, store: DocumentStore):
        self.index_dir = index_dir
        self.manifest = manifest
        self.store = store
        if len(store) != manifest.num_documents:
            raise IndexFormatError(
                f"{index_dir}: {DOCUMENTS_NAME} holds {len(store)} documents, "
                f"the manifest says {manifest.num_documents}"
            )

    @property
    def num_documents(self) -> int:
        return self.manifest.num_documents

    @abc.abstractmethod
    def search(self, queries: Sequence[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """Top documents per query, best first.

        Returns:
          rows: int64 [len(queries), k], document row numbers, k = min(topk, num_documents).
          scores: float32 [len(queries), k].
        """

    def search_documents(
        self, queries: Sequence[str], topk: int
    ) -> list[list[tuple[str, str, float]]]:
        """Per query, ``(id, contents, score)`` of the top documents, best first."""
        rows, scores = self.search(queries, topk)
        return [
            [(*self.store.get(int(row)), float(score)) for row, score in zip(row_list, score_list)]
            for row_list, score_list in zip(rows, scores)
        ]

    def describe(self) -> dict[str, Any]:
        """Summary for /health and logs."""
        manifest = self.manifest
        return {
            "path": os.path.abspath(self.index_dir),
            "kind": manifest.kind,
            "num_documents": manifest.num_documents,
            "corpus_sha256": manifest.corpus_sha256,
            "encoder": None if manifest.encoder is None else manifest.encoder.get("name"),
            "dimension": manifest.dimension,
        }


def build_index(
    corpus_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    kind: str,
    *,
    encoder: str | None = None,
    device: str | None = None,
    batch_size: int = 64,
    faiss_index: str = "flat",
    hnsw_m: int = 32,
    k1: float = 1.5,
    b: float = 0.75,
    overwrite: bool = False,
    show_progress: bool = True,
    torch_threads: int | None = None,
) -> IndexManifest:
    """Builds an index directory from a JSON-lines corpus (see the module docstring).

    Args:
      kind: "bm25" (bm25s, Lucene scoring) or "dense" (sentence-transformers + FAISS).
      encoder: dense model directory; None: the bundled all-MiniLM-L6-v2.
      faiss_index: "flat" (exact inner product) or "hnsw" (approximate, `hnsw_m` links).
      overwrite: replace an existing `out_dir` (only once the new index is complete).
      torch_threads: torch CPU threads while encoding (see `TextEncoder`); None: torch's default.
    """
    if kind not in INDEX_KINDS:
        raise InvalidArgumentError(f"unknown index kind {kind!r}, expected one of {INDEX_KINDS}")
    if faiss_index not in ("flat", "hnsw"):
        raise InvalidArgumentError(
            f"unknown faiss index {faiss_index!r}, expected 'flat' or 'hnsw'"
        )
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise OutputExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    started = time.perf_counter()
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out_dir)}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        stats = CorpusStats(os.fspath(corpus_path))
        num_documents = write_documents(
            os.path.join(staging, DOCUMENTS_NAME),
            iter_corpus(corpus_path, stats, show_progress=show_progress),
        )
        store = DocumentStore(os.path.join(staging, DOCUMENTS_NAME))
        encoder_info, dimension = None, None
        if kind == "bm25":
            from retrieval_service.bm25 import build_bm25  # noqa: PLC0415 (back end and its optional dependency loaded on use)

            params = build_bm25(store, staging, k1=k1, b=b, show_progress=show_progress)
        else:
            from retrieval_service.dense import build_dense  # noqa: PLC0415 (back end and its optional dependency loaded on use)
            from retrieval_service.encoders import TextEncoder  # noqa: PLC0415 (back end and its optional dependency loaded on use)

            text_encoder = TextEncoder(
                encoder, device=device, batch_size=batch_size, num_threads=torch_threads
            )
            params = build_dense(
                store,
                staging,
                text_encoder,
                faiss_index=faiss_index,
                hnsw_m=hnsw_m,
                show_progress=show_progress,
            )
            encoder_info, dimension = text_encoder.describe(), text_encoder.dimension
        manifest = IndexManifest(
            kind=kind,
            num_documents=num_documents,
            corpus_path=os.path.abspath(corpus_path),
            corpus_sha256=stats.sha256,
            encoder=encoder_info,
            dimension=dimension,
            params={**params, "ignored_corpus_fields": sorted(stats.ignored_fields)},
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            build_seconds=round(time.perf_counter() - started, 3),
        )
        with open(os.path.join(staging, MANIFEST_NAME), "w", encoding="utf-8") as handle:
            handle.write(manifest.to_json() + "\n")
        del store
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "built %s index of %d documents in %s (%.1f s)",
        kind,
        num_documents,
        out_dir,
        manifest.build_seconds,
    )
    return manifest


def load_index(
    index_dir: str | os.PathLike,
    *,
    device: str | None = None,
    encode_batch_size: int = 64,
    torch_threads: int | None = None,
    encoder: str | None = None,
) -> SearchIndex:
    """Loads an index directory written by `build_index` (the encoder for dense ones too).

    For dense indexes: `device`, `encode_batch_size` and `torch_threads` configure the query
    encoder; `encoder` overrides the model directory recorded in the manifest (for an index
    moved to another machine); it must produce vectors of the recorded dimension.
    """
    index_dir = os.fspath(index_dir)
    manifest = IndexManifest.read(index_dir)
    documents_path = os.path.join(index_dir, DOCUMENTS_NAME)
    if not os.path.isfile(documents_path):
        raise IndexFormatError(f"{index_dir}: {DOCUMENTS_NAME} is missing")
    store = DocumentStore(documents_path)
    if manifest.kind == "bm25":
        from retrieval_service.bm25 import BM25Index  # noqa: PLC0415 (back end and its optional dependency loaded on use)

        return BM25Index(index_dir, manifest, store)
    from retrieval_service.dense import DenseIndex  # noqa: PLC0415 (back end and its optional dependency loaded on use)

    return DenseIndex(
        index_dir,
        manifest,
        store,
        device=device,
        encode_batch_size=encode_batch_size,
        torch_threads=torch_threads,
        encoder=encoder,
    )
