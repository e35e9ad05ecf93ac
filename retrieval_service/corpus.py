"""Reading a JSON-lines corpus (``{"id": ..., "contents": ...}`` per line) with strict checks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from dgpo_jax.errors import UserError

logger = logging.getLogger(__name__)


class CorpusError(UserError, ValueError):
    """The corpus file is unusable; the message names the file and line."""


@dataclass
class CorpusStats:
    """Filled in while a corpus is read.

    Attributes:
      sha256: hex digest of the file's bytes (complete once reading finished).
      num_documents: rows read so far.
      ignored_fields: fields other than id/contents that some row carried (not indexed).
    """

    path: str
    sha256: str = ""
    num_documents: int = 0
    ignored_fields: set[str] = field(default_factory=set)


def iter_corpus(
    path: str | os.PathLike, stats: CorpusStats | None = None, show_progress: bool = True
) -> Iterator[tuple[str, str]]:
    """Yields ``(id, contents)`` per line of a JSON-lines corpus, checking every line.

    Each line must be a JSON object with a string or integer ``id`` (unique in the file) and a
    string ``contents``. Blank lines, invalid UTF-8, non-JSON lines, missing or mistyped fields,
    duplicate ids and an empty file raise `CorpusError` naming the line; nothing is skipped.
    `stats` (optional) receives the hash, the count and the ignored field names.
    """
    path = os.fspath(path)
    stats = stats if stats is not None else CorpusStats(path)
    if not os.path.isfile(path):
        raise CorpusError(f"corpus file {path} does not exist")
    hasher = hashlib.sha256()
    first_line_of_id: dict[str, int] = {}
    with (
        open(path, "rb") as handle,
        tqdm(
            total=os.path.getsize(path),
            unit="B",
            unit_scale=True,
            desc=f"read {os.path.basename(path)}",
            disable=not show_progress,
        ) as progress,
    ):
        for line_number, raw_line in enumerate(handle, start=1):
            hasher.update(raw_line)
            progress.update(len(raw_line))
            where = f"{path} line {line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(
                    f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
            if not line.strip():
                raise CorpusError(f"{where}: empty line (every line must hold one JSON object)")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(
                    f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(row, dict):
                raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for name in ("id", "contents"):
                if name not in row:
                    raise CorpusError(f"{where}: missing field '{name}' (fields: {sorted(row)})")
            doc_id, contents = row["id"], row["contents"]
            if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
                raise CorpusError(
                    f"{where}: field 'id' must be a string or an integer, "
                    f"got {type(doc_id).__name__}"
                )
            if not isinstance(contents, str):
                raise CorpusError(
                    f"{where}: field 'contents' must be a string, got {type(contents).__name__}"
                )
            doc_id = str(doc_id)
            if doc_id in first_line_of_id:
                raise CorpusError(
                    f"{where}: duplicate id {doc_id!r} "
                    f"(first seen on line {first_line_of_id[doc_id]})"
                )
            first_line_of_id[doc_id] = line_number
            if len(row) > 2:
                stats.ignored_fields.update(name for name in row if name not in ("id", "contents"))
            stats.num_documents += 1
            yield doc_id, contents
    if stats.num_documents == 0:
        raise CorpusError(f"corpus file {path} is empty: no documents to index")
    stats.sha256 = hasher.hexdigest()
    if stats.ignored_fields:
        logger.warning(
            "corpus %s: fields %s are not indexed (only id and contents are kept)",
            path,
            sorted(stats.ignored_fields),
        )


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            hasher.update(chunk)
    return hasher.hexdigest()
