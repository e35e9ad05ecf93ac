"""The compiled rollout: prefill, then nested ``lax.while_loop``s of decode and ingest steps.

Shapes: B rows, P padded prompt width, S = ``cache_len`` context slots, R = S - P response
slots (response slot r is KV slot P + r), C = ``ingest_chunk``, O = observation buffer width,
Pf = prefix buffer width, W = longest stop sequence, V vocabulary.

Every row is in one phase: GENERATING (it samples one token per decode step), INGESTING (an
observation is pending), AWAITING_HOST (its turn ended) or DONE. A decode step runs the model
on ``[M, 1]``: the sampled tokens of the generating rows, gathered into the smallest compiled
sub-batch M of B, B/2, B/4, ..., 1 that holds them (their number only falls until a turn
ends, so the loops run from the largest size down). Rows whose turn ended are handed to the
host in ONE ``io_callback`` (see `host.py`); their observations are then ingested one row at a
time, C tokens per ingest step (``[1, C]`` on that row's cache only), and decoding resumes.
Teacher prefixes (TrOPD) are ingested for all rows in one ``[B, Pf]`` step after the prompt.
Nothing is ever re-prefilled. Each step costs the rows and context in use (see
`forward_with_cache`), not B x S.

The optional teacher (Guided-OPD) has its own KV cache and sees every token the student sees;
it writes the turns whose coin (per row and turn, from the row's RNG) came up.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from dgpo_jax.models.config import Qwen2Config
from dgpo_jax.models.qwen2 import (
    KVCache,
    forward_with_cache,
    init_cache,
    lm_logits,
    split_layers,
)
from dgpo_jax.sampler import config as C
from dgpo_jax.sampler.config import SamplerConfig
from dgpo_jax.sampler.host import host_callback
from dgpo_jax.sampler.sampling import sample_tokens
from dgpo_jax.sampler.stops import ends_with_any, push_window

Array = jax.Array


@flax.struct.dataclass
class RolloutArrays:
    """Per-row outputs of the compiled rollout (prompt excluded; R response slots).

    tokens:          ``[B, R]`` int32, the response (generated turns, observations, prefixes);
                     pad after ``length``.
    length:          ``[B]`` int32, response tokens.
    loss_mask:       ``[B, R]`` bool, tokens the student generated (the only ones to train on).
    teacher_mask:    ``[B, R]`` bool, tokens the teacher wrote (prefixes and teacher turns).
    logprobs:        ``[B, R]`` float32, log-prob of each generated token under the distribution
                     it was drawn from (0 on observation and prefix tokens).
    turn_ids:        ``[B, R]`` int32, turn of each token (an observation belongs to the turn
                     whose action produced it; a prefix to turn 0); -1 after ``length``.
    num_turns:       ``[B]`` int32, turns generated (the final one included).
    num_searches:    ``[B]`` int32, searches answered by the retriever.
    generated:       ``[B]`` int32, tokens generated (student and teacher).
    finish_reason:   ``[B]`` int32, index into ``config.FINISH_REASONS``.
    steps:           ``[]`` int32, loop steps run.
    ingest_steps:    ``[]`` int32, of which ingest steps (one row, C tokens).
    """

    tokens: Array
    length: Array
    loss_mask: Array
    teacher_mask: Array
    logprobs: Array
    turn_ids: Array
    num_turns: Array
    num_searches: Array
    generated: Array
    finish_reason: Array
    steps: Array
    ingest_steps: Array


@flax.struct.dataclass
class _State:
    step: Array
    ingest_steps: Array
    phase: Array  # [B]
    finish: Array  # [B]
    cache: KVCache
    teacher_cache: Any  # KVCache | None
    next_logits: Array  # [B, V]
    teacher_next_logits: Any  # [B, V] | None
    tokens: Array  # [B, R + C]
    loss_mask: Array
    teacher_mask: Array
    logprobs: Array
    turn_ids: Array
    resp_len: Array  # [B]
    turn_start: Array
    turn_gen: Array
    total_gen: Array
    turn: Array
    searches: Array
    window: Array  # [B, W]
    pending: Array  # [B, O + C]
    pending_len: Array
    pending_pos: Array
    teacher_writes: Array  # [B] bool
    ended_on_eos: Array  # [B] bool, the turn awaiting the host ended on EOS


def _batch_constrain(plan, tree):
    if plan is None:
        return tree

    def one(x):
        if x.ndim == 0:
            return x
        return plan.constrain(x, ("batch",) + (None,) * (x.ndim - 1))

    return jax.tree.map(one, tree)


def _cache_constrain(plan, cache: KVCache | None) -> KVCache | None:
    if plan is None or cache is None:
        return cache
    names = ("layers", "batch", "act_kv_heads", "cache_seq", "head_dim")
    return cache.replace(
        k=plan.constrain(cache.k, names),
        v=plan.constrain(cache.v, names),
        valid=plan.constrain(cache.valid, ("batch", None)),
        end=plan.constrain(cache.end, ("batch",)),
        next_pos=plan.constrain(cache.next_pos, ("batch",)),
    )


def _last_real(hidden: Array, mask: Array) -> tuple[Array, Array]:
    """hidden ``[B, T, D]``, mask ``[B, T]`` -> hidden at each row's last real token ``[B, D]``,
    and whether the row had one ``[B]``."""
    t = mask.shape[1]
    last = jnp.max(jnp.where(mask, jnp.arange(t)[None], -1), axis=1)
    picked = jnp.take_along_axis(hidden, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
    return picked, last >= 0


def _write(buf: Array, values: Array, start: Array) -> Array:
    """buf ``[B, N]``; values ``[B, T]`` written at per-row column ``start [B]``."""
    return jax.vmap(lambda b, v, s: jax.lax.dynamic_update_slice(b, v, (s,)))(buf, values, start)


def _write_row(buf: Array, values: Array, row: Array, start: Array) -> Array:
    """buf ``[B, N]``; values ``[T]`` written in row `row` from column `start` (scalars)."""
    return jax.lax.dynamic_update_slice(buf, values[None].astype(buf.dtype), (row, start))


def _decode_sizes(batch: int, smallest: int = 1) -> tuple[int, ...]:
    """Rows per decode step, compiled variants: B, B/2, B/4, ... down to `smallest`."""
    sizes = [batch]
    while sizes[-1] // 2 >= smallest:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def _coin_keys(row_keys: Array, turn: Array) -> Array:
    return jax.vmap(lambda k, t: jax.random.fold_in(jax.random.fold_in(k, 1), t))(row_keys, turn)


def _teacher_turn(has_teacher: bool, row_keys: Array, turn: Array, prob: Array) -> Array:
    """``[B]`` bool: the teacher writes turn ``turn [B]`` of each row (probability ``prob``)."""
    if not has_teacher:
        return jnp.zeros(turn.shape, bool)
    u = jax.vmap(jax.random.uniform)(_coin_keys(row_keys, turn))
    return u < prob


def _run_model(model_cfg, params, ids, mask, cache, plan, logits, rows=None):
    """One model step on ``ids [M, T]`` for cache rows `rows` (None: all, M = B). Returns the
    next-token logits of every row, ``[B, V]``: after its last real token for a stepped row that
    had one, else unchanged from `logits` ``[B, V]`` (dummy rows >= B are dropped); and the
    cache."""
    hidden, cache = forward_with_cache(
        model_cfg, params, ids, cache, mask, plan, return_hidden=True, rows=rows
    )
    last, has = _last_real(hidden, mask)
    new = lm_logits(model_cfg, params, last)
    if rows is None:
        return jnp.where(has[:, None], new, logits), _cache_constrain(plan, cache)
    new = jnp.where(has[:, None], new, logits[jnp.minimum(rows, logits.shape[0] - 1)])
    return logits.at[rows].set(new, mode="drop"), _cache_constrain(plan, cache)


@functools.partial(jax.jit, static_argnames=("model_config", "config", "plan", "teacher_config"))
def rollout_program(
    model_config: Qwen2Config,
    config: SamplerConfig,
    plan,
    teacher_config,
    params,
    teacher_params,
    prompt_ids: Array,
    prompt_mask: Array,
    active: Array,
    prefix_ids: Array,
    prefix_len: Array,
    seed: Array,
    row_ids: Array,
    host_id: Array,
    teacher_turn_prob: Array,
) -> RolloutArrays:
    """The whole multi-turn rollout of a left-padded batch as one program.

    prompt_ids/prompt_mask ``[B, P]`` (left-padded), active ``[B]`` bool (False: the row
    finishes with prompt_too_long), prefix_ids ``[B, Pf]`` / prefix_len ``[B]`` (teacher
    prefixes, right-padded; length 0 = none), seed ``[]`` int, row_ids ``[B]`` int (RNG stream of
    each row), host_id ``[]`` int32 (the registered `RolloutHost`), teacher_turn_prob ``[]``
    float32 (a traced value: changing it does not recompile). teacher_config None: no teacher
    (teacher_params and teacher_turn_prob ignored).
    """
    cfg = config
    batch, prompt_width = prompt_ids.shape
    if prompt_width >= cfg.cache_len:
        raise ValueError(f"prompt width {prompt_width} leaves no room in cache_len {cfg.cache_len}")
    has_teacher = teacher_config is not None
    if has_teacher and teacher_config.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"teacher vocab {teacher_config.vocab_size} != student vocab {model_config.vocab_size}"
        )
    chunk = cfg.ingest_chunk
    resp_slots = cfg.cache_len - prompt_width
    has_prefixes = cfg.max_prefix_length > 0
    prefix_width = prefix_ids.shape[1]
    if has_prefixes and prefix_width >= resp_slots:
        raise ValueError(
            f"prefix width {prefix_width} leaves no room to generate after the prompt "
            f"(width {prompt_width}) in cache_len {cfg.cache_len}"
        )
    buf_width = resp_slots + max(chunk, prefix_width)  # spare columns: a write never clamps
    obs_width = cfg.obs_buffer_length
    window_width = cfg.stop_window
    pad = cfg.pad_token_id

    # Per-layer weights, split once: a step never slices them out of the stacked arrays.
    params = split_layers(params)
    if has_teacher:
        teacher_params = split_layers(teacher_params)

    base_key = jax.random.key(seed)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(row_ids)
    sample_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(row_keys)

    # --- prefill: the prompt, then the teacher prefixes; both models see both -----------------
    # The cache has exactly cache_len slots: writes of masked columns past it are dropped.
    prompt_mask = prompt_mask & active[:, None]
    prefix_len = jnp.where(active, prefix_len, 0).astype(jnp.int32)
    prefix_mask = jnp.arange(prefix_width, dtype=jnp.int32)[None] < prefix_len[:, None]
    prefix_ids = jnp.where(prefix_mask, prefix_ids.astype(jnp.int32), pad)

    def prefill(mcfg, p):
        cache = _cache_constrain(
            plan, init_cache(mcfg, batch, cfg.cache_len, p["embed_tokens"].dtype)
        )
        logits = jnp.zeros((batch, mcfg.vocab_size), jnp.float32)
        logits, cache = _run_model(mcfg, p, prompt_ids, prompt_mask, cache, plan, logits)
        if has_prefixes:
            logits, cache = _run_model(mcfg, p, prefix_ids, prefix_mask, cache, plan, logits)
        return logits, cache

    next_logits, cache = prefill(model_config, params)
    teacher_next_logits, teacher_cache = (
        prefill(teacher_config, teacher_params) if has_teacher else (None, None)
    )

    def response_buffer(default, dtype, prefix_value=None):
        """``[B, buf_width]`` filled with `default`; a prefix (the start of turn 0, written by
        the teacher) occupies its row's first prefix_len columns with `prefix_value`."""
        buf = jnp.full((batch, buf_width), default, dtype)
        if not has_prefixes or prefix_value is None:
            return buf
        values = jnp.where(prefix_mask, prefix_value, default).astype(dtype)
        return buf.at[:, :prefix_width].set(values)

    zeros = jnp.zeros((batch,), jnp.int32)
    state = _State(
        step=jnp.int32(0),
        ingest_steps=jnp.int32(0),
        phase=jnp.where(active, C.GENERATING, C.DONE),
        finish=jnp.where(active, C.RUNNING, C.PROMPT_TOO_LONG).astype(jnp.int32),
        cache=cache,
        teacher_cache=teacher_cache,
        next_logits=next_logits,
        teacher_next_logits=teacher_next_logits,
        tokens=response_buffer(pad, jnp.int32, prefix_ids),
        loss_mask=response_buffer(False, bool),
        teacher_mask=response_buffer(False, bool, True),
        logprobs=response_buffer(0.0, jnp.float32),
        turn_ids=response_buffer(-1, jnp.int32, 0),
        resp_len=prefix_len if has_prefixes else zeros,
        turn_start=zeros,
        turn_gen=zeros,
        total_gen=zeros,
        turn=zeros,
        searches=zeros,
        window=jnp.zeros((batch, window_width), jnp.int32),
        pending=jnp.full((batch, obs_width + chunk), pad, jnp.int32),
        pending_len=zeros,
        pending_pos=zeros,
        teacher_writes=_teacher_turn(has_teacher, row_keys, zeros, teacher_turn_prob),
        ended_on_eos=jnp.zeros((batch,), bool),
    )
    state = _batch_constrain(plan, state.replace(cache=None, teacher_cache=None)).replace(
        cache=cache, teacher_cache=teacher_cache
    )

    eos_ids = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)

    def decode(s: _State, rows_per_step: int) -> _State:
        """One ``[M, 1]`` model step, M = `rows_per_step`: every generating row (at most M of
        them) samples its next token (from the writer of its turn) and appends it; the model
        runs on those rows' caches only. Rows that end a turn await the host."""
        gen = s.phase == C.GENERATING
        if rows_per_step == batch:
            rows, read = None, slice(None)
        else:  # the first M generating rows (index B: a dummy row, nothing is written)
            rows = jnp.nonzero(gen, size=rows_per_step, fill_value=batch)[0].astype(jnp.int32)
            read = jnp.minimum(rows, batch - 1)

        def scatter(values, default):  # [M] values of `rows` -> [B]
            if rows is None:
                return values
            return jnp.full((batch,), default, values.dtype).at[rows].set(values, mode="drop")

        keys = jax.vmap(jax.random.fold_in)(sample_keys[read], s.resp_len[read])
        token, logprob = sample_tokens(cfg, s.next_logits[read], keys)
        if has_teacher:
            t_token, t_logprob = sample_tokens(cfg, s.teacher_next_logits[read], keys)
            token = jnp.where(s.teacher_writes[read], t_token, token)
            logprob = jnp.where(s.teacher_writes[read], t_logprob, logprob)
        token, logprob = scatter(token, pad), scatter(logprob, 0.0)
        ids = jnp.where(gen, token, pad)[:, None]
        mask = gen[:, None]

        # Both models see every token; the model runs on the M rows' caches only.
        step_ids, step_mask = (
            (ids, mask) if rows is None else (ids[read], mask[read] & (rows < batch)[:, None])
        )
        next_logits, cache = _run_model(
            model_config, params, step_ids, step_mask, s.cache, plan, s.next_logits, rows
        )
        teacher_next_logits, teacher_cache = s.teacher_next_logits, s.teacher_cache
        if has_teacher:
            teacher_next_logits, teacher_cache = _run_model(
                teacher_config,
                teacher_params,
                step_ids,
                step_mask,
                teacher_cache,
                plan,
                teacher_next_logits,
                rows,
            )
        resp_len = s.resp_len + gen
        # Stops and budgets.
        window = push_window(s.window, token, gen)
        turn_gen = s.turn_gen + gen
        total_gen = s.total_gen + gen
        hit_eos = gen & jnp.any(token[:, None] == eos_ids[None], axis=1)
        stopped = gen & (
            ends_with_any(window, turn_gen, cfg.search_stops)
            | ends_with_any(window, turn_gen, cfg.answer_stops)
            | hit_eos
        )
        turn_end = stopped | (gen & (turn_gen >= cfg.max_new_tokens_per_turn))
        # A row that did not end its turn may still run out of tokens or room for the next one.
        mid_turn_reason = jnp.select(
            [total_gen >= cfg.max_new_tokens, resp_len >= resp_slots],
            [C.MAX_TOKENS, C.CONTEXT_FULL],
            C.RUNNING,
        )
        ends_mid_turn = gen & ~turn_end & (mid_turn_reason != C.RUNNING)
        phase = jnp.where(turn_end, C.AWAITING_HOST, s.phase)
        phase = jnp.where(ends_mid_turn, C.DONE, phase)
        writes = s.teacher_writes[:, None]
        # (Rows not generating write their buffers' defaults at resp_len, past their end.)
        return s.replace(
            step=s.step + 1,
            phase=phase,
            finish=jnp.where(ends_mid_turn, mid_turn_reason, s.finish),
            cache=cache,
            teacher_cache=teacher_cache,
            next_logits=next_logits,
            teacher_next_logits=teacher_next_logits,
            tokens=_write(s.tokens, ids, s.resp_len),
            loss_mask=_write(s.loss_mask, mask & ~writes, s.resp_len),
            teacher_mask=_write(s.teacher_mask, mask & writes, s.resp_len),
            logprobs=_write(s.logprobs, jnp.where(mask, logprob[:, None], 0.0), s.resp_len),
            turn_ids=_write(s.turn_ids, jnp.where(mask, s.turn[:, None], -1), s.resp_len),
            resp_len=resp_len,
            turn_gen=turn_gen,
            total_gen=total_gen,
            window=window,
            ended_on_eos=jnp.where(turn_end, hit_eos, s.ended_on_eos),
        )

    def ingest(s: _State) -> _State:
        """One ``[1, C]`` model step on the first ingesting row's cache only: it appends its next
        C pending observation tokens; a fully ingested observation starts its next turn."""
        row = jnp.argmax(s.phase == C.INGESTING).astype(jnp.int32)
        rows = row[None]
        start, length = s.pending_pos[row], s.pending_len[row]
        mask = start + jnp.arange(chunk, dtype=jnp.int32) < length
        ids = jnp.where(mask, jax.lax.dynamic_slice(s.pending[row], (start,), (chunk,)), pad)
        next_logits, cache = _run_model(
            model_config, params, ids[None], mask[None], s.cache, plan, s.next_logits, rows
        )
        teacher_next_logits, teacher_cache = s.teacher_next_logits, s.teacher_cache
        if has_teacher:
            teacher_next_logits, teacher_cache = _run_model(
                teacher_config,
                teacher_params,
                ids[None],
                mask[None],
                teacher_cache,
                plan,
                teacher_next_logits,
                rows,
            )
        count = jnp.sum(mask, dtype=jnp.int32)
        at = s.resp_len[row]
        no = jnp.zeros((chunk,), bool)
        return s.replace(
            step=s.step + 1,
            ingest_steps=s.ingest_steps + 1,
            phase=s.phase.at[row].set(
                jnp.where(start + count >= length, C.GENERATING, C.INGESTING)
            ),
            cache=cache,
            teacher_cache=teacher_cache,
            next_logits=next_logits,
            teacher_next_logits=teacher_next_logits,
            tokens=_write_row(s.tokens, ids, row, at),
            loss_mask=_write_row(s.loss_mask, no, row, at),
            teacher_mask=_write_row(s.teacher_mask, no, row, at),
            logprobs=_write_row(s.logprobs, jnp.zeros((chunk,), jnp.float32), row, at),
            # An observation belongs to the turn whose action produced it.
            turn_ids=_write_row(s.turn_ids, jnp.where(mask, s.turn[row] - 1, -1), row, at),
            resp_len=s.resp_len.at[row].add(count),
            pending_pos=s.pending_pos.at[row].add(count),
        )

    def resolve_turns(s: _State) -> _State:
        """ONE host call for every row awaiting it: parse, retrieve, observation ids; then each
        such row either finishes or starts ingesting its observation (its next turn follows)."""
        waiting = s.phase == C.AWAITING_HOST
        allowed = s.turn < cfg.max_turns
        shapes = (
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch, obs_width), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
        )
        action, obs, obs_len = _batch_constrain(
            plan,
            io_callback(
                host_callback, shapes, host_id, waiting, s.tokens, s.turn_start, s.resp_len, allowed
            ),
        )
        answered = waiting & (action == C.ACTION_ANSWER)
        errored = waiting & (action == C.ACTION_ERROR)
        eos_finish = (
            waiting & s.ended_on_eos & (action == C.ACTION_INVALID) & cfg.eos_ends_trajectory
        )
        final = waiting & ~allowed
        obs_fits = s.resp_len + obs_len < resp_slots  # the observation and one more token
        reason = jnp.select(
            [answered, errored, eos_finish, final, s.total_gen >= cfg.max_new_tokens, ~obs_fits],
            [C.ANSWER, C.RETRIEVER_ERROR, C.EOS, C.MAX_TURNS, C.MAX_TOKENS, C.CONTEXT_FULL],
            C.RUNNING,
        )
        ends_row = waiting & (reason != C.RUNNING)
        next_turn = waiting & ~ends_row
        turn = s.turn + waiting
        obs_padded = jnp.pad(obs, ((0, 0), (0, chunk)), constant_values=pad)
        return s.replace(
            phase=jnp.where(ends_row, C.DONE, jnp.where(next_turn, C.INGESTING, s.phase)),
            finish=jnp.where(ends_row, reason, s.finish),
            turn=turn,
            turn_start=jnp.where(next_turn, s.resp_len + obs_len, s.turn_start),
            turn_gen=jnp.where(waiting, 0, s.turn_gen),
            searches=s.searches + (waiting & (action == C.ACTION_SEARCH)),
            pending=jnp.where(next_turn[:, None], obs_padded, s.pending),
            pending_len=jnp.where(next_turn, obs_len, s.pending_len),
            pending_pos=jnp.where(next_turn, 0, s.pending_pos),
            teacher_writes=jnp.where(
                waiting,
                _teacher_turn(has_teacher, row_keys, turn, teacher_turn_prob),
                s.teacher_writes,
            ),
        )

    # Every step moves at least one row forward by one slot (or ends it); a row has resp_slots.
    step_limit = batch * (resp_slots + 1) + 4

    decode_sizes = _decode_sizes(batch)

    def under_limit(s):
        return s.step < step_limit

    def any_phase(s, phase):
        return jnp.any(s.phase == phase)

    def body(s):
        # Inner loops instead of a lax.cond per step: a conditional inside the loop would pass
        # the whole state (the KV caches) through its branches, which XLA copies every step.
        # Decode until some row ends its turn (or none generates), on fewer rows (a smaller
        # compiled step) as rows stop generating: within this phase their number only falls ...
        for size, smaller in zip(decode_sizes, decode_sizes[1:] + (0,)):
            s = jax.lax.while_loop(
                lambda x, smaller=smaller: (
                    under_limit(x)
                    & (jnp.sum(x.phase == C.GENERATING) > smaller)
                    & ~any_phase(x, C.AWAITING_HOST)
                ),
                functools.partial(decode, rows_per_step=size),
                s,
            )
        # ... then one host call for all rows whose turn ended (a no-op call only when every
        # row has finished) ...
        s = resolve_turns(s)
        # ... then ingest their observations, one row and C tokens per step.
        return jax.lax.while_loop(
            lambda x: under_limit(x) & any_phase(x, C.INGESTING),
            ingest,
            s,
        )

    s = jax.lax.while_loop(lambda x: under_limit(x) & ~jnp.all(x.phase == C.DONE), body, state)
    return RolloutArrays(
        tokens=s.tokens[:, :resp_slots],
        length=s.resp_len,
        loss_mask=s.loss_mask[:, :resp_slots],
        teacher_mask=s.teacher_mask[:, :resp_slots],
        logprobs=s.logprobs[:, :resp_slots],
        turn_ids=s.turn_ids[:, :resp_slots],
        num_turns=s.turn + (s.turn_gen > 0),  # a turn cut short by a budget counts too
        num_searches=s.searches,
        generated=s.total_gen,
        finish_reason=s.finish,
        steps=s.step,
        ingest_steps=s.ingest_steps,
    )
