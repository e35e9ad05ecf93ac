"""`Sampler`: the user-facing entry point. Prepares a batch, runs the compiled rollout, and
collects the per-row outputs (arrays plus the host-side text: queries, answers, errors)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.models.config import Qwen2Config
from dgpo_jax.parallel.distributed import to_host
from dgpo_jax.sampler.config import FINISH_REASONS, ON_RETRIEVER_ERROR, RUNNING, SamplerConfig
from dgpo_jax.sampler.host import (
    RolloutHost,
    RolloutRetrievalError,
    prepare_prefixes,
    prepare_prompts,
    register,
    unregister,
)
from dgpo_jax.sampler.loop import (
    RolloutArrays,
    plan_spans_processes,
    resolve_decode_layers,
    resolve_decode_path,
    rollout_program,
)

log = logging.getLogger(__name__)

# What a `RolloutHost` records: per-row lists (length B) and counters.
_HOST_ROWS = ("queries", "answers", "turn_texts", "errors")
_HOST_COUNTERS = (
    "num_calls",
    "bytes_to_host",
    "rows_per_call",
    "empty_results",
    "short_results",
    "retriever_seconds",
    "host_seconds",
)


def _host_record(host: RolloutHost) -> dict:
    record = {name: getattr(host, name) for name in _HOST_ROWS + _HOST_COUNTERS}
    record["num_calls_per_process"] = [host.num_calls]
    return record


def _merge_across_processes(host: RolloutHost) -> dict:
    """`_host_record` of every process's host, merged (a collective: every process calls it).

    With host calls spread over processes, each process's host filled only the rows it handled
    and counted only its own calls. The records travel as JSON bytes (lengths first, then the
    records padded to the longest); a row's lists come from the process that handled it (the
    others have nothing there), counters are summed, ``num_calls_per_process`` lists them.
    """
    from jax.experimental import multihost_utils  # noqa: PLC0415 (only with several processes)

    mine = np.frombuffer(json.dumps(_host_record(host)).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(mine.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: mine.size] = mine
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    records = [json.loads(gathered[p, :n].tobytes()) for p, n in enumerate(lengths)]
    rows = range(host.batch_size)
    merged = {
        name: [sum((r[name][i] for r in records), []) for i in rows]
        for name in ("queries", "turn_texts")
    }
    for name in ("answers", "errors"):
        merged[name] = [
            next((r[name][i] for r in records if r[name][i] is not None), None) for i in rows
        ]
    for name in _HOST_COUNTERS:
        merged[name] = sum((r[name] for r in records), [] if name == "rows_per_call" else 0)
    merged["num_calls_per_process"] = [r["num_calls"] for r in records]
    return merged


@dataclasses.dataclass
class Rollout:
    """The trajectories of one batch.

    arrays: `RolloutArrays` as NumPy (tokens/masks/log-probs/turn ids ``[B, R]``, the prompt
      excluded; see `loop.RolloutArrays`).
    prompt_ids / prompt_mask: ``[B, P]`` the left-padded prompts the program ran on (a
      prompt_too_long row is all padding).
    finish_reasons: one name of `FINISH_REASONS` per row.
    queries / answers / turn_texts / errors: per row, from the host (see `host.RolloutHost`).
    stats: wall-clock seconds, loop steps, token counts.
    """

    arrays: RolloutArrays
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    finish_reasons: list[str]
    queries: list[list[str]]
    answers: list[str | None]
    turn_texts: list[list[str]]
    errors: list[str | None]
    stats: dict[str, Any]

    def response_ids(self, row: int) -> np.ndarray:
        """The row's response token ids ``[length]`` (prompt excluded)."""
        return self.arrays.tokens[row, : self.arrays.length[row]]

    def __len__(self) -> int:
        return len(self.finish_reasons)


