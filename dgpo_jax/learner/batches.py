"""Rollouts -> update batches: EM rewards, the batch fields, padding and micro-batch counts."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from dgpo_jax.data.search_r1 import QARecord
from dgpo_jax.evaluation import exact_match, extract_answer

log = logging.getLogger(__name__)

SEQ_MULTIPLE = 64  # update batches are padded to a multiple of this many positions
# A dataset's width for `trim_to_bucket(top=...)`: its longest sequence rounded up to this.
TOP_MULTIPLE = 16


def micro_batches(rows: int, per_micro: int) -> int:
    """The number of micro-batches for ``rows`` sequences: the fewest that divide ``rows`` into
    micro-batches of at most ``per_micro`` rows, i.e. micro-batches of the largest divisor of
    ``rows`` not above ``per_micro``. Never larger than asked (that could exceed the memory
    planned for): 4 rows at most 3 each -> 2 micro-batches of 2; 7 rows at most 3 -> 7 of 1."""
    rows, per_micro = max(int(rows), 1), max(int(per_micro), 1)
    m = -(-rows // per_micro)
    while rows % m:
        m += 1
    return m


def on_policy_update(cfg, uses_policy: bool, updates_per_step: int, micro: int) -> bool:
    """Whether the run's update step is ``on_policy`` (its own forward gives the behaviour
    log-probs and old values): ``train.behaviour_from_update`` and a policy term, one update
    per rollout batch, one micro-batch."""
    return bool(
        cfg.train.get("behaviour_from_update", True)
        and uses_policy
        and updates_per_step == 1
        and micro == 1
    )


def resolve_micro_batches(rows: int, per_micro: int, what: str = "mini-batch") -> int:
    """`micro_batches`, logged when ``train.micro_batch_size`` is below the rows and does not
    divide them (the micro-batches are then smaller than asked)."""
    m = micro_batches(rows, per_micro)
    if per_micro < rows and rows % per_micro:
        log.warning(
            "train.micro_batch_size=%d does not divide the %s of %d rows: %d micro-batches of "
            "%d rows (the largest divisor not above %d)",
            per_micro,
            what,
            rows,
            m,
            rows // m,
            per_micro,
        )
    return m


@dataclasses.dataclass
class ScoredRollouts:
    """A rollout plus what the trainer derives from it on the host."""

    batch: dict[str, np.ndarray]  # update-step fields (see dgpo_jax.objectives.batch)
    responses: list[str]  # decoded responses (observations included)
    answers: list[str | None]
    rewards: np.ndarray  # [B] exact match
    num_searches: np.ndarray  # [B]
    finish_reasons: list[str]
    generated_tokens: int


def score_rollout(
    rollout, records: Sequence[QARecord], tokenizer, group_ids: Sequence[int] | None = None
) -> ScoredRollouts:
    """EM rewards and the update batch (prompt left-padded + response right-padded)."""
    arr = rollout.arrays
    prompt_ids, prompt_mask = np.asarray(rollout.prompt_ids), np.asarray(rollout.prompt_mask)
    b, p = prompt_ids.shape
    r = arr.tokens.shape[1]
    resp_mask = (np.arange(r)[None] < np.asarray(arr.length)[:, None]).astype(np.int32)
    responses, answers, rewards = [], [], np.zeros(b, np.float32)
    for i in range(b):
        text = tokenizer.decode(rollout.response_ids(i).tolist(), skip_special_tokens=False)
        responses.append(text)
        answer = extract_answer(text)
        answers.append(answer)
        rewards[i] = exact_match(answer, records[i].golds)
    batch = {
        "input_ids": np.concatenate([prompt_ids, np.asarray(arr.tokens)], 1).astype(np.int32),
        "attention_mask": np.concatenate([prompt_mask, resp_mask], 1).astype(np.int32),
        "loss_mask": np.concatenate([np.zeros((b, p)), np.asarray(arr.loss_mask)], 1).astype(
            np.float32
        ),
        "teacher_mask": np.concatenate([np.zeros((b, p)), np.asarray(arr.teacher_mask)], 1).astype(
            np.float32
        ),
        "sampler_logprobs": np.concatenate([np.zeros((b, p)), np.asarray(arr.logprobs)], 1).astype(
            np.float32
        ),
        "rewards": rewards,
        "group_ids": np.asarray(group_ids if group_ids is not None else np.arange(b), np.int32),
    }
    return ScoredRollouts(
        batch,
        responses,
        answers,
        rewards,
        np.asarray(arr.num_searches),
        list(rollout.finish_reasons),
        int(np.asarray(arr.generated).sum()),
    )


def pad_batch_to(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Right-pad the time axis to a multiple (fewer distinct shapes -> fewer compilations)."""
    t = batch["input_ids"].shape[1]
    extra = (-t) % multiple
    if not extra:
        return batch
    out = {}
    for k, v in batch.items():
        out[k] = np.pad(v, ((0, 0), (0, extra))) if v.ndim == 2 else v
    return out


