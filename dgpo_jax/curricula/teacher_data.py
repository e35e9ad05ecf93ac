"""Rollouts the curricula take from the teacher: TrOPD's teacher prefixes and DistiLLM's
validation batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from dgpo_jax.curricula.config import CurriculumConfig
from dgpo_jax.data.prompts import encode_prompt
from dgpo_jax.learner.batches import SEQ_MULTIPLE, pad_batch_to, score_rollout

log = logging.getLogger(__name__)


def teacher_prefixes(
    teacher_sampler,
    teacher_params,
    prompts: Sequence[list[int]],
    curriculum: CurriculumConfig,
    seed: int,
    rng: np.random.Generator,
) -> list[Any]:
    """TrOPD: for a ``teacher_prefix_share`` of the rows, the teacher's first-turn tokens (at
    most ``teacher_prefix_tokens``); None for the other rows."""
    chosen = rng.random(len(prompts)) < curriculum.teacher_prefix_share
    prefixes: list[Any] = [None] * len(prompts)
    if not chosen.any():
        return prefixes
    idx = np.flatnonzero(chosen)
    out = teacher_sampler.generate(teacher_params, [prompts[i] for i in idx], seed=seed + 7)
    arr = out.arrays
    for j, i in enumerate(idx):
        first = (np.asarray(arr.turn_ids[j]) == 0) & np.asarray(arr.loss_mask[j])
        toks = np.asarray(arr.tokens[j])[first][: curriculum.teacher_prefix_tokens]
        prefixes[i] = toks.tolist() if len(toks) else None
    return prefixes


def validation_batch(
    records,
    tokenizer,
    teacher_sampler,
    teacher_params,
    seed: int,
    micro_batches: int,
    use_chat_template: bool,
) -> dict:
    """DistiLLM's validation data: the teacher's correct rollouts of ``records`` (all of them
    when fewer than ``micro_batches`` are correct, said in the log), a whole number of
    micro-batches, fixed for the run."""
    prompts = [encode_prompt(r, tokenizer, use_chat_template) for r in records]
    rollout = teacher_sampler.generate(teacher_params, prompts, seed=seed + 7)
    scored = score_rollout(rollout, records, tokenizer)
    keep = np.flatnonzero(scored.rewards > 0)
    if len(keep) < micro_batches:
        log.info(
            "validation: the teacher answers %d of %d validation questions correctly; "
            "the validation loss uses all %d of its rollouts",
            len(keep),
            len(records),
            len(records),
        )
        keep = np.arange(len(records))
    keep = keep[: len(keep) - len(keep) % micro_batches]
    batch = {k: (v[keep] if np.ndim(v) else v) for k, v in scored.batch.items()}
    return pad_batch_to(batch, SEQ_MULTIPLE)