class Sampler:
    """Multi-turn search rollouts with a KV cache, the retriever called from inside the loop.

        sampler = Sampler(model_config, SamplerConfig(**stop_sequences_for(tok), ...), tok,
                          retriever)
        out = sampler.generate(params, prompts, seed=0)

    Args:
      model_config: the student's `Qwen2Config`.
      config: the `SamplerConfig` (static: one compilation per config and prompt width).
      tokenizer: ``encode(text, add_special_tokens=False)`` / ``decode(ids,
        skip_special_tokens=False)`` (a Hugging Face tokenizer).
      retriever: has ``search(queries: list[str]) -> list[str]`` (formatted documents).
      plan: optional `ShardingPlan`: batch over its data axes, params as the caller sharded them.
      teacher_config: the teacher's `Qwen2Config` for Guided-OPD (None: no teacher, no 2nd cache).
      topk: documents per query (None: the retriever's default).
      on_retriever_error: "raise" (a wave whose search fails after `search_attempts` attempts
        stops the rollout with `RolloutRetrievalError`, naming the URLs and the waiting rows)
        or "finish" (those rows finish with retriever_error).
      search_attempts: attempts per wave's search (the HTTP client retries within each).
    """

    def __init__(
        self,
        model_config: Qwen2Config,
        config: SamplerConfig,
        tokenizer: Any,
        retriever: Any,
        plan: Any = None,
        teacher_config: Qwen2Config | None = None,
        topk: int | None = None,
        on_retriever_error: str = "raise",
        search_attempts: int = 2,
    ):
        if on_retriever_error not in ON_RETRIEVER_ERROR:
            raise ValueError(
                f"on_retriever_error must be 'raise' or 'finish', got {on_retriever_error!r}"
            )
        if not hasattr(retriever, "search"):
            raise TypeError(f"retriever {type(retriever).__name__} has no search(queries) method")
        if teacher_config is not None and teacher_config.vocab_size != model_config.vocab_size:
            raise ValueError(
                f"teacher vocab_size {teacher_config.vocab_size} != student vocab_size "
                f"{model_config.vocab_size}: they must share the tokenizer"
            )
        if config.teacher_turn_prob > 0 and teacher_config is None:
            raise ValueError(
                f"SamplerConfig.teacher_turn_prob={config.teacher_turn_prob} needs a "
                "teacher_config (and teacher_params in generate)"
            )
        # The cached decode reads no training-only field (remat, attention kernel): one
        # compiled rollout per model, whatever the run's update settings.
        self.model_config = model_config.for_decoding()
        self.config = config
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.plan = plan
        self.teacher_config = None if teacher_config is None else teacher_config.for_decoding()
        self.topk = topk
        self.on_retriever_error = on_retriever_error
        self.search_attempts = search_attempts

    def _encode_prompts(self, prompts) -> list[list[int]]:
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                prompt = self.tokenizer.encode(prompt, add_special_tokens=False)
            out.append(prompt)
        return out

    def generate(
        self,
        params,
        prompts: Sequence[Sequence[int] | str],
        seed: int = 0,
        *,
        teacher_params=None,
        prefixes: Sequence[Sequence[int] | None] | None = None,
        row_ids: Sequence[int] | None = None,
        teacher_turn_prob: float | None = None,
    ) -> Rollout:
        """Rolls out every prompt (token ids, or text encoded without special tokens).

        prefixes: per row, teacher-written tokens to continue from (TrOPD), or None; they start
          the first turn, are marked in ``teacher_mask`` and never in ``loss_mask``.
        row_ids: the RNG stream of each row (default 0..B-1): a row's samples depend only on
          (seed, row id, its own context), not on the rest of the batch.
        teacher_turn_prob: Guided-OPD probability for this call (default: the config's); a
          runtime value, so a schedule over training steps does not recompile.
        """
        cfg = self.config
        if self.teacher_config is not None and teacher_params is None:
            raise ValueError("this Sampler has a teacher_config: pass teacher_params to generate")
        if prefixes is not None and cfg.max_prefix_length == 0:
            raise ValueError("prefixes given but SamplerConfig.max_prefix_length is 0")
        prob = cfg.teacher_turn_prob if teacher_turn_prob is None else float(teacher_turn_prob)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"teacher_turn_prob must be in [0, 1], got {prob}")
        if prob > 0 and self.teacher_config is None:
            raise ValueError(f"teacher_turn_prob={prob} needs a Sampler with a teacher_config")
        vocab = self.model_config.vocab_size
        prompt_ids, prompt_mask, active = prepare_prompts(self._encode_prompts(prompts), cfg, vocab)
        batch = prompt_ids.shape[0]
        prefix_ids, prefix_len = prepare_prefixes(prefixes, batch, cfg, vocab)
        if row_ids is None:
            row_ids = np.arange(batch, dtype=np.int32)
        row_ids = np.asarray(row_ids, np.int32)
        if row_ids.shape != (batch,):
            raise ValueError(f"row_ids: shape {row_ids.shape}, expected ({batch},)")
        for i in np.flatnonzero(~active):
            log.warning(
                "prompt %d has more than max_prompt_length=%d tokens: finished as prompt_too_long",
                i,
                cfg.max_prompt_length,
            )
        inputs = (prompt_ids, prompt_mask, active, prefix_ids, prefix_len, row_ids)
        if self.plan is not None:
            inputs = self.plan.shard_batch(inputs)
        host = RolloutHost(
            cfg,
            self.tokenizer,
            self.retriever,
            batch,
            self.topk,
            on_retriever_error=self.on_retriever_error,
            search_attempts=self.search_attempts,
        )
        host_id = register(host)
        started = time.perf_counter()
        try:
            # The teacher probability and the wave policy are passed traced (no recompiles).
            static_config = cfg.compiled()
            arrays = rollout_program(
                self.model_config,
                static_config,
                self.plan,
                self.teacher_config,
                params,
                teacher_params if self.teacher_config is not None else None,
                *inputs[:5],
                jnp.asarray(seed, jnp.uint32),
                inputs[5],
                jnp.int32(host_id),
                jnp.float32(prob),
                jnp.float32(cfg.wave_fraction),
                jnp.int32(cfg.wave_max_wait),
            )
            arrays = to_host(arrays)  # gathers shards held by other processes
        except Exception as error:
            if isinstance(host.failure, RolloutRetrievalError):
                raise RolloutRetrievalError(str(host.failure)) from None
            if host.failure is not None:
                raise RuntimeError(
                    f"sampler host callback failed: {host.failure!r}"
                ) from host.failure
            raise error
        finally:
            unregister(host_id)
        seconds = time.perf_counter() - started
        # Host calls ran on several processes (per shard, or on the first device's process):
        # every process returns all rows' text and the counts of all calls.
        spans = jax.process_count() > 1 and plan_spans_processes(self.plan)
        record = _merge_across_processes(host) if spans else _host_record(host)
        if np.any(arrays.finish_reason == RUNNING):
            rows = np.flatnonzero(arrays.finish_reason == RUNNING).tolist()
            raise RuntimeError(
                f"rollout loop stopped with unfinished rows {rows} (step limit "
                f"reached: a sampler bug)"
            )
        generated = int(arrays.generated.sum())
        ingested = int(arrays.length.sum()) - generated
        path = resolve_decode_path(cfg, self.plan)
        stats = {
            "seconds": seconds,
            "steps": int(arrays.steps),
            "ingest_steps": int(arrays.ingest_steps),
            "generated_tokens": generated,
            "ingested_tokens": ingested + int(prompt_mask.sum()),
            "host_calls": record["num_calls"],
            "host_calls_per_process": record["num_calls_per_process"],
            "waves": int(arrays.waves),
            "decode_path": path,
            "decode_layers": resolve_decode_layers(cfg, path, self.plan),
            "max_turns": cfg.max_turns,
            "decode_steps": int(arrays.steps) - int(arrays.ingest_steps),
            "decode_rows": int(arrays.decode_rows),
            "ingest_rows": int(arrays.ingest_rows),
            "model_calls": int(arrays.steps) * (2 if self.teacher_config is not None else 1),
            "bytes_to_host": record["bytes_to_host"],
            "searches_per_call": (
                sum(record["rows_per_call"]) / len(record["rows_per_call"])
                if record["rows_per_call"]
                else 0.0
            ),
            "empty_results": record["empty_results"],
            "short_results": record["short_results"],
            "host_seconds": record["host_seconds"],
            "retriever_seconds": record["retriever_seconds"],
        }
        return Rollout(
            arrays=arrays,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            finish_reasons=[FINISH_REASONS[r] for r in arrays.finish_reason],
            queries=record["queries"],
            answers=record["answers"],
            turn_texts=record["turn_texts"],
            errors=record["errors"],
            stats=stats,
        )
