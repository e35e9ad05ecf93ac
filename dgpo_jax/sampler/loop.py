"""The compiled rollout: prefill, then nested ``lax.while_loop``s of decode / ingest steps.

Shapes: B rows, P padded prompt width, S = ``cache_len`` context slots, R = S - P response
slots (response slot r is KV slot P + r), C = ``ingest_chunk``, O = observation buffer width,
W = longest stop sequence, V vocabulary.

Every row is in one phase: GENERATING (it samples one token per step), INGESTING (it appends
up to C tokens of a pending observation or teacher prefix per step), AWAITING_HOST (its turn
ended) or DONE. A step runs the model once on ``[B, T]`` tokens: T = C while some row is
ingesting (generating rows put their one token in column 0 and keep decoding in the same
step), else T = 1. Rows whose turn ended are handed to the host in ONE ``io_callback`` (see
`host.py`); its observation becomes the row's pending tokens. Nothing is ever re-prefilled.

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
from dgpo_jax.models.qwen2 import KVCache, forward_with_cache, init_cache, lm_logits
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
    ingest_steps:    ``[]`` int32, of which steps with T = C.
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
    pending_is_prefix: Array  # [B] bool
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


def _coin_keys(row_keys: Array, turn: Array) -> Array:
    return jax.vmap(lambda k, t: jax.random.fold_in(jax.random.fold_in(k, 1), t))(row_keys, turn)


def _teacher_turn(has_teacher: bool, row_keys: Array, turn: Array, prob: Array) -> Array:
    """``[B]`` bool: the teacher writes turn ``turn [B]`` of each row (probability ``prob``)."""
    if not has_teacher:
        return jnp.zeros(turn.shape, bool)
    u = jax.vmap(jax.random.uniform)(_coin_keys(row_keys, turn))
    return u < prob


def _run_model(model_cfg, params, ids, mask, cache, plan, prev_logits):
    hidden, cache = forward_with_cache(
        model_cfg, params, ids, cache, mask, plan, return_hidden=True
    )
    last, has = _last_real(hidden, mask)
    logits = lm_logits(model_cfg, params, last)
    return jnp.where(has[:, None], logits, prev_logits), _cache_constrain(plan, cache)


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
            f"teacher vocab {teacher_config.vocab_size} != student vocab "
            f"{model_config.vocab_size}"
        )
    chunk = cfg.ingest_chunk
    resp_slots = cfg.cache_len - prompt_width
    buf_width = resp_slots + chunk  # spare columns: a masked chunk never clamps its write
    obs_width = cfg.obs_buffer_length
    window_width = cfg.stop_window
    pad = cfg.pad_token_id

    base_key = jax.random.key(seed)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(row_ids)
    sample_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(row_keys)

    # --- prefill (the cache has C spare slots for the same reason as the buffers) ----------------
    prompt_mask = prompt_mask & active[:, None]
    cache_slots = cfg.cache_len + chunk

    def prefill(mcfg, p):
        cache = _cache_constrain(
            plan, init_cache(mcfg, batch, cache_slots, p["embed_tokens"].dtype)
        )
        empty = jnp.zeros((batch, mcfg.vocab_size), jnp.float32)
        return _run_model(mcfg, p, prompt_ids, prompt_mask, cache, plan, empty)

    next_logits, cache = prefill(model_config, params)
    teacher_next_logits, teacher_cache = (
        prefill(teacher_config, teacher_params) if has_teacher else (None, None)
    )

    has_prefix = prefix_len > 0
    pending = jnp.full((batch, obs_width + chunk), pad, jnp.int32)
    pending = pending.at[:, : prefix_ids.shape[1]].set(prefix_ids.astype(jnp.int32))
    zeros = jnp.zeros((batch,), jnp.int32)
    state = _State(
        step=jnp.int32(0),
        ingest_steps=jnp.int32(0),
        phase=jnp.where(active, jnp.where(has_prefix, C.INGESTING, C.GENERATING), C.DONE),
        finish=jnp.where(active, C.RUNNING, C.PROMPT_TOO_LONG).astype(jnp.int32),
        cache=cache,
        teacher_cache=teacher_cache,
        next_logits=next_logits,
        teacher_next_logits=teacher_next_logits,
        tokens=jnp.full((batch, buf_width), pad, jnp.int32),
        loss_mask=jnp.zeros((batch, buf_width), bool),
        teacher_mask=jnp.zeros((batch, buf_width), bool),
        logprobs=jnp.zeros((batch, buf_width), jnp.float32),
        turn_ids=jnp.full((batch, buf_width), -1, jnp.int32),
        resp_len=zeros,
        turn_start=zeros,
        turn_gen=zeros,
        total_gen=zeros,
        turn=zeros,
        searches=zeros,
        window=jnp.zeros((batch, window_width), jnp.int32),
        pending=pending,
        pending_len=jnp.where(active, prefix_len, 0).astype(jnp.int32),
        pending_pos=zeros,
        pending_is_prefix=has_prefix,
        teacher_writes=_teacher_turn(has_teacher, row_keys, zeros, teacher_turn_prob),
        ended_on_eos=jnp.zeros((batch,), bool),
    )
    state = _batch_constrain(plan, state.replace(cache=None, teacher_cache=None)).replace(
        cache=cache, teacher_cache=teacher_cache
    )

    eos_ids = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)

    def advance(s: _State, width: int) -> _State:
        """One model step on ``[B, width]`` tokens: generating rows decode one token (column 0),
        ingesting rows append up to `width` pending tokens. Rows that end a turn await the host."""
        gen = s.phase == C.GENERATING
        ing = s.phase == C.INGESTING
        cols = jnp.arange(width, dtype=jnp.int32)[None]
        # 1. Sample the next token of every generating row (from the writer of its turn).
        keys = jax.vmap(jax.random.fold_in)(sample_keys, s.resp_len)
        token, logprob = sample_tokens(cfg, s.next_logits, keys)
        if has_teacher:
            t_token, t_logprob = sample_tokens(cfg, s.teacher_next_logits, keys)
            token = jnp.where(s.teacher_writes, t_token, token)
            logprob = jnp.where(s.teacher_writes, t_logprob, logprob)
        # 2. This step's tokens: one sampled token (column 0) or a chunk of pending tokens.
        chunk_ids = jax.vmap(lambda p, i: jax.lax.dynamic_slice(p, (i,), (width,)))(
            s.pending, s.pending_pos
        )
        chunk_mask = ing[:, None] & (s.pending_pos[:, None] + cols < s.pending_len[:, None])
        gen_col = gen[:, None] & (cols == 0)
        mask = gen_col | chunk_mask
        ids = jnp.where(gen_col, token[:, None], jnp.where(chunk_mask, chunk_ids, pad))
        # 3. Both models see every token.
        next_logits, cache = _run_model(
            model_config, params, ids, mask, s.cache, plan, s.next_logits
        )
        teacher_next_logits, teacher_cache = s.teacher_next_logits, s.teacher_cache
        if has_teacher:
            teacher_next_logits, teacher_cache = _run_model(
                teacher_config,
                teacher_params,
                ids,
                mask,
                s.teacher_cache,
                plan,
                s.teacher_next_logits,
            )
        # 4. Record the tokens in the response buffers.
        by_teacher = gen_col & s.teacher_writes[:, None] | chunk_mask & s.pending_is_prefix[:, None]
        token_turn = jnp.where(
            gen_col | s.pending_is_prefix[:, None], s.turn[:, None], s.turn[:, None] - 1
        )
        resp_len = s.resp_len + jnp.sum(mask, axis=1, dtype=jnp.int32)
        # 5. Generating rows: stops and budgets.
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
        # Ingesting rows: a fully ingested observation starts the next generated turn.
        pending_pos = s.pending_pos + jnp.sum(chunk_mask, axis=1, dtype=jnp.int32)
        ingested = ing & (pending_pos >= s.pending_len)
        phase = jnp.where(ingested, C.GENERATING, s.phase)
        phase = jnp.where(turn_end, C.AWAITING_HOST, phase)
        phase = jnp.where(ends_mid_turn, C.DONE, phase)
        return s.replace(
            step=s.step + 1,
            ingest_steps=s.ingest_steps + (width > 1),
            phase=phase,
            finish=jnp.where(ends_mid_turn, mid_turn_reason, s.finish),
            cache=cache,
            teacher_cache=teacher_cache,
            next_logits=next_logits,
            teacher_next_logits=teacher_next_logits,
            tokens=_write(s.tokens, ids, s.resp_len),
            loss_mask=_write(s.loss_mask, gen_col & ~s.teacher_writes[:, None], s.resp_len),
            teacher_mask=_write(s.teacher_mask, by_teacher, s.resp_len),
            logprobs=_write(s.logprobs, jnp.where(gen_col, logprob[:, None], 0.0), s.resp_len),
            turn_ids=_write(s.turn_ids, jnp.where(mask, token_turn, -1), s.resp_len),
            resp_len=resp_len,
            turn_gen=turn_gen,
            total_gen=total_gen,
            window=window,
            ended_on_eos=jnp.where(turn_end, hit_eos, s.ended_on_eos),
            pending_pos=pending_pos,
            pending_is_prefix=s.pending_is_prefix & ~ingested,
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
            pending_is_prefix=s.pending_is_prefix & ~next_turn,
            teacher_writes=jnp.where(
                waiting,
                _teacher_turn(has_teacher, row_keys, turn, teacher_turn_prob),
                s.teacher_writes,
            ),
        )

    # Every step moves each unfinished row forward by at least one slot (or ends it).
    step_limit = 2 * resp_slots + 4

    def under_limit(s):
        return s.step < step_limit

    def any_phase(s, phase):
        return jnp.any(s.phase == phase)

    def movable(x):
        if chunk == 1:  # T = 1 steps also ingest, one token per row per step
            return any_phase(x, C.GENERATING) | any_phase(x, C.INGESTING)
        return any_phase(x, C.GENERATING) & ~any_phase(x, C.INGESTING)

    def body(s):
        # Inner loops instead of a lax.cond per step: a conditional inside the loop would pass
        # the whole state (the KV caches) through its branches, which XLA copies every step.
        # Decode (T = 1) until a row ends its turn or has tokens to ingest ...
        s = jax.lax.while_loop(
            lambda x: under_limit(x) & movable(x) & ~any_phase(x, C.AWAITING_HOST),
            lambda x: advance(x, 1),
            s,
        )
        # ... then one host call for all rows whose turn ended (a no-op call when none did) ...
        s = resolve_turns(s)
        if chunk == 1:
            return s
        # ... then chunked steps while rows ingest (generating rows decode in the same steps).
        return jax.lax.while_loop(
            lambda x: under_limit(x) & any_phase(x, C.INGESTING) & ~any_phase(x, C.AWAITING_HOST),
            lambda x: advance(x, chunk),
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
