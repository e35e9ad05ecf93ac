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

Shapes: one per run. ``pack_for_update`` packs a batch of N trajectories into exactly N rows
of a width fixed for the run (``train.pack_width``, default the sampler's context), the shape
the unpacked batch would have; the rows are filled micro-batch by micro-batch, so the packed
trajectories occupy the first few micro-batches and the rest hold only empty rows, which the
compiled programs skip at run time (``lax.cond`` on "any real token": an empty micro-batch
costs no model pass). One compiled program serves every step, whatever the length mix, and
the work follows the real tokens (docs/training_at_scale.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

WIDTH_MULTIPLE = 64  # packed widths are multiples of this many positions
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
    # micro-batches the rows split into (row i is in micro-batch i % micro_batches, as
    # dgpo_jax.learner.update_step.split_micro splits) and how many of them hold a real token:
    # the programs run the model on those only
    micro_batches: int = 1
    busy_micro_batches: int = 1

    @property
    def stats(self) -> dict[str, float]:
        """``real_tokens``; ``computed_positions``, the positions of the micro-batches that hold a
        real token (the programs skip the others); ``padded_positions`` (computed minus real) and
        ``padded_positions_per_real_token``; ``padded_to_longest_per_real_token``, the same figure
        for one trajectory per row padded to the longest (what packing saves); ``rows``,
        ``width``, ``trajectories``, ``micro_batches``, ``busy_micro_batches``."""
        real = len(self.src_traj)
        computed = self.busy_micro_batches * (self.rows // self.micro_batches) * self.width
        padded = computed - real
        return {
            "real_tokens": real,
            "computed_positions": computed,
            "padded_positions": padded,
            "padded_positions_per_real_token": padded / max(real, 1),
            "padded_to_longest_per_real_token": self.padded_to_longest / max(real, 1),
            "rows": self.rows,
            "width": self.width,
            "trajectories": self.num_trajectories,
            "micro_batches": self.micro_batches,
            "busy_micro_batches": self.busy_micro_batches,
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
    batch: Mapping[str, np.ndarray],
    width: int,
    rows_multiple: int = 1,
    *,
    min_rows: int = 0,
    micro_batches: int = 1,
) -> tuple[dict[str, np.ndarray], PackedLayout]:
    """Packs an unpacked batch (rows = trajectories) into rows of ``width`` positions by
    first-fit-decreasing on the trajectories' real lengths, then appends empty rows up to
    ``max(rows needed, min_rows)`` rounded up to a multiple of ``rows_multiple`` (and of
    ``micro_batches``). With ``micro_batches`` m > 1 the filled rows go micro-batch by
    micro-batch (micro-batch i holds rows i, i + m, ...: ``update_step.split_micro``), so the
    last micro-batches hold only empty rows.

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
    if rows_multiple < 1 or micro_batches < 1:
        raise ValueError(
            f"rows_multiple and micro_batches must be >= 1, got {rows_multiple}, {micro_batches}"
        )
    lengths = mask.sum(axis=1)
    bins = first_fit_decreasing(lengths, width)
    quantum = np.lcm(rows_multiple, micro_batches)
    rows = max(len(bins), min_rows, 1)
    rows = int(-(-rows // quantum) * quantum)
    per_micro = rows // micro_batches
    # bin b -> row j * m + i of micro-batch i = b // per_micro, its j = b % per_micro
    row_of = lambda b: (b % per_micro) * micro_batches + b // per_micro

    src_traj, src_pos, dst_row, dst_col = [], [], [], []
    segment_ids = np.zeros((rows, width), np.int32)
    traj_index = np.full((rows, width), -1, np.int32)
    for b, members in enumerate(bins):
        r, col = row_of(b), 0
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
        micro_batches=micro_batches,
        busy_micro_batches=max(1, -(-len(bins) // per_micro)),
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
    batch: Mapping[str, np.ndarray], width: int, rows: int, micro_batches: int
) -> tuple[dict[str, np.ndarray], PackedLayout]:
    """The batch packed into exactly ``rows`` rows of ``width`` (the shape of every step of a
    run: one compiled program), filled micro-batch by micro-batch (``pack_trajectories``), its
    per-trajectory fields extended to ``[rows]`` (``pad_trajectory_fields``). Raises ValueError
    when the trajectories need more rows (never when ``rows`` >= their count)."""
    if rows % micro_batches:
        raise ValueError(f"rows {rows} is not a multiple of micro_batches {micro_batches}")
    packed, layout = pack_trajectories(
        batch, width, micro_batches, min_rows=rows, micro_batches=micro_batches
    )
    if layout.rows != rows:
        raise ValueError(
            f"{layout.num_trajectories} trajectories need {layout.rows} packed rows of width "
            f"{width}, more than the {rows} rows of the compiled shape"
        )
    return pad_trajectory_fields(packed, layout.num_trajectories, rows), layout


def pad_trajectory_fields(packed: dict, n: int, size: int) -> dict:
    """The per-trajectory ``[n]`` fields of a packed batch extended to ``[size]`` with entries no
    token points at (``traj_index`` < n): reward 0, a group of its own. A batch with fewer
    trajectories than rows (the KD family keeps only the teacher's correct ones) then has the
    compiled shape too."""
    if size <= n:
        return packed
    out = dict(packed)
    for key, value in packed.items():
        x = np.asarray(value)
        if key in PACKING_FIELDS or x.ndim != 1 or x.shape[0] != n:
            continue
        if key == "group_ids":
            start = int(x.max()) + 1 if n else 0
            extra = np.arange(start, start + size - n, dtype=x.dtype)
        else:
            extra = np.zeros(size - n, x.dtype)
        out[key] = np.concatenate([x, extra])
    return out


def take_trajectories(batch: Mapping[str, np.ndarray], index) -> dict[str, np.ndarray]:
    """The trajectories ``index`` of an unpacked batch (scalars pass through)."""
    return {k: (np.asarray(v)[index] if np.ndim(v) else v) for k, v in batch.items()}
