"""Packing trajectories into rows: several trajectories per row of ``width`` positions, so the
update and the scoring passes spend their work on real tokens, not on padding to the longest.

An unpacked batch (``dgpo_jax.objectives.batch``) has one trajectory per row, left- and/or
right-padded (``attention_mask`` marks the real tokens). ``pack_trajectories`` strips the
padding (a trajectory is its real tokens, in order), places the trajectories into rows by
first-fit-decreasing on their lengths, and returns the packed batch and a ``PackedLayout``:

* every per-token field ``[N, T]`` becomes ``[R, W]`` (0 where nothing is packed);
* ``segment_ids [R, W] int32``: 0 = padding, k > 0 = the k-th trajectory of the row;
* ``traj_index [R, W] int32``: the trajectory (row of the input, 0..N-1) each token belongs to,
  -1 on padding;
* per-trajectory fields (``rewards``, ``group_ids``: ``[N]``) and scalars stay as they are.

``layout.unpack(x)`` puts a per-token array of the packed layout (advantages, log-probs, ...)
back into the input's ``[N, T]`` layout; ``layout.pack(x)`` goes the other way.

Shapes: the width is the batch's longest trajectory rounded up to a multiple of 64
(``pack_width``), and ``plan_rows`` picks the row count and the micro-batch count of a packed
update from the rows first-fit-decreasing needs, on a ladder of 16 row counts per octave, so
that the number of distinct compiled shapes stays small (docs/training_at_scale.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

WIDTH_MULTIPLE = 64  # packed widths are multiples of this many positions
ROW_BUCKETS_PER_OCTAVE = 16  # distinct packed row counts between r and 2r (plan_rows)
PACKING_FIELDS = ("segment_ids", "traj_index")


def trajectory_lengths(attention_mask) -> np.ndarray:
    """Real tokens per row of an unpacked batch, ``[N]`` int."""
    return (np.asarray(attention_mask) > 0).sum(axis=1).astype(np.int64)


def pack_width(lengths, multiple: int = WIDTH_MULTIPLE) -> int:
    """The packed row width for trajectories of ``lengths``: the longest rounded up to a
    multiple of ``multiple`` (at least ``multiple``; never below the longest)."""
    longest = int(np.max(lengths)) if len(lengths) else 0
    return max(multiple, -(-longest // multiple) * multiple)


def first_fit_decreasing(lengths, width: int) -> list[list[int]]:
    """Bins of trajectory indices, each bin's lengths summing to at most ``width``: the
    trajectories in decreasing length (ties by index), each into the first row with room.
    Trajectories of length 0 go nowhere."""
    lengths = np.asarray(lengths, np.int64)
    too_long = np.flatnonzero(lengths > width)
    if len(too_long):
        i = int(too_long[0])
        raise ValueError(
            f"trajectory {i} has {int(lengths[i])} real tokens, more than the packed width {width}"
        )
    order = np.argsort(-lengths, kind="stable")
    room = np.empty(len(lengths), np.int64)  # free positions of each open row
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n == 0:
            break  # sorted: every later one is empty too
        fits = np.flatnonzero(room[: len(bins)] >= n)
        if len(fits):
            j = int(fits[0])
        else:
            j = len(bins)
            bins.append([])
            room[j] = width
        bins[j].append(int(i))
        room[j] -= n
    return bins


def bucket_rows(rows: int) -> int:
    """``rows`` rounded up onto a ladder of ``ROW_BUCKETS_PER_OCTAVE`` values per octave (every
    count up to 16, then 16, 17, ..., 32, 34, ..., 64, 68, ...): at most 1/16 more rows, and a
    handful of distinct counts over a run."""
    if rows <= ROW_BUCKETS_PER_OCTAVE:
        return max(rows, 1)
    step = 2 ** (int(math.log2(rows / ROW_BUCKETS_PER_OCTAVE)))
    return -(-rows // step) * step


def plan_rows(rows_needed: int, rows_per_micro: int, multiple: int = 1) -> tuple[int, int]:
    """(rows, micro-batches) of a packed batch that needs ``rows_needed`` rows: the bucketed row
    count (``bucket_rows``) rounded up so that it splits into micro-batches of equal size, at
    most ``rows_per_micro`` rows each (unless ``multiple`` is larger) and a multiple of
    ``multiple`` (the data-parallel shards). Of the micro-batch counts from the fewest possible
    to twice that, the one that adds the fewest empty rows (then the fewest micro-batches)."""
    r = bucket_rows(rows_needed)
    fewest = max(1, -(-r // max(rows_per_micro, 1)))
    best = None
    for micro in range(fewest, 2 * fewest + 1):
        quantum = micro * max(multiple, 1)
        rows = -(-r // quantum) * quantum
        if best is None or rows < best[0]:
            best = (rows, micro)
    return best


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where every real token of an unpacked ``[N, T]`` batch sits in the packed ``[R, W]`` one:
    token k is at (``src_traj[k]``, ``src_pos[k]``) unpacked and (``dst_row[k]``,
    ``dst_col[k]``) packed."""

    num_trajectories: int
    length: int  # T of the unpacked batch
    rows: int
    width: int
    src_traj: np.ndarray
    src_pos: np.ndarray
    dst_row: np.ndarray
    dst_col: np.ndarray
    # padded positions of the same trajectories one per row, padded to the longest (rounded up
    # to WIDTH_MULTIPLE): what an unpacked batch trimmed to its longest trajectory holds
    padded_to_longest: int

    @property
    def stats(self) -> dict[str, float]:
        """``real_tokens``, ``padded_positions`` (R x W minus the real tokens),
        ``padded_positions_per_real_token``, ``rows``, ``width``, ``trajectories``, and
        ``padded_to_longest_per_real_token``: the same figure for one trajectory per row padded to
        the longest (what packing saves)."""
        real = len(self.src_traj)
        padded = self.rows * self.width - real
        return {
            "real_tokens": real,
            "padded_positions": padded,
            "padded_positions_per_real_token": padded / max(real, 1),
            "padded_to_longest_per_real_token": self.padded_to_longest / max(real, 1),
            "rows": self.rows,
            "width": self.width,
            "trajectories": self.num_trajectories,
        }

    def unpack(self, x, fill=0) -> np.ndarray:
        """A packed per-token array ``[R, W, ...]`` -> ``[N, T, ...]``; ``fill`` where the
        unpacked batch has padding."""
        x = np.asarray(x)
        if x.shape[:2] != (self.rows, self.width):
            raise ValueError(
                f"unpack: expected a packed [R, W] = [{self.rows}, {self.width}] array, got "
                f"shape {x.shape}"
            )
        out = np.full((self.num_trajectories, self.length) + x.shape[2:], fill, x.dtype)
        out[self.src_traj, self.src_pos] = x[self.dst_row, self.dst_col]
        return out

    def pack(self, x, fill=0) -> np.ndarray:
        """An unpacked per-token array ``[N, T, ...]`` -> ``[R, W, ...]``; ``fill`` on padding."""
        x = np.asarray(x)
        if x.shape[:2] != (self.num_trajectories, self.length):
            raise ValueError(
                f"pack: expected an unpacked [N, T] = [{self.num_trajectories}, {self.length}] "
                f"array, got shape {x.shape}"
            )
        out = np.full((self.rows, self.width) + x.shape[2:], fill, x.dtype)
        out[self.dst_row, self.dst_col] = x[self.src_traj, self.src_pos]
        return out


