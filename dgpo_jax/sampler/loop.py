"""The compiled rollout: a static `SamplerLoop` whose parts (prefill, decode step, ingest step,
host wave) make one program of nested ``lax.while_loop``s.

Shapes: B rows, P padded prompt width, S = ``cache_len`` context slots, R = S - P response
slots (response slot r is KV slot P + r), C = ``ingest_chunk``, O = observation buffer width,
Pf = prefix buffer width, Tw = turn width (the most tokens one turn's text can have), W =
longest stop sequence, V vocabulary.

Every row is in one phase: GENERATING (it samples one token per decode step), AWAITING_HOST
(its turn ended; its cache is kept while the other rows go on), INGESTING (its observation is
being appended) or DONE. The program is::

    prefill: the prompt, then the teacher prefixes, in each model's cache
    while some row is not done:
        decode steps on the generating rows until a host wave is due
        host wave: ONE io_callback for every waiting row (its last turn's tokens only)
        ingest steps: every observation of the wave appended, [M, C] per step

A wave is due when `SamplerConfig.wave_fraction` of the live rows wait, when no row
generates, or `wave_max_wait` decode steps after the first of them began waiting (both are
passed traced: tuning them does not recompile). A rollout
therefore makes few host calls (about one per turn level) instead of one per turn end.

Two decode paths (`SamplerConfig.decode_path`, docs/sampler.md):

* ``cpu``: layers unrolled from `split_layers` weights; a step runs on the rows that need it,
  gathered into compiled sub-batches (B, B/2, ..., 4, for decoding and for ingestion); each
  layer picks its key window with a ``lax.switch``. These were measured on XLA:CPU, where work
  follows the rows and slots in use.
* ``accelerator``: every step runs on all B rows with a mask (no gather of rows out of a
  batch-sharded cache, so no collectives); one key window per step, chosen by running one loop
  per static window width (the context only grows, so the loops run from narrow to wide). On a
  GPU the layers are split and each has its own KV cache array (XLA:GPU copies a layer's slice
  of stacked arrays before each dot); elsewhere the stacked layers run in one scan.
  `SamplerConfig.decode_attention="pallas"` attends the one-token steps through JAX's Pallas
  GPU decode kernel instead (each row's slots only; no window), ``"fused"`` through one Triton
  kernel a layer that also rotates and writes the new key and value.

The optional teacher (Guided-OPD) has its own KV cache and sees every token the student sees
(`SamplerLoop.step_models` steps both); it writes the turns whose coin (per row and turn,
from the row's RNG) came up.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.experimental import io_callback
from jax.sharding import PartitionSpec

from dgpo_jax.models.config import Qwen2Config
from dgpo_jax.models.qwen2 import (
    KVCache,
    compile_platform,
    forward_with_cache,
    init_cache,
    lm_logits,
    span_buckets,
    split_cache,
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
    steps:           ``[]`` int32, model steps run (decode and ingest).
    ingest_steps:    ``[]`` int32, of which ingest steps (``[M, C]`` each).
    waves:           ``[]`` int32, host calls made.
    decode_rows:     ``[]`` int32, rows computed over all decode steps (M summed).
    ingest_rows:     ``[]`` int32, rows computed over all ingest steps (M summed; x C tokens).
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
    waves: Array
    decode_rows: Array
    ingest_rows: Array


@flax.struct.dataclass
class _Weights:
    params: Any
    teacher: Any  # None without a teacher


@flax.struct.dataclass
class _Next:
    """Each row's next token, drawn as soon as its model step made the logits (with the row's
    key at the slot the token will take), and its log-probability under the sampling
    distribution: the loop carries ``[B]`` draws, not ``[B, V]`` logits."""

    token: Array  # [B] int32
    logprob: Array  # [B] float32


@flax.struct.dataclass
class _State:
    step: Array
    ingest_steps: Array
    waves: Array
    decode_rows: Array
    ingest_rows: Array
    wait_since: Array  # [] step at which the oldest waiting row began waiting
    phase: Array  # [B]
    finish: Array  # [B]
    cache: KVCache
    teacher_cache: Any  # KVCache | None
    next: _Next
    teacher_next: Any  # _Next | None
    tokens: Array  # [B, buf_width]
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


# ----------------------------------------------------------------------------------------------
# Small array helpers
# ----------------------------------------------------------------------------------------------
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

    def kv(x):  # stacked [L, ...] or one [1, ...] array per layer (split_cache)
        if isinstance(x, tuple):
            return tuple(plan.constrain(layer, (None,) + names[1:]) for layer in x)
        return plan.constrain(x, names)

    return cache.replace(
        k=kv(cache.k),
        v=kv(cache.v),
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


def _write(
    buf: Array, values: Array, start: Array, rows: Array | None = None, select: bool = False
) -> Array:
    """buf ``[B, N]``; values ``[M, T]`` written from per-row column ``start [M]`` into rows
    `rows [M]` (None: all B rows, M = B; an index >= B is dropped). A column past ``N - T`` is
    clamped into the buffer, as dynamic_update_slice clamps it."""
    values = values.astype(buf.dtype)
    if rows is None and (values.shape[1] == 1 or select):
        # All rows, one column a row (a decode step) or, with ``select``, several (an ingest
        # step on TPUs): a select over the buffer, one compare a column, where a per-row update
        # is one that the TPU compiler runs as a loop over the rows (B serial steps a buffer,
        # five buffers a step; docs/sampler.md). Elsewhere several columns keep the update
        # (a select costs B x N x T compares; XLA:CPU and XLA:GPU run the update in place).
        width = values.shape[1]
        first = jnp.clip(start, 0, buf.shape[1] - width)[:, None]
        col = jnp.arange(buf.shape[1])[None]
        for t in range(width):
            buf = jnp.where(col == first + t, values[:, t : t + 1], buf)
        return buf
    if rows is None:
        return jax.vmap(lambda b, v, s: jax.lax.dynamic_update_slice(b, v, (s,)))(
            buf, values, start
        )
    cols = start[:, None] + jnp.arange(values.shape[1], dtype=jnp.int32)[None]
    return buf.at[rows[:, None], cols].set(values, mode="drop")


def _read_rows(buf: Array, start: Array, width: int) -> Array:
    """``[B, width]``: columns ``start [B] ...`` of each row of buf ``[B, N]`` (N >= start +
    width, so the slice is never clamped)."""
    return jax.vmap(lambda b, s: jax.lax.dynamic_slice(b, (s,), (width,)))(buf, start)


def _scatter(full: Array, values: Array, rows: Array | None) -> Array:
    """Rows `rows` of ``full [B, ...]`` set to ``values [M, ...]`` (None: values is all B)."""
    return values if rows is None else full.at[rows].set(values, mode="drop")


# The cpu path's smallest sub-batch: each size adds a decode and an ingest loop to the program,
# and the sizes below 4 made the rollout compile ~1.6x longer without making it faster
# (docs/sampler.md, "Known limits").
CPU_SMALLEST_SUB_BATCH = 4


def sub_batch_sizes(
    batch: int, factor: int = 2, smallest: int = CPU_SMALLEST_SUB_BATCH
) -> tuple[int, ...]:
    """Compiled sub-batch sizes of the cpu path: B, B/factor, B/factor^2, ... down to
    `smallest` (just B when B is not larger)."""
    sizes = [batch]
    while sizes[-1] > smallest:
        sizes.append(max(sizes[-1] // factor, smallest))
    return tuple(sizes)


def _coin_keys(row_keys: Array, turn: Array) -> Array:
    return jax.vmap(lambda k, t: jax.random.fold_in(jax.random.fold_in(k, 1), t))(row_keys, turn)


def _teacher_turn(has_teacher: bool, row_keys: Array, turn: Array, prob: Array) -> Array:
    """``[B]`` bool: the teacher writes turn ``turn [B]`` of each row (probability ``prob``)."""
    if not has_teacher:
        return jnp.zeros(turn.shape, bool)
    u = jax.vmap(jax.random.uniform)(_coin_keys(row_keys, turn))
    return u < prob


def _run_model(
    model_cfg, params, ids, mask, cache, plan, rows=None, window=None, kernel="xla", chunk="auto"
):
    """One model step on ``ids [M, T]`` for cache rows `rows` (None: all, M = B). Returns the
    next-token logits after each stepped row's last real token ``[M, V]``, whether the row had
    one ``[M]``, and the cache. `window`: a static key window; `kernel`, `chunk`: the one-token
    and the several-token attention (see `forward_with_cache`)."""
    hidden, cache = forward_with_cache(
        model_cfg,
        params,
        ids,
        cache,
        mask,
        plan,
        return_hidden=True,
        rows=rows,
        window=window,
        decode_kernel=kernel,
        chunk_kernel=chunk,
    )
    last, has = _last_real(hidden, mask)
    return lm_logits(model_cfg, params, last), has, _cache_constrain(plan, cache)


def _sample_keys(row_keys: Array) -> Array:
    """Each row's sampling key ``[B]``; a token's key folds in the slot it takes."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 0))(row_keys)


