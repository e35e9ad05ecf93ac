"""The retrieval service: corpus -> index directory -> Search-R1-compatible HTTP server.

    python -m retrieval_service.build_index --corpus corpus.jsonl --out INDEX_DIR --kind bm25|dense
    python -m retrieval_service.serve --index INDEX_DIR [--host 127.0.0.1] [--port 8000]

Modules: corpus (reading and checking JSON lines), store (the documents file), index (index
directories and the SearchIndex interface), bm25 and dense (the two back ends), encoders
(sentence-transformers, offline), build_index and serve (the command lines).
The client side lives in dgpo_jax.retrieval.

Python API: `retrieval_service.index.build_index(corpus, out_dir, kind)` and
`retrieval_service.index.load_index(index_dir)` (the name `build_index` at package level is the
command-line module, so the function is not re-exported here).
"""

from retrieval_service.corpus import CorpusError
from retrieval_service.index import IndexFormatError, IndexManifest, SearchIndex, load_index

__all__ = ["CorpusError", "IndexFormatError", "IndexManifest", "SearchIndex", "load_index"]
