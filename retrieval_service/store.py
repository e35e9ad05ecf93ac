"""The documents of an index: an Arrow IPC file (columns id, contents), memory-mapped when read.

Row i of the store is document number i of the index (the number BM25 and FAISS return).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

_SCHEMA = pa.schema([("id", pa.string()), ("contents", pa.string())])


def write_documents(
    path: str | os.PathLike, rows: Iterable[tuple[str, str]], rows_per_batch: int = 16384
) -> int:
    """Writes ``(id, contents)`` rows to an Arrow IPC file. Returns the number of rows."""
    count = 0
    ids: list[str] = []
    contents: list[str] = []
    with pa.OSFile(os.fspath(path), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:

        def flush():
            writer.write_batch(
                pa.record_batch(
                    [pa.array(ids, pa.string()), pa.array(contents, pa.string())], schema=_SCHEMA
                )
            )
            ids.clear()
            contents.clear()

        for doc_id, text in rows:
            ids.append(doc_id)
            contents.append(text)
            count += 1
            if len(ids) >= rows_per_batch:
                flush()
        if ids:
            flush()
    return count


class DocumentStore:
    """Read access to a documents file written by `write_documents`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._source = pa.memory_map(self.path, "r")
        reader = pa.ipc.open_file(self._source)
        if reader.schema.names[:2] != ["id", "contents"]:
            raise ValueError(
                f"{self.path}: expected columns id, contents; got {reader.schema.names}"
            )
        self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        sizes = np.array([batch.num_rows for batch in self._batches], dtype=np.int64)
        # _starts[b] is the row number of batch b's first row.
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self._length = int(self._starts[-1])

    def __len__(self) -> int:
        return self._length

    def get(self, row: int) -> tuple[str, str]:
        """``(id, contents)`` of one row."""
        if not 0 <= row < self._length:
            raise IndexError(f"document row {row} out of range [0, {self._length})")
        batch_index = int(np.searchsorted(self._starts, row, side="right")) - 1
        batch = self._batches[batch_index]
        offset = row - int(self._starts[batch_index])
        return batch.column(0)[offset].as_py(), batch.column(1)[offset].as_py()

    def iter_contents(self, rows_per_chunk: int = 4096) -> Iterator[list[str]]:
        """The contents column in order, in lists of at most `rows_per_chunk` strings."""
        for batch in self._batches:
            column = batch.column(1)
            for start in range(0, batch.num_rows, rows_per_chunk):
                yield column.slice(start, rows_per_chunk).to_pylist()