def _call_host(host_id, args, obs_width):
    """The host call for the rows of ``args`` = (row index, waiting, turn tokens, turn length,
    search allowed), all ``[b, ...]``; skipped (zeros) when none of them waits. Returns
    (action ``[b]``, observation ids ``[b, O]``, observation length ``[b]``)."""
    rows = args[0].shape[0]
    shapes = (
        jax.ShapeDtypeStruct((rows,), jnp.int32),
        jax.ShapeDtypeStruct((rows, obs_width), jnp.int32),
        jax.ShapeDtypeStruct((rows,), jnp.int32),
    )
    return jax.lax.cond(
        jnp.any(args[1]),
        lambda a: io_callback(host_callback, shapes, host_id, *a),
        lambda a: tuple(jnp.zeros(x.shape, x.dtype) for x in shapes),
        args,
    )


def resolve_host_calls(config: SamplerConfig, plan=None) -> str:
    """``single`` (one host call per wave, on the process of the first device, for the global
    batch) or ``per_shard`` (each batch shard calls the host of the process that holds it, so
    every process searches for its own rows against its own retriever): the config's choice, or
    for ``auto`` per_shard exactly when the plan spans several processes."""
    if config.host_calls != "auto":
        return config.host_calls
    return "per_shard" if plan_spans_processes(plan) else "single"


