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
