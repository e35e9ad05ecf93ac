"""Deterministic, resumable batches of questions through grain.

The dataset is a grain ``MapDataset`` over record indices: shuffled with a seed (a new
permutation each epoch), sharded by process for multi-host runs, batched. The iterator's state
is a small JSON-able dict: save it in the checkpoint metadata and restore it to continue with
exactly the same data order after a resume.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np


class PromptBatches:
    """Iterator of lists of records; ``state()`` / ``restore(state)`` for checkpoints.

    Args:
      records: the questions (any sequence).
      batch_size: records per batch (per process).
      seed: shuffle seed; ``shuffle=False`` keeps file order.
      num_epochs: None repeats forever.
      process_index, process_count: this process's shard of every global batch.
    """

    def __init__(
        self,
        records: Sequence[Any],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not records:
            raise ValueError("no records to iterate over")
        self.records = records
        ds = grain.MapDataset.range(len(records))
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs)
        # Global batches of batch_size * process_count, each process takes its slice.
        ds = ds.batch(batch_size * process_count, drop_remainder=drop_remainder)
        lo, hi = process_index * batch_size, (process_index + 1) * batch_size
        ds = ds.map(lambda idx: np.asarray(idx)[lo:hi])
        self._dataset = ds
        self._iter = iter(ds.to_iter_dataset())

    def __iter__(self) -> Iterator[list]:
        return self

    def __next__(self) -> list:
        indices = next(self._iter)
        return [self.records[int(i)] for i in indices]

    def state(self) -> dict:
        """JSON-able iterator state."""
        return dict(self._iter.get_state())

    def restore(self, state: dict) -> None:
        self._iter.set_state(state)