def plan_spans_processes(plan) -> bool:
    """The plan's mesh holds devices of more than one JAX process (False without a plan)."""
    return plan is not None and len({d.process_index for d in plan.mesh.devices.flat}) > 1


def resolve_decode_layers(
    config: SamplerConfig, path: str, plan=None, platform: str | None = None
) -> str:
    """``split`` or ``scan``: the config's choice, or for ``auto`` split on the cpu path (XLA:CPU
    copies a layer's weights out of the stacked arrays every step) and on a GPU (XLA:GPU copies
    a layer's slice of the stacked weights and KV cache before each dot: the 0.5B decode step
    on an H200 took 4.66 ms scanned, 2.52 ms split with a per-layer cache, docs/gpu.md), else
    scan (the accelerator path forced on CPU, which compiles faster scanned; TPUs, where in
    libtpu's compile of the sampler split layers copy each layer's cache for every key window
    narrower than the cache, docs/scaleout.md). Split layers also split the KV cache into one
    array per layer. ``platform``:
    the platform to decide for (default: the plan's, `compile_platform`), e.g. the GPUs that a
    memory plan's fake CPU devices stand for."""
    if config.decode_layers != "auto":
        return config.decode_layers
    if config.decode_attention != "xla":  # the kernels read a per-layer cache in place
        return "split"
    return "split" if path == "cpu" or (platform or compile_platform(plan)) == "gpu" else "scan"


