"""`InProcessRetriever`: the `Retriever` interface over an index directory, with no server.

The index code lives in the `retrieval_service` package (installed with dgpo_jax; its BM25 and
dense back ends need the ``retrieval`` extra: bm25s, faiss-cpu, sentence-transformers); a back
end is imported only when an index of its kind is loaded.
"""

from __future__ import annotations

import os

from dgpo_jax.retrieval.documents import Document, FormattingRetriever, check_queries, check_topk
from retrieval_service.index import load_index


class InProcessRetriever(FormattingRetriever):
    """Searches an index directory built by ``python -m retrieval_service.build_index``.

    Gives the same documents and scores as a server started on the same index.

    Args:
      index_dir: the index directory (BM25 or dense).
      topk: documents per query when `retrieve` gets ``topk=None`` (reference default 3).
      device: torch device for a dense index's query encoder (None: sentence-transformers' choice).
      encode_batch_size: queries per encoder forward pass (dense).
      torch_threads: torch CPU threads while encoding queries (dense; None: torch's default).
        Inside a busy training process 1 is usually fastest (see docs/retrieval.md).
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        *,
        topk: int = 3,
        device: str | None = None,
        encode_batch_size: int = 64,
        torch_threads: int | None = None,
    ):
        self.topk = check_topk(topk, 3)
        self.index = load_index(
            index_dir,
            device=device,
            encode_batch_size=encode_batch_size,
            torch_threads=torch_threads,
        )

    @property
    def num_documents(self) -> int:
        return self.index.num_documents

    def retrieve(self, queries: list[str], topk: int | None = None) -> list[list[Document]]:
        queries = check_queries(queries)
        topk = check_topk(topk, self.topk)
        return [
            [
                Document(id=doc_id, contents=contents, score=score)
                for doc_id, contents, score in documents
            ]
            for documents in self.index.search_documents(queries, topk)
        ]
