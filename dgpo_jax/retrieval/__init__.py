"""Retrieval for the search agent: documents, retrievers (HTTP and in-process), protocol text.

    from dgpo_jax.retrieval import HttpRetriever, InProcessRetriever, information_observation

    retriever = InProcessRetriever("workdir/synthetic/index_bm25")    # or HttpRetriever(url)
    docs_text = retriever.search(["where was Kalo Venter born"])[0]
    observation = information_observation(docs_text)

`InProcessRetriever` needs the ``retrieval`` extra (bm25s, faiss-cpu, sentence-transformers);
everything else here needs only requests.
"""

from dgpo_jax.retrieval.documents import (
    Document,
    FormattingRetriever,
    Retriever,
    documents_from_response,
)
from dgpo_jax.retrieval.errors import (
    RetrievalError,
    RetrievalRequestError,
    RetrievalResponseError,
    RetrievalUnavailableError,
)
from dgpo_jax.retrieval.formatting import (
    INVALID_ACTION_NOTICE,
    PROTOCOL_TAGS,
    SEARCH_R1_PROMPT_TEMPLATE,
    format_documents,
    format_prompt,
    information_observation,
    parse_action,
)
from dgpo_jax.retrieval.http_client import HttpRetriever
from dgpo_jax.retrieval.in_process import InProcessRetriever

__all__ = [
    "Document",
    "FormattingRetriever",
    "Retriever",
    "documents_from_response",
    "RetrievalError",
    "RetrievalRequestError",
    "RetrievalResponseError",
    "RetrievalUnavailableError",
    "INVALID_ACTION_NOTICE",
    "PROTOCOL_TAGS",
    "SEARCH_R1_PROMPT_TEMPLATE",
    "format_documents",
    "format_prompt",
    "information_observation",
    "parse_action",
    "HttpRetriever",
    "InProcessRetriever",
]
