"""Dense retrieval: sentence-transformers embeddings in a FAISS inner-product index."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from retrieval_service.encoders import TextEncoder
from retrieval_service.index import IndexFormatError, IndexManifest, SearchIndex
from retrieval_service.store import DocumentStore

DENSE_DIR = "dense"
FAISS_NAME = "faiss.index"
HNSW_EF_SEARCH = 128


def build_dense(
    store: DocumentStore,
    out_dir: str,
    encoder: TextEncoder,
    *,
    faiss_index: str = "flat",
    hnsw_m: int = 32,
    rows_per_chunk: int = 4096,
    show_progress: bool = True,
) -> dict:
    """Encodes every document of `store` and writes ``out_dir/dense/faiss.index``.

    Returns the manifest params. "flat" is exact inner product (cosine, vectors being unit);
    "hnsw" is an approximate graph index with `hnsw_m` links per node.
    """
    import faiss  # noqa: PLC0415 (retrieval extra, loaded on use)

    if faiss_index == "flat":
        index = faiss.IndexFlatIP(encoder.dimension)
    else:
        index = faiss.IndexHNSWFlat(encoder.dimension, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    with tqdm(
        total=len(store), desc="encode passages", unit="doc", disable=not show_progress
    ) as bar:
        for chunk in store.iter_contents(rows_per_chunk):
            index.add(encoder.encode_passages(chunk))
            bar.update(len(chunk))
    os.makedirs(os.path.join(out_dir, DENSE_DIR))
    faiss.write_index(index, os.path.join(out_dir, DENSE_DIR, FAISS_NAME))
    params = {"faiss_index": faiss_index, "metric": "inner_product"}
    if faiss_index == "hnsw":
        params["hnsw_m"] = hnsw_m
    return params


class DenseIndex(SearchIndex):
    def __init__(
        self,
        index_dir: str,
        manifest: IndexManifest,
        store: DocumentStore,
        *,
        device: str | None = None,
        encode_batch_size: int = 64,
        torch_threads: int | None = None,
        encoder: str | None = None,
    ):
        super().__init__(index_dir, manifest, store)
        import faiss  # noqa: PLC0415 (retrieval extra, loaded on use)

        path = os.path.join(index_dir, DENSE_DIR, FAISS_NAME)
        if not os.path.isfile(path):
            raise IndexFormatError(f"{index_dir}: {DENSE_DIR}/{FAISS_NAME} is missing")
        self._faiss = faiss.read_index(path)
        if self._faiss.ntotal != manifest.num_documents or self._faiss.d != manifest.dimension:
            raise IndexFormatError(
                f"{path}: {self._faiss.ntotal} vectors of dimension {self._faiss.d}, the manifest "
                f"says {manifest.num_documents} of dimension {manifest.dimension}"
            )
        if manifest.params.get("faiss_index") == "hnsw":
            self._faiss.hnsw.efSearch = HNSW_EF_SEARCH
        recorded = manifest.encoder or {}
        self.encoder = TextEncoder(
            encoder or recorded.get("name"),
            device=device,
            batch_size=encode_batch_size,
            max_length=recorded.get("max_length"),
            e5=recorded.get("e5_conventions"),
            num_threads=torch_threads,
        )
        if self.encoder.dimension != manifest.dimension:
            raise IndexFormatError(
                f"{index_dir}: encoder {self.encoder.name} gives dimension "
                f"{self.encoder.dimension}, the index has {manifest.dimension}"
            )
        self._lock = threading.Lock()

    def search(self, queries: Sequence[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(topk), self.num_documents)
        if not queries:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        with self._lock:
            vectors = self.encoder.encode_queries(list(queries))
            scores, rows = self._faiss.search(vectors, k)
        return rows.astype(np.int64), scores.astype(np.float32)