def resolve_decode_path(config: SamplerConfig, plan=None) -> str:
    """``cpu`` or ``accelerator``: the config's choice, or for ``auto`` the platform of the
    plan's devices (or JAX's default backend without a plan)."""
    if config.decode_path != "auto":
        return config.decode_path
    return "cpu" if compile_platform(plan) == "cpu" else "accelerator"


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplerLoop:
    """Everything static about one compiled rollout; its methods are the program's parts."""

    model: Qwen2Config
    config: SamplerConfig
    plan: Any
    teacher: Qwen2Config | None
    batch: int
    prompt_width: int
    prefix_width: int
    path: str  # "cpu" | "accelerator"
    host_calls: str = "single"  # "single" | "per_shard" (see `resolve_host_calls`)
    narrow_windows: bool = False  # key windows up to a third of the cache only (`windows`)
    select_writes: bool = False  # an ingest step's output columns by a select (`_write`)

    def __post_init__(self):
        cfg = self.config
        if self.prompt_width >= cfg.cache_len:
            raise ValueError(
                f"prompt width {self.prompt_width} leaves no room in cache_len {cfg.cache_len}"
            )
        if self.teacher is not None and self.teacher.vocab_size != self.model.vocab_size:
            raise ValueError(
                f"teacher vocab {self.teacher.vocab_size} != student vocab {self.model.vocab_size}"
            )
        if self.has_prefixes and self.prefix_width >= self.resp_slots:
            raise ValueError(
                f"prefix width {self.prefix_width} leaves no room to generate after the prompt "
                f"(width {self.prompt_width}) in cache_len {cfg.cache_len}"
            )
        if self.path not in ("cpu", "accelerator"):
            raise ValueError(f"decode path {self.path!r}: expected 'cpu' or 'accelerator'")
        if cfg.decode_attention != "xla" and self.path != "accelerator":
            raise ValueError(
                f"SamplerConfig.decode_attention={cfg.decode_attention!r} runs on the "
                f"accelerator path (all rows every step); this rollout's decode path is "
                f"{self.path!r}"
            )
        if cfg.chunk_attention == "pallas" and self.path != "accelerator":
            raise ValueError(
                "SamplerConfig.chunk_attention='pallas' runs on the accelerator path (all rows "
                f"every step); this rollout's decode path is {self.path!r}"
            )
        if self.host_calls == "per_shard" and self.plan is None:
            raise ValueError("host_calls='per_shard' needs a sharding plan")

    # --- static sizes ---------------------------------------------------------------------
    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None

    @property
    def has_prefixes(self) -> bool:
        return self.config.max_prefix_length > 0

    @property
    def resp_slots(self) -> int:
        return self.config.cache_len - self.prompt_width

    @property
    def turn_width(self) -> int:
        """Most tokens of one turn's text (turn 0 starts with the teacher prefix)."""
        prefix = self.prefix_width if self.has_prefixes else 0
        return self.config.max_new_tokens_per_turn + prefix

    @property
    def buf_width(self) -> int:
        """Response buffer columns: R plus spare ones, so no write or read is ever clamped."""
        spare = max(self.config.ingest_chunk, self.prefix_width, self.turn_width)
        return self.resp_slots + spare

    @property
    def step_limit(self) -> int:
        """Every model step moves some row forward by at least one slot (or ends it)."""
        return self.batch * (self.resp_slots + 1) + 4

    @property
    def windows(self) -> tuple[int, ...]:
        """Static key-window widths of the accelerator path: `span_buckets` of the cache, or
        with ``narrow_windows`` (a GPU with split layers) those up to a third of the cache and
        then the whole cache. XLA:GPU copies a window narrower than a layer's cache array
        before the dot reads it (docs/gpu.md): the copy reads and writes the window and the dot
        reads it again, three passes, against one pass over the whole cache without a window,
        so a window pays only below a third of the cache."""
        widths = span_buckets(self.config.cache_len)
        if self.narrow_windows:
            widths = tuple(w for w in widths[:-1] if 3 * w <= widths[-1]) + widths[-1:]
        return widths

    # --- models -----------------------------------------------------------------------------
    def step_models(
        self, w: _Weights, s: _State, ids, mask, keys, rows=None, window=None
    ) -> _State:
        """Both models (the teacher when there is one) see the same tokens ``ids [M, T]``; each
        then draws the next token of every stepped row that had a real token, with ``keys
        [M]`` (the rows' keys at the slot that token will take). A row keeps its draw until
        its next step, so the loop never carries ``[B, V]`` logits."""
        kernels = (self.config.decode_attention, self.config.chunk_attention)
        logits, has, cache = _run_model(
            self.model, w.params, ids, mask, s.cache, self.plan, rows, window, *kernels
        )
        s = s.replace(cache=cache, next=self._draw(s.next, logits, has, keys, rows))
        if self.has_teacher:
            logits, has, cache = _run_model(
                self.teacher,
                w.teacher,
                ids,
                mask,
                s.teacher_cache,
                self.plan,
                rows,
                window,
                *kernels,
            )
            s = s.replace(
                teacher_cache=cache,
                teacher_next=self._draw(s.teacher_next, logits, has, keys, rows),
            )
        return s

    def _draw(self, old: _Next, logits, has, keys, rows=None) -> _Next:
        """Draws from ``logits [M, V]`` for rows `rows` (None: all); rows without a real token
        this step (``has [M]`` False) keep their draw."""
        token, logprob = sample_tokens(self.config, logits, keys)
        if rows is None:
            return _Next(jnp.where(has, token, old.token), jnp.where(has, logprob, old.logprob))
        read = jnp.minimum(rows, self.batch - 1)
        token = jnp.where(has, token, old.token[read])
        logprob = jnp.where(has, logprob, old.logprob[read])
        return _Next(_scatter(old.token, token, rows), _scatter(old.logprob, logprob, rows))

    def _rows(self, selected: Array, size: int | None):
        """(rows ``[M]`` or None, read indices): the first `size` selected rows (index B:
        a dummy row), or all rows (None) when `size` is None or B."""
        if size is None or size == self.batch:
            return None, slice(None)
        rows = jnp.nonzero(selected, size=size, fill_value=self.batch)[0].astype(jnp.int32)
        return rows, jnp.minimum(rows, self.batch - 1)

    # --- prefill ----------------------------------------------------------------------------
    def prefill(self, w: _Weights, inputs: dict) -> _State:
        """The prompt, then the teacher prefixes, in both models' caches; the initial state."""
        cfg, batch, pad = self.config, self.batch, self.config.pad_token_id
        active = inputs["active"]
        prompt_mask = inputs["prompt_mask"] & active[:, None]
        prefix_len = jnp.where(active, inputs["prefix_len"], 0).astype(jnp.int32)
        prefix_mask = jnp.arange(self.prefix_width, dtype=jnp.int32)[None] < prefix_len[:, None]
        prefix_ids = jnp.where(prefix_mask, inputs["prefix_ids"].astype(jnp.int32), pad)
        resp_start = prefix_len if self.has_prefixes else jnp.zeros((batch,), jnp.int32)
        # The first draw takes each row's first response slot (after its prefix).
        first_keys = jax.vmap(jax.random.fold_in)(_sample_keys(inputs["row_keys"]), resp_start)

        def one_model(mcfg, p):
            # The cache has exactly cache_len slots: writes of masked columns past it are dropped.
            dtype = p["embed_tokens"].dtype
            cache = init_cache(mcfg, batch, cfg.cache_len, dtype)
            if isinstance(p["layers"], tuple):  # split layers: a cache array per layer
                cache = split_cache(cache)
            cache = _cache_constrain(self.plan, cache)
            # Static key windows: the prompt sees its own P slots, the prefixes P + Pf (not a
            # switch up to the whole cache, whose widest branch would set the temporaries).
            logits, has, cache = _run_model(
                mcfg,
                p,
                inputs["prompt_ids"],
                prompt_mask,
                cache,
                self.plan,
                window=self.prompt_width,
                chunk=cfg.chunk_attention,
            )
            logits = jnp.where(has[:, None], logits, 0.0)  # a row with no prompt (inactive)
            if self.has_prefixes:
                window = min(self.prompt_width + self.prefix_width, cfg.cache_len)
                new, has, cache = _run_model(
                    mcfg,
                    p,
                    prefix_ids,
                    prefix_mask,
                    cache,
                    self.plan,
                    window=window,
                    chunk=cfg.chunk_attention,
                )
                logits = jnp.where(has[:, None], new, logits)
            return _Next(*sample_tokens(cfg, logits, first_keys)), cache

        first, cache = one_model(self.model, w.params)
        teacher_first, teacher_cache = (
            one_model(self.teacher, w.teacher) if self.has_teacher else (None, None)
        )

        def response_buffer(default, dtype, prefix_value=None):
            """``[B, buf_width]`` of `default`; a prefix (the start of turn 0, written by the
            teacher) fills its row's first prefix_len columns with `prefix_value`."""
            buf = jnp.full((batch, self.buf_width), default, dtype)
            if not self.has_prefixes or prefix_value is None:
                return buf
            values = jnp.where(prefix_mask, prefix_value, default).astype(dtype)
            return buf.at[:, : self.prefix_width].set(values)

        zeros = jnp.zeros((batch,), jnp.int32)
        state = _State(
            step=jnp.int32(0),
            ingest_steps=jnp.int32(0),
            waves=jnp.int32(0),
            decode_rows=jnp.int32(0),
            ingest_rows=jnp.int32(0),
            wait_since=jnp.int32(0),
            phase=jnp.where(active, C.GENERATING, C.DONE),
            finish=jnp.where(active, C.RUNNING, C.PROMPT_TOO_LONG).astype(jnp.int32),
            cache=None,
            teacher_cache=None,
            next=first,
            teacher_next=teacher_first,
            tokens=response_buffer(pad, jnp.int32, prefix_ids),
            loss_mask=response_buffer(False, bool),
            teacher_mask=response_buffer(False, bool, True),
            logprobs=response_buffer(0.0, jnp.float32),
            turn_ids=response_buffer(-1, jnp.int32, 0),
            resp_len=resp_start,
            turn_start=zeros,
            turn_gen=zeros,
            total_gen=zeros,
            turn=zeros,
            searches=zeros,
            window=jnp.zeros((batch, cfg.stop_window), jnp.int32),
            pending=jnp.full((batch, cfg.obs_buffer_length + cfg.ingest_chunk), pad, jnp.int32),
            pending_len=zeros,
            pending_pos=zeros,
            teacher_writes=self.teacher_coin(inputs["row_keys"], zeros, inputs["teacher_prob"]),
            ended_on_eos=jnp.zeros((batch,), bool),
        )
        return _batch_constrain(self.plan, state).replace(cache=cache, teacher_cache=teacher_cache)

    def teacher_coin(self, row_keys, turn, prob):
        return _teacher_turn(self.has_teacher, row_keys, turn, prob)

    # --- decode -----------------------------------------------------------------------------
    def decode_step(
        self, w: _Weights, s: _State, sample_keys, rows_per_step=None, window=None
    ) -> _State:
        """One ``[M, 1]`` model step: every generating row (at most M of them on the cpu path)
        samples its next token from the writer of its turn and appends it. Rows that end a
        turn await the host; the others go on."""
        cfg, batch, pad = self.config, self.batch, self.config.pad_token_id
        gen = s.phase == C.GENERATING
        rows, read = self._rows(gen, rows_per_step)
        # The tokens were drawn when the rows' last step made their logits (`step_models`).
        token, logprob = s.next.token[read], s.next.logprob[read]
        if self.has_teacher:
            token = jnp.where(s.teacher_writes[read], s.teacher_next.token[read], token)
            logprob = jnp.where(s.teacher_writes[read], s.teacher_next.logprob[read], logprob)
        token = _scatter(jnp.full((batch,), pad, token.dtype), token, rows)
        logprob = _scatter(jnp.zeros((batch,), logprob.dtype), logprob, rows)
        ids = jnp.where(gen, token, pad)[:, None]
        mask = gen[:, None]
        step_ids, step_mask = (
            (ids, mask) if rows is None else (ids[read], mask[read] & (rows < batch)[:, None])
        )
        resp_len = s.resp_len + gen
        keys = jax.vmap(jax.random.fold_in)(sample_keys[read], resp_len[read])
        s = self.step_models(w, s, step_ids, step_mask, keys, rows, window)

        window_tokens = push_window(s.window, token, gen)
        turn_gen = s.turn_gen + gen
        total_gen = s.total_gen + gen
        eos_ids = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
        hit_eos = gen & jnp.any(token[:, None] == eos_ids[None], axis=1)
        stopped = gen & (
            ends_with_any(window_tokens, turn_gen, cfg.search_stops)
            | ends_with_any(window_tokens, turn_gen, cfg.answer_stops)
            | hit_eos
        )
        turn_end = stopped | (gen & (turn_gen >= cfg.max_new_tokens_per_turn))
        # A row that did not end its turn may still run out of tokens or room for the next one.
        mid_turn_reason = jnp.select(
            [total_gen >= cfg.max_new_tokens, resp_len >= self.resp_slots],
            [C.MAX_TOKENS, C.CONTEXT_FULL],
            C.RUNNING,
        )
        ends_mid_turn = gen & ~turn_end & (mid_turn_reason != C.RUNNING)
        phase = jnp.where(turn_end, C.AWAITING_HOST, s.phase)
        phase = jnp.where(ends_mid_turn, C.DONE, phase)
        first_waiting = ~jnp.any(s.phase == C.AWAITING_HOST) & jnp.any(turn_end)
        writes = s.teacher_writes[:, None]
        # (Rows not generating write their buffers' defaults at resp_len, past their end.)
        return s.replace(
            step=s.step + 1,
            decode_rows=s.decode_rows + (batch if rows is None else rows_per_step),
            wait_since=jnp.where(first_waiting, s.step + 1, s.wait_since),
            phase=phase,
            finish=jnp.where(ends_mid_turn, mid_turn_reason, s.finish),
            tokens=_write(s.tokens, ids, s.resp_len),
            loss_mask=_write(s.loss_mask, mask & ~writes, s.resp_len),
            teacher_mask=_write(s.teacher_mask, mask & writes, s.resp_len),
            logprobs=_write(s.logprobs, jnp.where(mask, logprob[:, None], 0.0), s.resp_len),
            turn_ids=_write(s.turn_ids, jnp.where(mask, s.turn[:, None], -1), s.resp_len),
            resp_len=resp_len,
            turn_gen=turn_gen,
            total_gen=total_gen,
            window=window_tokens,
            ended_on_eos=jnp.where(turn_end, hit_eos, s.ended_on_eos),
        )

    # --- ingest -----------------------------------------------------------------------------
    def ingest_step(
        self, w: _Weights, s: _State, sample_keys, rows_per_step=None, window=None
    ) -> _State:
        """One ``[M, C]`` model step: every ingesting row (at most M of them on the cpu path)
        appends its next C pending observation tokens; a row whose observation is complete
        starts its next turn."""
        chunk, batch, pad = self.config.ingest_chunk, self.batch, self.config.pad_token_id
        ingesting = s.phase == C.INGESTING
        rows, read = self._rows(ingesting, rows_per_step)
        live = ingesting[read] if rows is None else ingesting[read] & (rows < batch)
        start, length = s.pending_pos[read], s.pending_len[read]
        cols = start[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None]  # [M, C]
        mask = live[:, None] & (cols < length[:, None])
        ids = jnp.where(mask, jnp.take_along_axis(s.pending[read], cols, axis=1), pad)
        count = jnp.sum(mask, axis=1, dtype=jnp.int32)
        at = s.resp_len[read]
        keys = jax.vmap(jax.random.fold_in)(sample_keys[read], at + count)
        s = self.step_models(w, s, ids, mask, keys, rows, window)

        turn = s.turn[read]
        complete = live & (start + count >= length)
        phase = jnp.where(complete, C.GENERATING, s.phase[read])
        no = jnp.zeros(mask.shape, bool)
        write = functools.partial(_write, start=at, rows=rows, select=self.select_writes)
        return s.replace(
            step=s.step + 1,
            ingest_steps=s.ingest_steps + 1,
            ingest_rows=s.ingest_rows + (batch if rows is None else rows_per_step),
            phase=_scatter(s.phase, phase, rows),
            tokens=write(s.tokens, ids),
            loss_mask=write(s.loss_mask, no),
            teacher_mask=write(s.teacher_mask, no),
            logprobs=write(s.logprobs, jnp.zeros(mask.shape, jnp.float32)),
            # An observation belongs to the turn whose action produced it.
            turn_ids=write(s.turn_ids, jnp.where(mask, turn[:, None] - 1, -1)),
            resp_len=_scatter(s.resp_len, at + count, rows),
            pending_pos=_scatter(s.pending_pos, start + count, rows),
        )

    # --- host wave --------------------------------------------------------------------------
    def wave_due(self, s: _State, fraction: Array, max_wait: Array) -> Array:
        """A host call is due: some row waits, and ``fraction`` of the live rows wait, or none
        generates, or the oldest waiting row has waited ``max_wait`` (> 0) decode steps.
        (Traced values: changing the wave policy does not recompile.)"""
        waiting = jnp.sum(s.phase == C.AWAITING_HOST)
        generating = jnp.sum(s.phase == C.GENERATING)
        due = (generating == 0) | (waiting >= fraction * (waiting + generating))
        due = due | ((max_wait > 0) & (s.step - s.wait_since >= max_wait))
        return (waiting > 0) & due

    def host_wave(self, s: _State, host_id) -> _State:
        """ONE host call for every waiting row: it gets each row's last turn (``[B, Tw]``
        tokens and lengths, not the response buffer), parses it, searches for all of them in
        one batch and returns the observations; each row then finishes or starts ingesting."""
        cfg, batch, pad = self.config, self.batch, self.config.pad_token_id
        obs_width = cfg.obs_buffer_length
        waiting = s.phase == C.AWAITING_HOST
        allowed = s.turn < cfg.max_turns
        turn_len = jnp.where(waiting, s.resp_len - s.turn_start, 0)
        turn_tokens = _read_rows(s.tokens, s.turn_start, self.turn_width)
        turn_tokens = jnp.where(
            jnp.arange(self.turn_width)[None] < turn_len[:, None], turn_tokens, pad
        )
        args = (jnp.arange(batch, dtype=jnp.int32), waiting, turn_tokens, turn_len, allowed)
        if self.host_calls == "single":
            action, obs, obs_len = _call_host(host_id, args, obs_width)
        else:  # each batch shard calls the host of the process that holds it, for its rows
            spec = tuple(self.plan.spec(("batch",), (batch,)))
            specs = tuple(PartitionSpec(*spec, *([None] * (x.ndim - 1))) for x in args)
            action, obs, obs_len = jax.shard_map(
                lambda host, *local: _call_host(host, local, obs_width),
                mesh=self.plan.mesh,
                in_specs=(PartitionSpec(),) + specs,
                out_specs=(specs[0], specs[2], specs[0]),
                check_vma=False,
            )(host_id, *args)
        action, obs, obs_len = _batch_constrain(self.plan, (action, obs, obs_len))
        answered = waiting & (action == C.ACTION_ANSWER)
        errored = waiting & (action == C.ACTION_ERROR)
        eos_finish = (
            waiting & s.ended_on_eos & (action == C.ACTION_INVALID) & cfg.eos_ends_trajectory
        )
        final = waiting & ~allowed
        obs_fits = s.resp_len + obs_len < self.resp_slots  # the observation and one more token
        reason = jnp.select(
            [answered, errored, eos_finish, final, s.total_gen >= cfg.max_new_tokens, ~obs_fits],
            [C.ANSWER, C.RETRIEVER_ERROR, C.EOS, C.MAX_TURNS, C.MAX_TOKENS, C.CONTEXT_FULL],
            C.RUNNING,
        )
        ends_row = waiting & (reason != C.RUNNING)
        next_turn = waiting & ~ends_row
        turn = s.turn + waiting
        obs_padded = jnp.pad(obs, ((0, 0), (0, cfg.ingest_chunk)), constant_values=pad)
        return s.replace(
            waves=s.waves + jnp.any(waiting),
            phase=jnp.where(ends_row, C.DONE, jnp.where(next_turn, C.INGESTING, s.phase)),
            finish=jnp.where(ends_row, reason, s.finish),
            turn=turn,
            turn_start=jnp.where(next_turn, s.resp_len + obs_len, s.turn_start),
            turn_gen=jnp.where(waiting, 0, s.turn_gen),
            searches=s.searches + (waiting & (action == C.ACTION_SEARCH)),
            pending=jnp.where(next_turn[:, None], obs_padded, s.pending),
            pending_len=jnp.where(next_turn, obs_len, s.pending_len),
            pending_pos=jnp.where(next_turn, 0, s.pending_pos),
        )

    # --- phases -----------------------------------------------------------------------------
    def _under_limit(self, s: _State) -> Array:
        return s.step < self.step_limit

    def _context_needed(self, s: _State, phase: int, tokens: int) -> Array:
        """Cache slots the rows in `phase` see after appending `tokens` (at most S)."""
        ends = jnp.where(s.phase == phase, s.cache.end + tokens, 0)
        return jnp.minimum(jnp.max(ends), self.config.cache_len)

    def run_phase(self, s: _State, phase: int, step, tokens: int, sizes, until=None) -> _State:
        """Step the rows in `phase` until none is left in it (or `until(s)`): on the cpu path
        in sub-batches of `sizes` (their number only falls), on the accelerator path all rows
        at once, one loop per key window (the context only grows)."""

        def go(x):
            more = self._under_limit(x)
            return more if until is None else more & ~until(x)

        if self.path == "cpu":
            for size, smaller in zip(sizes, sizes[1:] + (0,)):
                s = jax.lax.while_loop(
                    lambda x, smaller=smaller: go(x) & (jnp.sum(x.phase == phase) > smaller),
                    functools.partial(step, rows_per_step=size),
                    s,
                )
            return s
        for width in self.windows:
            s = jax.lax.while_loop(
                lambda x, width=width: (
                    go(x)
                    & jnp.any(x.phase == phase)
                    & (self._context_needed(x, phase, tokens) <= width)
                ),
                functools.partial(step, window=width),
                s,
            )
        return s

    def run(self, w: _Weights, inputs: dict, host_id) -> RolloutArrays:
        """The whole rollout; ``inputs`` as `rollout_program` builds it."""
        sample_keys = _sample_keys(inputs["row_keys"])
        decode = functools.partial(self.decode_step, w, sample_keys=sample_keys)
        ingest = functools.partial(self.ingest_step, w, sample_keys=sample_keys)
        sizes = sub_batch_sizes(self.batch)  # of the cpu path, for decoding and ingestion
        wave_due = functools.partial(
            self.wave_due, fraction=inputs["wave_fraction"], max_wait=inputs["wave_max_wait"]
        )

        def cycle(s):
            # Inner loops rather than a lax.cond per step: a conditional inside the loop would
            # pass the whole state (the KV caches) through its branches, which XLA copies.
            s = self.run_phase(s, C.GENERATING, decode, 1, sizes, until=wave_due)
            s = self.host_wave(s, host_id)
            s = s.replace(
                teacher_writes=jnp.where(
                    s.phase == C.INGESTING,
                    self.teacher_coin(inputs["row_keys"], s.turn, inputs["teacher_prob"]),
                    s.teacher_writes,
                )
            )
            return self.run_phase(s, C.INGESTING, ingest, self.config.ingest_chunk, sizes)

        s = self.prefill(w, inputs)
        s = jax.lax.while_loop(
            lambda x: self._under_limit(x) & ~jnp.all(x.phase == C.DONE), cycle, s
        )
        r = self.resp_slots
        return RolloutArrays(
            tokens=s.tokens[:, :r],
            length=s.resp_len,
            loss_mask=s.loss_mask[:, :r],
            teacher_mask=s.teacher_mask[:, :r],
            logprobs=s.logprobs[:, :r],
            turn_ids=s.turn_ids[:, :r],
            num_turns=s.turn + (s.turn_gen > 0),  # a turn cut short by a budget counts too
            num_searches=s.searches,
            generated=s.total_gen,
            finish_reason=s.finish,
            steps=s.step,
            ingest_steps=s.ingest_steps,
            waves=s.waves,
            decode_rows=s.decode_rows,
            ingest_rows=s.ingest_rows,
        )


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
    wave_fraction: Array | None = None,
    wave_max_wait: Array | None = None,
) -> RolloutArrays:
    """The whole multi-turn rollout of a left-padded batch as one program (`SamplerLoop.run`).

    prompt_ids/prompt_mask ``[B, P]`` (left-padded), active ``[B]`` bool (False: the row
    finishes with prompt_too_long), prefix_ids ``[B, Pf]`` / prefix_len ``[B]`` (teacher
    prefixes, right-padded; length 0 = none), seed ``[]`` int, row_ids ``[B]`` int (RNG stream of
    each row), host_id ``[]`` int32 (the registered `RolloutHost`), teacher_turn_prob ``[]``
    float32 (a traced value: changing it does not recompile). teacher_config None: no teacher
    (teacher_params and teacher_turn_prob ignored). wave_fraction ``[]`` float32 / wave_max_wait
    ``[]`` int32: the host-wave policy, traced too (None: the config's values).
    """
    if wave_fraction is None:
        wave_fraction = jnp.float32(config.wave_fraction)
    if wave_max_wait is None:
        wave_max_wait = jnp.int32(config.wave_max_wait)
    batch, prompt_width = prompt_ids.shape
    path = resolve_decode_path(config, plan)
    layers = resolve_decode_layers(config, path, plan)
    loop = SamplerLoop(
        model=model_config,
        config=config,
        plan=plan,
        teacher=teacher_config,
        batch=batch,
        prompt_width=prompt_width,
        prefix_width=prefix_ids.shape[1],
        path=path,
        host_calls=resolve_host_calls(config, plan),
        narrow_windows=path == "accelerator"
        and layers == "split"
        and compile_platform(plan) == "gpu",
        select_writes=compile_platform(plan) == "tpu",
    )
    if layers == "split":
        # Per-layer weights, split once: a step never slices them out of the stacked arrays
        # (XLA:CPU copies such a slice, every weight, every step).
        params = split_layers(params)
        if teacher_config is not None:
            teacher_params = split_layers(teacher_params)
    weights = _Weights(params, teacher_params if teacher_config is not None else None)
    base_key = jax.random.key(seed)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "active": active,
        "prefix_ids": prefix_ids,
        "prefix_len": prefix_len,
        "row_keys": jax.vmap(lambda i: jax.random.fold_in(base_key, i))(row_ids),
        "teacher_prob": teacher_turn_prob,
        "wave_fraction": jnp.asarray(wave_fraction, jnp.float32),
        "wave_max_wait": jnp.asarray(wave_max_wait, jnp.int32),
    }
    return loop.run(weights, inputs, host_id)