def pack_trajectories(
    batch: Mapping[str, np.ndarray], width: int, rows_multiple: int = 1, *, min_rows: int = 0
) -> tuple[dict[str, np.ndarray], PackedLayout]:
    """Packs an unpacked batch (rows = trajectories) into rows of ``width`` positions by
    first-fit-decreasing on the trajectories' real lengths, then appends empty rows up to
    ``max(rows needed, min_rows)`` rounded up to a multiple of ``rows_multiple``.

    Per-token fields are the ``[N, T]`` arrays (``attention_mask`` is required: it marks the
    real tokens), per-trajectory fields the ``[N]`` ones, scalars pass through. Returns
    (packed batch with ``segment_ids`` and ``traj_index`` added, ``PackedLayout``).
    """
    if "attention_mask" not in batch:
        raise ValueError("pack_trajectories: the batch has no 'attention_mask'")
    present = [k for k in PACKING_FIELDS if k in batch]
    if present:
        raise ValueError(f"pack_trajectories: the batch is packed already (it has {present})")
    mask = np.asarray(batch["attention_mask"]) > 0
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [N, T], got shape {mask.shape}")
    n, t = mask.shape
    if rows_multiple < 1:
        raise ValueError(f"rows_multiple must be >= 1, got {rows_multiple}")
    lengths = mask.sum(axis=1)
    bins = first_fit_decreasing(lengths, width)
    rows = max(len(bins), min_rows, 1)
    rows = -(-rows // rows_multiple) * rows_multiple

    src_traj, src_pos, dst_row, dst_col = [], [], [], []
    segment_ids = np.zeros((rows, width), np.int32)
    traj_index = np.full((rows, width), -1, np.int32)
    for r, members in enumerate(bins):
        col = 0
        for s, i in enumerate(members, start=1):
            pos = np.flatnonzero(mask[i])
            cols = np.arange(col, col + len(pos))
            src_traj.append(np.full(len(pos), i))
            src_pos.append(pos)
            dst_row.append(np.full(len(pos), r))
            dst_col.append(cols)
            segment_ids[r, cols] = s
            traj_index[r, cols] = i
            col += len(pos)
    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    layout = PackedLayout(
        num_trajectories=n,
        length=t,
        rows=rows,
        width=width,
        src_traj=cat(src_traj),
        src_pos=cat(src_pos),
        dst_row=cat(dst_row),
        dst_col=cat(dst_col),
        padded_to_longest=int(n * pack_width(lengths) - lengths.sum()),
    )

    packed: dict[str, np.ndarray] = {}
    for key, value in batch.items():
        x = np.asarray(value)
        if x.ndim >= 2 and x.shape[:2] == (n, t):
            packed[key] = layout.pack(x)
        elif x.ndim == 0 or (x.ndim >= 1 and x.shape[0] == n):
            packed[key] = value  # scalar or per-trajectory: unchanged
        else:
            raise ValueError(
                f"batch[{key!r}] has shape {x.shape}: expected per-token [N, T] = [{n}, {t}], "
                f"per-trajectory [N] = [{n}] or a scalar"
            )
    packed["segment_ids"] = segment_ids
    packed["traj_index"] = traj_index
    return packed, layout


def pack_for_update(
    batch: Mapping[str, np.ndarray], width: int, rows_per_micro: int, multiple: int = 1
) -> tuple[dict[str, np.ndarray], PackedLayout, int]:
    """``pack_trajectories`` with the row count of ``plan_rows``: (packed batch, layout, the
    number of micro-batches its rows split into, each at most ``rows_per_micro`` rows and a
    multiple of ``multiple``)."""
    needed = len(first_fit_decreasing(trajectory_lengths(batch["attention_mask"]), width))
    rows, micro = plan_rows(needed, rows_per_micro, multiple)
    packed, layout = pack_trajectories(batch, width, micro * max(multiple, 1), min_rows=rows)
    return packed, layout, micro


def take_trajectories(batch: Mapping[str, np.ndarray], index) -> dict[str, np.ndarray]:
    """The trajectories ``index`` of an unpacked batch (scalars pass through)."""
    return {k: (np.asarray(v)[index] if np.ndim(v) else v) for k, v in batch.items()}