def trim_to_bucket(
    batch: dict[str, np.ndarray], multiple: int = SEQ_MULTIPLE, top: int | None = None
) -> dict[str, np.ndarray]:
    """Cut right padding down to the batch's longest sequence rounded up to a bucket: a multiple
    of ``multiple``, or with ``top`` (the dataset's width: ``packing.pack_width(lengths,
    TOP_MULTIPLE)``) ``top`` less a whole number of ``multiple``s. Few distinct widths (few
    compilations), no compute spent on the dataset's padding. Anchored at ``top``, random
    batches (whose longest row is nearly always near the dataset's longest) take that one width
    instead of the next multiple above it."""
    longest = int(np.asarray(batch["attention_mask"]).sum(1).max())
    if top is None or longest > top:
        width = longest + (-longest) % multiple
    else:
        width = top - multiple * ((top - longest) // multiple)
    width = min(batch["input_ids"].shape[1], width)
    return {k: (v[:, :width] if np.ndim(v) == 2 else v) for k, v in batch.items()}


def right_align(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each row's tokens moved left by its leading padding (a rollout batch is a left-padded
    prompt block followed by a right-padded response block), so every row starts at column 0
    and ends at its length; every per-token field moves with its row. The model reads the same
    sequences: RoPE positions count a row's real tokens (``positions_from_mask``) and causal
    attention skips padding wherever it is. A row of padding stays as it is."""
    mask = np.asarray(batch["attention_mask"])
    lead = mask.argmax(1)  # 0 for a row of padding
    if not lead.any():
        return batch
    t = mask.shape[1]
    cols = np.arange(t)[None] + lead[:, None]
    inside = cols < t
    cols = np.minimum(cols, t - 1)
    out = {}
    for k, v in batch.items():
        if np.ndim(v) == 2:
            moved = np.take_along_axis(np.asarray(v), cols, axis=1)
            out[k] = np.where(inside, moved, np.zeros((), moved.dtype))
        else:
            out[k] = v
    return out


def width_buckets(full_width: int, count: int, multiple: int = SEQ_MULTIPLE) -> tuple[int, ...]:
    """The widths an update batch is cut to: ``count`` evenly spaced fractions of
    ``full_width`` (1/count, 2/count, ..., 1), each rounded up to ``multiple``; so a run
    compiles its update (and scoring) programs for at most ``count`` widths. ``count`` 0 or 1:
    the full width only."""
    up = lambda w: -(-int(w) // multiple) * multiple
    if count <= 1:
        return (up(full_width),)
    return tuple(sorted({up(-(-full_width * i // count)) for i in range(1, count + 1)}))


def fit_width(batch: dict[str, np.ndarray], widths: Sequence[int]) -> dict[str, np.ndarray]:
    """The time axis cut (or right-padded) to the smallest of ``widths`` that holds every row's
    last real token (no real token is dropped); past the largest, to a multiple of
    ``SEQ_MULTIPLE``. Use after ``right_align`` so that the cut follows the longest row."""
    mask = np.asarray(batch["attention_mask"])
    t = mask.shape[1]
    real = mask.any(0)
    needed = int(np.flatnonzero(real)[-1]) + 1 if real.any() else 1
    fits = [w for w in sorted(widths) if w >= needed]
    width = fits[0] if fits else needed + (-needed) % SEQ_MULTIPLE
    if width <= t:
        return {k: (v[:, :width] if np.ndim(v) == 2 else v) for k, v in batch.items()}
    pad = width - t
    return {k: (np.pad(v, ((0, 0), (0, pad))) if np.ndim(v) == 2 else v) for k, v in batch.items()}


RowGroups = tuple[tuple[int, int], ...]
# Length groups' row counts are multiples of 1/GROUP_QUANTA of the batch's rows (at least 1).
GROUP_QUANTA = 8
# By default a grouping already compiled is used when it computes at most this share more
# positions than the best grouping for the batch (length_groups' ``known``, ``slack``).
GROUP_SLACK = 0.1


def row_lengths(mask) -> np.ndarray:
    """Each row's last real position + 1 (0 for a row of padding) of a ``[B, T]`` mask."""
    mask = np.asarray(mask) > 0
    return np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)


