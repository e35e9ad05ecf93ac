"""Pieces every mode shares: loading models by source, the retriever, the sampler settings,
prompt encoding, sequence log-probs, and turning rollouts into an update batch."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.data.search_r1 import QARecord
from dgpo_jax.evaluation import exact_match, extract_answer
from dgpo_jax.models import Qwen2Config, forward_hidden, get_preset, init_params, lm_logits
from dgpo_jax.models.hf_io import load_hf
from dgpo_jax.run_config import parse_rules, split_list
from dgpo_jax.sharding import ShardingPlan, plan_from_config

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- models ---
def make_plan(cfg) -> ShardingPlan:
    shape = {k: int(v) for k, v in cfg.mesh.shape.items()}
    devices = jax.devices()[: cfg.mesh.num_devices] if cfg.mesh.num_devices else None
    return plan_from_config(shape, parse_rules(cfg.mesh.rules), devices=devices)


def load_model(source: str, dtype: str, vocab_size: int, plan: ShardingPlan | None = None,
               seed: int = 0, role: str = "model") -> tuple[Qwen2Config, Any]:
    """A model from a HF directory, a dgpo_jax checkpoint directory, or ``preset:NAME``.

    Presets get random weights and the tokenizer's vocabulary size.
    """
    if source.startswith("preset:"):
        config = get_preset(source[len("preset:"):], vocab_size=vocab_size)
        params = init_params(config, jax.random.key(seed), jnp.dtype(dtype))
    elif os.path.isfile(os.path.join(source, "config.json")):
        config, params = load_hf(source, dtype=dtype)
    elif os.path.isdir(source):
        from dgpo_jax.convert import load_params_checkpoint
        config, params, _ = load_params_checkpoint(source, dtype=dtype)
    else:
        raise FileNotFoundError(f"{role} {source!r}: not a HF directory, a checkpoint directory "
                                "or preset:NAME")
    if config.vocab_size < vocab_size:
        raise ValueError(f"{role} {source!r} has vocab_size {config.vocab_size} < the "
                         f"tokenizer's {vocab_size}")
    if plan is not None:
        params = plan.shard_params(config, params)
    return config, params


# ------------------------------------------------------------------------------- retrieval ---
def build_retriever(cfg):
    from dgpo_jax.retrieval import HttpRetriever, InProcessRetriever
    if cfg.retrieval.kind == "in_process":
        return InProcessRetriever(cfg.retrieval.index_dir, topk=cfg.retrieval.topk)
    return HttpRetriever(split_list(cfg.retrieval.urls), topk=cfg.retrieval.topk,
                         timeout=cfg.retrieval.timeout_s, max_retries=cfg.retrieval.max_retries)


def sampler_config(cfg, tokenizer, greedy: bool = False, max_prefix_length: int | None = None):
    from dgpo_jax.sampler import SamplerConfig, stop_sequences_for
    s = cfg.sampler
    return SamplerConfig(
        **stop_sequences_for(tokenizer),
        cache_len=s.cache_len, max_prompt_length=s.max_prompt_length,
        max_new_tokens_per_turn=s.max_new_tokens_per_turn, max_new_tokens=s.max_new_tokens,
        max_obs_length=s.max_obs_length, max_turns=s.max_turns, greedy=greedy,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, ingest_chunk=s.ingest_chunk,
        max_prefix_length=s.max_prefix_length if max_prefix_length is None
        else max_prefix_length)


# --------------------------------------------------------------------------------- prompts ---
def encode_prompt(record: QARecord, tokenizer, use_chat_template: bool = True) -> list[int]:
    """The protocol's prompt: the user message through the chat template when there is one."""
    messages = [{"role": r, "content": c} for r, c in record.messages]
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(record.user_content, add_special_tokens=False)]


# ------------------------------------------------------------------------------- log-probs ---
@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def sequence_logprobs(config: Qwen2Config, params, input_ids, attention_mask, chunk: int = 256):
    """``[B, T]`` log p(ids[t] | ids[<t]) aligned with ``input_ids`` (position 0 holds 0).

    The vocabulary projection runs over chunks of positions, so ``[B, T, V]`` float32 logits
    never exist at once.
    """
    b, t = input_ids.shape
    hidden = forward_hidden(config, params, input_ids, attention_mask)[:, :-1]
    targets = input_ids[:, 1:]
    n = t - 1
    pad = (-n) % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, -1, chunk, hidden.shape[-1]).swapaxes(0, 1)
    ts = targets.reshape(b, -1, chunk).swapaxes(0, 1)

    def one(_, xs):
        h, tgt = xs
        logp = jax.nn.log_softmax(lm_logits(config, params, h), axis=-1)
        return None, jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]

    _, out = jax.lax.scan(one, None, (hs, ts))
    out = out.swapaxes(0, 1).reshape(b, -1)[:, :n]
    return jnp.concatenate([jnp.zeros((b, 1), out.dtype), out], axis=1)


# ------------------------------------------------------------------------ rollout -> batch ---
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


def score_rollout(rollout, records: Sequence[QARecord], tokenizer,
                  group_ids: Sequence[int] | None = None) -> ScoredRollouts:
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
        "loss_mask": np.concatenate([np.zeros((b, p)), np.asarray(arr.loss_mask)],
                                    1).astype(np.float32),
        "teacher_mask": np.concatenate([np.zeros((b, p)), np.asarray(arr.teacher_mask)],
                                       1).astype(np.float32),
        "sampler_logprobs": np.concatenate([np.zeros((b, p)), np.asarray(arr.logprobs)],
                                           1).astype(np.float32),
        "rewards": rewards,
        "group_ids": np.asarray(group_ids if group_ids is not None else np.arange(b), np.int32),
    }
    return ScoredRollouts(batch, responses, answers, rewards, np.asarray(arr.num_searches),
                          list(rollout.finish_reasons), int(np.asarray(arr.generated).sum()))


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


def trim_to_bucket(batch: dict[str, np.ndarray], multiple: int = 64) -> dict[str, np.ndarray]:
    """Cut right padding down to the batch's longest sequence rounded up to ``multiple``: few
    distinct widths (few compilations), no compute spent on the dataset's longest sequence."""
    longest = int(np.asarray(batch["attention_mask"]).sum(1).max())
    width = min(batch["input_ids"].shape[1], longest + (-longest) % multiple)
    return {k: (v[:, :width] if np.ndim(v) == 2 else v) for k, v in batch.items()}