def groups_fit(groups: RowGroups, sorted_lengths: np.ndarray) -> bool:
    """Whether each group of ``groups`` holds its rows of ``sorted_lengths`` (ascending)."""
    lo = 0
    for n, w in groups:
        if sorted_lengths[lo + n - 1] > w:
            return False
        lo += n
    return lo == len(sorted_lengths)


def best_row_groups(sorted_lengths: np.ndarray, groups: int, widths: Sequence[int]) -> RowGroups:
    """The grouping of rows sorted by length (ascending) into at most ``groups`` runs, each
    of a multiple of ``rows / GROUP_QUANTA`` rows and cut to the smallest of ``widths`` that
    holds its longest row, that computes the fewest positions (sum of rows x width; ties: fewer
    groups); adjacent runs of one width merged; ``()`` for one run."""
    rows = len(sorted_lengths)
    quantum = max(1, rows // GROUP_QUANTA)
    cuts = list(range(quantum, rows, quantum)) + [rows]
    fits = sorted({int(w) for w in widths})

    def width(last: int) -> int:
        longest = max(int(sorted_lengths[last - 1]), 1)
        return next((w for w in fits if w >= longest), fits[-1])

    # best[g][j]: (positions, runs) covering the rows before cuts[j] with g runs
    best = [{-1: (0, ())}]
    for g in range(1, max(groups, 1) + 1):
        layer = {}
        for j, end in enumerate(cuts):
            for i, (cost, runs) in best[g - 1].items():
                start = 0 if i < 0 else cuts[i]
                if start >= end:
                    continue
                w = width(end)
                cand = (cost + (end - start) * w, runs + ((end - start, w),))
                if j not in layer or cand[0] < layer[j][0]:
                    layer[j] = cand
        best.append(layer)
    last = len(cuts) - 1
    _, runs = min(
        (best[g][last] for g in range(1, len(best)) if last in best[g]), key=lambda c: c[0]
    )
    merged: list[list[int]] = []
    for n, w in runs:
        if merged and merged[-1][1] == w:
            merged[-1][0] += n
        else:
            merged.append([n, w])
    return () if len(merged) == 1 else tuple((n, w) for n, w in merged)


def length_groups(
    batch: dict[str, np.ndarray],
    groups: int,
    widths: Sequence[int],
    known: Sequence[RowGroups] = (),
    slack: float = GROUP_SLACK,
) -> tuple[dict[str, np.ndarray], RowGroups]:
    """The rows sorted by length (stable) and grouped for ``UpdateStep(row_groups=...)``:
    ``best_row_groups`` over ``widths`` (and the batch's width), unless a grouping in
    ``known`` (those compiled so far for this batch width; ``()``: the ungrouped program)
    holds the rows and computes at most ``slack`` (a share) more positions: each new grouping
    is one more compile of the update (``RowGrouper`` sets ``slack`` from what a compile
    costs and the updates left). Returns (the batch with every
    row-indexed field in that order, the grouping; ``()`` with the batch as it is when one
    run holds every row). The batch's width stays; use after ``right_align`` and
    ``fit_width``. The order of rows changes no loss: every whole-batch quantity is a sum over
    rows or tokens, and GRPO groups are ids."""
    mask = np.asarray(batch["attention_mask"])
    rows, t = mask.shape
    if groups <= 1 or rows < 2:
        return batch, ()
    lengths = row_lengths(mask)
    order = np.argsort(lengths, kind="stable")
    ordered = lengths[order]
    fits = sorted({int(w) for w in widths if int(w) <= t} | {t})
    chosen = best_row_groups(ordered, groups, fits)
    cost = lambda g: sum(n * w for n, w in g) if g else rows * t
    usable = [g for g in known if not g or groups_fit(g, ordered)]
    if chosen not in usable and usable:
        cheapest = min(usable, key=lambda g: (cost(g), len(g)))
        if cost(cheapest) <= (1 + slack) * cost(chosen):
            chosen = cheapest
    if not chosen:
        return batch, ()
    moved = {
        k: (np.asarray(v)[order] if np.ndim(v) and len(v) == rows else v) for k, v in batch.items()
    }
    return moved, chosen


class RowGrouper:
    """Each update's row groups for a run (``length_groups`` with up to ``groups`` groups over
    ``widths``), compiling a new grouping only where it pays: a compiled grouping that holds
    the rows is kept unless the best one saves more positions over the updates left than a
    compile costs, both measured on the run (``record``: each update's seconds; a grouping's
    first call compiles it). Until a compile and a steady update have been timed, any compiled
    grouping that holds the rows is kept."""

    def __init__(self, groups: int, widths: Sequence[int]):
        self.groups, self.widths = int(groups), tuple(widths)
        self.known: dict[int, set] = {}  # batch width -> groupings compiled
        self.first: list[float] = []  # seconds of calls that compiled
        self.steady: list[float] = []  # seconds of calls that did not

    def __call__(self, batch: dict[str, np.ndarray], updates_left: int):
        width = np.shape(batch["attention_mask"])[1]
        seen = sorted(self.known.get(width, ()))
        slack = float("inf")
        if self.first and self.steady:
            steady = float(np.median(self.steady))
            compile_updates = max(float(np.median(self.first)) - steady, 0.0) / max(steady, 1e-9)
            slack = compile_updates / max(updates_left, 1)
        return length_groups(batch, self.groups, self.widths, seen, slack)

    def record(self, width: int, groups: RowGroups, seconds: float) -> None:
        """After an update with ``groups`` on a batch of ``width`` columns took ``seconds``."""
        seen = self.known.setdefault(width, set())
        (self.steady if groups in seen else self.first).append(seconds)
        seen.add(groups)


def pad_rows_to(batch: dict[str, np.ndarray], multiple: int) -> tuple[dict[str, np.ndarray], int]:
    """Append all-zero rows (no attention, no loss token, reward 0) up to a multiple of
    ``multiple`` rows, so that no row is dropped to fill whole micro-batches; the padded rows
    add nothing to any masked sum or count. Returns (batch, rows added)."""
    rows = len(batch["input_ids"])
    extra = (-rows) % multiple
    if not extra:
        return batch, 0
    out = {}
    for k, v in batch.items():
        if np.ndim(v) == 0:
            out[k] = v
        else:
            pad = np.zeros((extra,) + v.shape[1:], v.dtype)
            if k == "group_ids":  # padded rows are groups of their own
                pad = np.arange(extra, dtype=v.dtype) + (int(v.max()) + 1 if len(v) else 0)
            out[k] = np.concatenate([v, pad])
    return out, extra
