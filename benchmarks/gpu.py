"""The GPU benchmark: one command for a machine with one H100/H200 (under 8 minutes there).

    python benchmarks/gpu.py --out DIR          # on the GPU machine
    python benchmarks/gpu.py --quick            # tiny shapes on any backend (< 1 minute on CPU)

Stages, each writing ``DIR/<stage>.json`` as soon as it finishes (a run cut short keeps what it
measured), in this order:

1. ``update``: the fused DGPO update step of the Qwen2.5-0.5B student with the Qwen2.5-3B
   teacher forward inside (bfloat16 compute, float32 master weights and AdamW moments, a
   separate critic, full remat), on packed rows of a Search-R1-like length mix: real tokens/s
   and MFU against the chip's bfloat16 peak (FLOPs counted from the shapes: 6N per trained
   token for the policy and the critic, 2N per teacher token, plus attention within segments).
2. ``memory``: that step's compiled bytes (arguments + temporaries + outputs - aliased, what
   the memory plan adds up) against ``memory_stats()["peak_bytes_in_use"]`` after its first
   real step. It runs first in the process because that peak never goes down.
3. ``decode``: the 0.5B student's single-token KV-cache decode step at batch 256, in ms per
   step, against the HBM roofline (weights + the KV read once per step), in variants side by
   side (``--decode-variants``; the first is the headline): stacked layers in a scan with one
   static key window, the float32 multiply-and-reduce attention, a window switch per layer,
   split layers with the stacked cache or with a cache array per layer (the sampler's split
   layers), a window sliced out of a wider per-layer cache, JAX's Pallas GPU decode kernel
   (``decode_kernel="pallas"``), and XLA options (cuBLAS for every gemm; dynamic-slice
   fusion). ``--profile`` traces each variant once: device time per HLO
   op (``decode_<variant>_profile.json``) and the compiled HLO, in ``--out``.
   ``sampler``: `Sampler.generate` itself in plain decode, same shapes, both layer choices.
   ``ingest``: one observation-chunk step of every row (the sampler's ingest step), by XLA's
   attention and by the Pallas chunk kernel, timed side by side and compared.
4. ``attention``: the training/scoring attention kernels (xla, chunked, cudnn) at 2048 and 8704
   positions, forward + backward: milliseconds and the compiled program's temporary bytes.

Random weights from the model presets: nothing is downloaded. Besides this package (models,
learner, objectives, sampler) it imports jax, flax, optax, numpy, safetensors, pyarrow,
requests and tqdm (no ml_collections, grain or tokenizer), so it runs on a JAX GPU image such
as the H200 one of docs/gpu.md; `pip install -e . --no-deps` is not even needed when run from
the repository root. The last stdout line is one JSON object with
every stage's figures and the machine's name.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attention as attention_bench  # noqa: E402 (benchmarks/attention.py, beside this file)

from dgpo_jax.learner.optim import OptimConfig  # noqa: E402
from dgpo_jax.learner.packing import pack_trajectories  # noqa: E402
from dgpo_jax.learner.update_step import create_update_state, make_update_step  # noqa: E402
from dgpo_jax.models import (  # noqa: E402
    Qwen2Config,
    cast_params,
    forward_with_cache,
    get_preset,
    init_cache,
    init_params,
    qwen2,
)
from dgpo_jax.models.qwen2 import split_cache, split_layers  # noqa: E402
from dgpo_jax.objectives import get_objective  # noqa: E402
from dgpo_jax.sampler import Sampler, SamplerConfig  # noqa: E402
from dgpo_jax.sampler.loop import resolve_decode_layers, resolve_decode_path  # noqa: E402

# Dense bfloat16 peaks (datasheet, per chip) and HBM bandwidth, by device_kind substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
HBM_BYTES_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
TINY = Qwen2Config(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=None,
    eos_token_id=None,
)
TINY_TEACHER = TINY.replace(hidden_size=256, num_hidden_layers=3)


def _lookup(table: dict, kind: str):
    return next((v for k, v in table.items() if k in kind), None)


class Stages:
    """Writes each stage's figures to ``out/<stage>.json`` and keeps them for the summary."""

    def __init__(self, out: str, budget_s: float):
        self.out, self.budget_s, self.start = out, budget_s, time.perf_counter()
        self.results: dict[str, dict] = {}
        os.makedirs(out, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, name: str, fn, *args):
        if self.elapsed() > self.budget_s:
            result = {"skipped": f"time budget {self.budget_s:.0f} s spent"}
        else:
            t0 = time.perf_counter()
            try:
                result = dict(fn(*args), stage_s=round(time.perf_counter() - t0, 1))
            except Exception as e:  # a failed stage must not lose the others' figures
                result = {"error": f"{type(e).__name__}: {e}"[:2000]}
        self.record(name, result)

    def record(self, name: str, result: dict):
        self.results[name] = result
        with open(os.path.join(self.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"[gpu] {name}: {json.dumps(result)}", flush=True)


# ------------------------------------------------------------------------------ attention ---
def stage_attention(quick: bool, dtype) -> dict:
    backend = jax.default_backend()
    kernels = ["xla", "chunked"] + (["cudnn"] if backend == "gpu" else [])
    lengths = (256, 1024) if quick else (2048, 8704)
    rows = []
    for length in lengths:
        for kernel in kernels:
            rows.append(attention_bench.run(kernel, 1, length, 14, 2, 64, dtype, 512, 3, 60.0))
    return {"dtype": jnp.dtype(dtype).name, "heads": "14 q / 2 kv, head dim 64", "results": rows}


# --------------------------------------------------------------------------------- update ---
def length_mix(n: int, longest: int, rng: np.random.Generator) -> np.ndarray:
    """Search-R1-like trajectory lengths: a prompt of ~200 tokens and a skewed response (most a
    few hundred tokens, a tail to ~2000), capped at ``longest``."""
    lengths = 200 + rng.lognormal(mean=6.0, sigma=0.6, size=n).astype(np.int64)
    return np.minimum(lengths, longest)


def synthetic_rollouts(n: int, longest: int, vocab: int, seed: int = 0) -> dict:
    """An unpacked DGPO rollout batch: n trajectories right-padded to ``longest``; the first
    200 tokens are the prompt (no loss), half the trajectories are correct."""
    rng = np.random.default_rng(seed)
    lengths = length_mix(n, longest, rng)
    pos = np.arange(longest)[None]
    am = (pos < lengths[:, None]).astype(np.int32)
    lm = (am * (pos >= 200)).astype(np.float32)
    return {
        "input_ids": rng.integers(0, vocab, (n, longest)).astype(np.int32) * am,
        "attention_mask": am,
        "loss_mask": lm,
        "old_logprobs": (-rng.random((n, longest)) * 4 * lm).astype(np.float32),
        "rewards": (np.arange(n) % 2).astype(np.float32),
    }


def flops_trained(config: Qwen2Config, tokens: int, attended_pairs: float, backward: bool):
    """Matmul FLOPs: 2N per token forward (N = non-embedding weights + the LM head), attention
    scores and values 4 x layers x heads x head_dim per attended (query, key) pair; x3 with the
    backward pass."""
    head = config.vocab_size * config.hidden_size
    n = config.num_params() - head * (0 if config.tie_word_embeddings else 1)  # head counted once
    n = n - config.vocab_size * config.hidden_size + head  # embedding lookup is no matmul
    attn = 4 * config.num_hidden_layers * config.num_attention_heads * config.dim_per_head
    forward = 2 * n * tokens + attn * attended_pairs
    return forward * (3 if backward else 1)


def stage_update(quick: bool) -> dict:
    """The update step's throughput, and (``memory``) its compiled bytes against the device's
    measured peak after its first real step. It runs first in the process, so that the peak
    is this program's (``peak_bytes_in_use`` never goes down)."""
    device = jax.devices()[0]
    kind = device.device_kind
    if quick:
        sc, tc, n, longest, micro_rows = TINY, TINY_TEACHER, 8, 384, 2
    else:
        sc, tc = get_preset("qwen2.5-0.5b"), get_preset("qwen2.5-3b")
        n, longest, micro_rows = 64, 4096, 4
    sc = sc.replace(remat="full")
    compute = jnp.bfloat16 if device.platform != "cpu" else jnp.float32
    batch = synthetic_rollouts(n, longest, sc.vocab_size)
    packed, layout = pack_trajectories(batch, longest, rows_multiple=micro_rows)
    rows = packed["input_ids"].shape[0]
    objective = get_objective("dgpo")
    step = make_update_step(
        objective,
        sc,
        tc,
        optimizer=OptimConfig(lr=1e-6, critic_lr=1e-5, schedule="constant"),
        micro_batches=rows // micro_rows,
        compute_dtype=compute,
    )
    init = jax.jit(init_params, static_argnums=(0, 2))
    policy = init(sc, jax.random.key(0), jnp.float32)  # float32 masters
    teacher = init(tc, jax.random.key(1), compute)  # never trained: stored in compute dtype
    state = create_update_state(objective, policy, step.tx, 0)
    t0 = time.perf_counter()
    compiled = step.compile(state, packed, teacher)
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    planned = (
        stats.argument_size_in_bytes
        + stats.temp_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
    )
    state, metrics = step(state, packed, teacher)
    jax.block_until_ready(state)
    peak = (
        (device.memory_stats() or {}).get("peak_bytes_in_use") if device.platform != "cpu" else None
    )
    memory = {
        "program": "update step (DGPO, compiled with UpdateStep.compile)",
        "planned_gib": round(planned / 2**30, 3),
        "temp_gib": round(stats.temp_size_in_bytes / 2**30, 3),
        "measured_peak_gib": None if peak is None else round(peak / 2**30, 3),
        "measured_over_planned": None if peak is None else round(peak / planned, 3),
        "note": None if peak is not None else "memory_stats() needs an accelerator",
    }
    repeats = 1 if quick else 3
    t0 = time.perf_counter()
    for _ in range(repeats):
        state, metrics = step(state, packed, teacher)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / repeats
    real = int(layout.stats["real_tokens"])
    lengths = batch["attention_mask"].sum(1).astype(np.float64)
    pairs = float(np.sum(lengths * (lengths + 1) / 2))  # causal pairs within each trajectory
    flops = (
        flops_trained(sc, real, pairs, backward=True)  # policy
        + flops_trained(sc, real, pairs, backward=True)  # separate critic (same trunk shape)
        + flops_trained(tc, real, pairs, backward=False)  # teacher forward
    )
    peak_flops = _lookup(PEAK_BF16, kind)
    return {
        "student": "tiny" if quick else "qwen2.5-0.5b",
        "teacher": "tiny-teacher" if quick else "qwen2.5-3b",
        "compute_dtype": jnp.dtype(compute).name,
        "master_dtype": "float32",
        "trajectories": n,
        "packed_rows": rows,
        "width": longest,
        "micro_batches": rows // micro_rows,
        "padded_positions_per_real_token": layout.stats["padded_positions_per_real_token"],
        "compile_s": round(compile_s, 1),
        "step_s": round(step_s, 3),
        "real_tokens_per_s": round(real / step_s, 1),
        "model_tflops_per_step": round(flops / 1e12, 3),
        "mfu": None if peak_flops is None else round(flops / step_s / peak_flops, 4),
        "peak_bf16_flops": peak_flops,
        "loss": float(metrics["loss"]),
        "memory": memory,
    }


# --------------------------------------------------------------------------------- decode ---
def device_profile(fn, args, steps: int, top: int = 30) -> dict:
    """Where a compiled call spends its device time: one call traced with `jax.profiler`,
    events summed by name per timeline and divided by ``steps``. On the H200 image the device
    plane had one "Stream" line of kernels (named after their fusion; their `hlo_op` stat is
    the command buffer that launched them), no "XLA Ops" line; on a CPU the XLA threads' ops.
    ``top``: the heaviest names of the busiest timeline ("XLA Ops" when there is one), with
    their op and share."""
    trace_dir = tempfile.mkdtemp(prefix="gpu_profile_")
    with jax.profiler.trace(trace_dir):
        jax.block_until_ready(fn(*args))
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    lines: dict[str, dict] = {}
    for plane in data.planes:
        device = plane.name.startswith("/device:")
        for line in plane.lines:
            if not (device or line.name.startswith("tf_XLA")):
                continue
            key = f"{plane.name} {line.name}" if device else "/host:CPU XLA threads"
            names = lines.setdefault(key, {})
            for event in line.events:
                entry = names.setdefault(event.name, [0.0, 0, None])
                entry[0] += event.duration_ns
                entry[1] += 1
                if entry[2] is None:
                    stats = dict(event.stats)
                    entry[2] = str(stats.get("long_name") or stats.get("hlo_op") or "")[:400]
    summary = {
        key: {
            "busy_ms_per_step": round(sum(v[0] for v in names.values()) / 1e6 / steps, 4),
            "events_per_step": round(sum(v[1] for v in names.values()) / steps, 1),
        }
        for key, names in lines.items()
    }
    ops = [k for k in lines if "XLA Ops" in k] or list(lines)
    busiest = max(ops, key=lambda k: summary[k]["busy_ms_per_step"]) if ops else None
    heaviest = []
    if busiest:
        total = sum(v[0] for v in lines[busiest].values()) or 1.0
        for name, (ns, count, detail) in sorted(lines[busiest].items(), key=lambda kv: -kv[1][0])[
            :top
        ]:
            heaviest.append(
                {
                    "name": name,
                    "ms_per_step": round(ns / 1e6 / steps, 4),
                    "per_step": round(count / steps, 2),
                    "share": round(ns / total, 4),
                    "op": detail,
                }
            )
    return {"timelines": summary, "busiest": busiest, "top": heaviest}


def _decode_roofline(
    config, params, batch: int, mean_context: float, device_kind: str | None = None
) -> tuple[int, float | None]:
    """Bytes one decode step must read (the weights, and each row's KV cache at the mean
    context, in the params' dtype) and that over the HBM bandwidth of ``device_kind`` (default:
    the first device's) in ms (None when the chip is not in `HBM_BYTES_S`)."""
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    itemsize = jax.tree.leaves(params)[0].dtype.itemsize
    kv_per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * config.dim_per_head
    total = int(weight_bytes + kv_per_slot * batch * mean_context * itemsize)
    bandwidth = _lookup(HBM_BYTES_S, device_kind or jax.devices()[0].device_kind)
    return total, None if bandwidth is None else 1000 * total / bandwidth


def make_decode(config, steps: int, window, kernel, plan=None):
    """A jitted ``steps``-token greedy decode (one scan) of ``config`` over a KV cache (``plan``:
    the devices it is for, e.g. compile-only GPUs; None: the default backend's)."""

    @jax.jit
    def decode(params, token, cache):
        def body(carry, _):
            token, cache = carry
            logits, cache = forward_with_cache(
                config,
                params,
                token[:, None],
                cache,
                plan=plan,
                window=window,
                decode_kernel=kernel,
            )
            return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache), None

        (token, cache), _ = jax.lax.scan(body, (token, cache), None, length=steps)
        return token, cache

    return decode


# --quick's decode variants (every other one on request): the scanned and the split layers, and
# the two Pallas kernels (interpreted off a GPU).
QUICK_DECODE_VARIANTS = (
    "unrolled_cache",
    "window",
    "unrolled_cache_pallas",
    "unrolled_cache_fused",
)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def next_logits(config, params, token, cache, window, kernel):
    """One decode step's logits ``[B, V]`` (float32) by a decode variant's path: the variants
    must agree on them up to rounding (the stage records the largest difference)."""
    logits, _ = forward_with_cache(
        config, params, token[:, None], cache, window=window, decode_kernel=kernel
    )
    return logits[:, -1]


def decode_variants(params, cache, cache_len: int, split=None, per_layer=None) -> dict:
    """name -> (params, cache, window, one-query attention form, XLA options, decode kernel,
    the Pallas kernel's (k_splits, block_k) or None for `qwen2._ragged_blocks`'s choice).

    Variants (layers, cache layout, key window, attention form, XLA options), to place the
    step's time: "window": stacked layers in a scan, one static window, batched dots (the
    accelerator path's layers before the second GPU run); "reduce": the same with the float32
    multiply-and-reduce (every path's form before the first); "switch": a window switch per
    layer; "unrolled": split layers over the stacked cache; "unrolled_cache": split layers,
    each with its own cache array (the sampler's split layers, now the GPU default). XLA
    options: let cuBLAS gemms read dynamic slices in place (the scanned layers' weights and
    cache); cuBLAS instead of Triton for every gemm. A cache of None: the same context in a
    cache 4/3 as wide (the caller builds it). ``split`` / ``per_layer``: the split params and
    cache when already made (abstract shapes: `jax.eval_shape` of `split_layers` / `split_cache`)."""
    dsf = {"xla_gpu_enable_dynamic_slice_fusion": True}
    cublas = {"xla_gpu_enable_triton_gemm": False}
    split = split_layers(params) if split is None else split
    per_layer = split_cache(cache) if per_layer is None else per_layer
    xla = "xla"
    variants = {
        "window": (params, cache, cache_len, "dots", {}, xla),
        "reduce": (params, cache, cache_len, "reduce", {}, xla),
        "switch": (params, cache, None, "dots", {}, xla),
        "unrolled": (split, cache, cache_len, "dots", {}, xla),
        "unrolled_cache": (split, per_layer, cache_len, "dots", {}, xla),
        # JAX's Pallas GPU decode kernel: each row's slots up to its length, read in place
        "unrolled_cache_pallas": (split, per_layer, cache_len, "dots", {}, "pallas"),
        # one Triton kernel a layer: rotary, the cache write and the attention (each row's slots)
        "unrolled_cache_fused": (split, per_layer, cache_len, "dots", {}, "fused"),
        "unrolled_cache_cublas": (split, per_layer, cache_len, "dots", cublas, xla),
        # the same window out of a wider cache: a strided slice of each layer's array
        "unrolled_cache_slice": (split, None, cache_len, "dots", {}, xla),
        "window_dsf": (params, cache, cache_len, "dots", dsf, xla),
        "window_dsf_cublas": (params, cache, cache_len, "dots", {**dsf, **cublas}, xla),
    }
    variants = {k: (*v, None) for k, v in variants.items()}
    # the Pallas kernel with the most key splits (16, small blocks): the choice until the
    # third session, against `_ragged_blocks`'s fewest splits for ~1024 programs
    variants["unrolled_cache_pallas_s16"] = (
        split,
        per_layer,
        cache_len,
        "dots",
        {},
        "pallas",
        (16, 16),
    )
    return variants


def stage_decode(quick: bool, names=None, profile_dir=None) -> dict:
    kind = jax.devices()[0].device_kind
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    config = TINY if quick else get_preset("qwen2.5-0.5b")
    batch, prompt, steps = (8, 64, 32) if quick else (256, 512, 256)
    cache_len = prompt + steps
    params = cast_params(
        jax.jit(init_params, static_argnums=(0, 2))(config, jax.random.key(0)), dtype
    )
    ids = jax.random.randint(jax.random.key(1), (batch, prompt), 0, config.vocab_size)

    @functools.partial(jax.jit, static_argnums=2)
    def prefill(params, ids, slots=cache_len):
        cache = init_cache(config, batch, slots, dtype)
        logits, cache = forward_with_cache(config, params, ids, cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    token, cache = prefill(params, ids)
    variants = decode_variants(params, cache, cache_len)
    if quick and not names:  # (a smoke test of the forms: the XLA options are GPU-only anyway)
        names = QUICK_DECODE_VARIANTS
    unknown = set(names or ()) - set(variants)
    if unknown:
        raise ValueError(f"decode variants {sorted(unknown)} unknown; known: {sorted(variants)}")
    timings, temp_gib, profiles, logits_diff = {}, {}, {}, {}
    reference = None  # the first variant's next-token logits: each other's are checked on them
    for name in names or variants:
        p, c, window, form, options, kernel, blocks = variants[name]
        if c is None:  # a cache of 4/3 the slots, the same context
            c = split_cache(prefill(params, ids, cache_len + cache_len // 3)[1])
        qwen2.DECODE_ATTENTION_FORM, qwen2.RAGGED_BLOCKS = form, blocks
        try:
            t0 = time.perf_counter()
            lowered = make_decode(config, steps, window, kernel).lower(p, token, c)
            compiled = lowered.compile(compiler_options=options)
            first = time.perf_counter() - t0
            temp_gib[name] = round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3)
            jax.block_until_ready(compiled(p, token, c))
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(p, token, c))
            timings[name] = (1000 * (time.perf_counter() - t0) / steps, first)
            logits = next_logits(config, p, token, c, window, kernel)
            if reference is None:
                reference = logits
            else:
                logits_diff[name] = float(jnp.max(jnp.abs(logits - reference)))
            if profile_dir:
                profiles[name] = device_profile(compiled, (p, token, c), steps)
                with open(os.path.join(profile_dir, f"decode_{name}_profile.json"), "w") as f:
                    json.dump(profiles[name], f, indent=1)
                with open(os.path.join(profile_dir, f"decode_{name}.hlo.txt"), "w") as f:
                    f.write(compiled.as_text())
        except Exception as e:  # one variant an XLA refuses must not lose the others
            timings[name] = (float("nan"), 0.0)
            temp_gib[name] = f"{type(e).__name__}: {e}"[:300]
        finally:
            qwen2.DECODE_ATTENTION_FORM, qwen2.RAGGED_BLOCKS = None, None
    first_name = next(iter(timings))
    ms, compile_s = timings[first_name]
    bytes_per_step, roofline_ms = _decode_roofline(config, params, batch, prompt + steps / 2)
    return {
        "model": "tiny" if quick else "qwen2.5-0.5b",
        "dtype": jnp.dtype(dtype).name,
        "batch": batch,
        "context": f"{prompt} prompt + {steps} decoded",
        "variant": first_name,
        "ms_per_step": round(ms, 3),
        **{f"ms_per_step_{k}": round(v[0], 3) for k, v in timings.items() if k != first_name},
        "first_call_s": round(compile_s, 1),
        # each variant's next-token logits against the first's (same weights, cache, token)
        "max_abs_logit_diff": logits_diff,
        "compiled_temp_gib": temp_gib,
        "profile_top": {k: v["top"][:8] for k, v in profiles.items()},
        "bytes_per_step": bytes_per_step,
        "roofline_ms": None if roofline_ms is None else round(roofline_ms, 3),
        "share_of_roofline": None if roofline_ms is None else round(roofline_ms / ms, 3),
        "hbm_bytes_s": _lookup(HBM_BYTES_S, kind),
    }


def stage_ingest(quick: bool, reps: int = 5) -> dict:
    """One observation-chunk step of every row, as the sampler's accelerator path runs it (split
    layers, a cache array per layer, a static key window of the whole cache): the 0.5B model at
    batch 256, 128 tokens a row (their real lengths ragged: right padding) appended to 512-token
    prompts in a 768-slot cache. Timed side by side with XLA's attention and with the Pallas
    chunk kernel (``chunk_kernel="pallas"``: the Triton kernel on a GPU), each the median of
    ``reps`` calls, and the two compared: the largest difference of the real tokens' hidden
    states (what decides whether the kernel may be the GPU's default, docs/gpu.md)."""
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    config = TINY if quick else get_preset("qwen2.5-0.5b")
    batch, prompt, chunk, cache_len = (8, 64, 16, 96) if quick else (256, 512, 128, 768)
    params = split_layers(
        cast_params(jax.jit(init_params, static_argnums=(0, 2))(config, jax.random.key(0)), dtype)
    )
    ids = jax.random.randint(jax.random.key(1), (batch, prompt), 0, config.vocab_size)

    @jax.jit
    def prefill(params, ids):  # the prompts into a cache array per layer
        cache = split_cache(init_cache(config, batch, cache_len, dtype))
        return forward_with_cache(config, params, ids, cache)[1]

    cache = prefill(params, ids)
    obs = jax.random.randint(jax.random.key(2), (batch, chunk), 0, config.vocab_size)
    lengths = np.random.default_rng(3).integers(chunk // 4, chunk + 1, batch)
    mask = jnp.asarray(np.arange(chunk)[None] < lengths[:, None])
    results, hidden = {}, {}
    for kernel in ("xla", "pallas"):
        step = jax.jit(
            functools.partial(
                forward_with_cache,
                config,
                window=cache_len,
                chunk_kernel=kernel,
                return_hidden=True,
            )
        )
        t0 = time.perf_counter()
        compiled = step.lower(params, obs, cache, mask).compile()
        first = time.perf_counter() - t0
        out = jax.block_until_ready(compiled(params, obs, cache, mask))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, obs, cache, mask))
            times.append(1000 * (time.perf_counter() - t0))
        hidden[kernel] = np.asarray(out[0].astype(jnp.float32))
        results[kernel] = {"ms": round(float(np.median(times)), 3), "compile_s": round(first, 1)}
    real = np.asarray(mask)
    diff = np.abs(hidden["pallas"] - hidden["xla"])[real]
    scale = np.abs(hidden["xla"][real]).max()
    return {
        "model": "tiny" if quick else "qwen2.5-0.5b",
        "dtype": jnp.dtype(dtype).name,
        "batch": batch,
        "context": f"{prompt} prompt + {chunk}-token chunk, {cache_len} slots",
        "ms_per_step_xla": results["xla"]["ms"],
        "ms_per_step_pallas": results["pallas"]["ms"],
        "speedup_pallas": round(results["xla"]["ms"] / results["pallas"]["ms"], 3),
        "compile_s": {k: v["compile_s"] for k, v in results.items()},
        "max_abs_diff_hidden": float(diff.max()),
        "max_abs_hidden": float(scale),
    }


class _NoSearch:
    """The sampler stage's retriever and tokenizer: search is off and prompts are token ids, so
    neither is asked for text (the host formats its notices once, at start)."""

    def search(self, queries):
        raise AssertionError(f"search called with {len(queries)} queries in a plain decode")

    def encode(self, text, add_special_tokens=False):
        return [0]

    def decode(self, ids, skip_special_tokens=False):
        return ""


def plain_decode_config(config, prompt: int, steps: int, layers: str, n: int | None = None):
    """The sampler stage's config: ``n`` (default ``steps``) sampled tokens a row after a
    ``prompt``-token prompt in a cache of ``prompt + steps`` slots, search off, no early end."""
    n = steps if n is None else n
    return SamplerConfig(
        cache_len=prompt + steps,
        max_prompt_length=prompt,
        max_new_tokens_per_turn=n,
        max_new_tokens=n,
        max_obs_length=8,
        max_turns=0,
        search_stops=((config.vocab_size,),),  # an id no sample takes: no early end
        answer_stops=(),
        eos_token_ids=(),
        temperature=1.0,
        decode_layers=layers,
    )


def stage_sampler(quick: bool) -> dict:
    """The sampler itself (``Sampler.generate``, the decode path the platform picks) in plain
    decode: the 0.5B model at batch 256, random 512-token prompts, search off. Two compiled
    samplers, generating 1 and ``steps`` tokens per row: the difference over ``steps - 1`` is
    the sampler's ms per decode step (prefill, host transfers and output assembly cancel). Both
    for the platform's default layers and for the other `SamplerConfig.decode_layers` (with
    ``quick``, the default's only)."""
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    config = TINY if quick else get_preset("qwen2.5-0.5b")
    batch, prompt, steps = (8, 64, 32) if quick else (256, 512, 256)
    params = cast_params(
        jax.jit(init_params, static_argnums=(0, 2))(config, jax.random.key(0)), dtype
    )
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, config.vocab_size, prompt).tolist() for _ in range(batch)]
    # The sampler's default layers for the platform (split on CPU and GPUs) and the other
    # choice (`SamplerConfig.decode_layers`): ms per step of each, by difference.
    path = None
    per_layers = {}
    auto = SamplerConfig(search_stops=((config.vocab_size,),))  # its layer choice only
    default = resolve_decode_layers(auto, resolve_decode_path(auto))
    other = "scan" if default == "split" else "split"
    for layers in ("auto",) if quick else ("auto", other):  # (--quick: the default's only)
        walls = {}
        for n in (1, steps):
            cfg = plain_decode_config(config, prompt, steps, layers, n)
            sampler = Sampler(config, cfg, _NoSearch(), _NoSearch())
            t0 = time.perf_counter()
            out = sampler.generate(params, prompts, seed=0)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = sampler.generate(params, prompts, seed=1)
            walls[n] = (time.perf_counter() - t0, first)
            assert out.stats["generated_tokens"] == batch * n, out.stats
            path = out.stats["decode_path"]
        per_layers[out.stats["decode_layers"]] = walls
    walls = per_layers[next(iter(per_layers))]  # the default's
    ms = 1000 * (walls[steps][0] - walls[1][0]) / (steps - 1)
    _, roofline_ms = _decode_roofline(config, params, batch, prompt + steps / 2)
    return {
        "model": "tiny" if quick else "qwen2.5-0.5b",
        "dtype": jnp.dtype(dtype).name,
        "decode_path": path,
        "batch": batch,
        "context": f"{prompt} prompt + {steps} decoded",
        "decode_layers": next(iter(per_layers)),
        "ms_per_step": round(ms, 3),
        **{
            f"ms_per_step_{k}_layers": round(1000 * (w[steps][0] - w[1][0]) / (steps - 1), 3)
            for k, w in list(per_layers.items())[1:]
        },
        "generate_s": {str(n): round(w, 3) for n, (w, _) in walls.items()},
        "first_call_s": {str(n): round(f, 1) for n, (_, f) in walls.items()},
        "generated_tokens_per_s": round(batch * steps / walls[steps][0], 1),
        "roofline_ms": None if roofline_ms is None else round(roofline_ms, 3),
        "share_of_roofline": None if roofline_ms is None else round(roofline_ms / ms, 3),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on any backend")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_bench"))
    p.add_argument("--budget-s", type=float, default=420.0, help="skip stages started after")
    p.add_argument("--stages", default="update,decode,sampler,ingest,attention")
    p.add_argument(
        "--decode-variants",
        default="",
        help="comma-separated subset of the decode stage's variants (default: all; the first "
        "one is the headline figure)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="trace each decode variant once: per-op device time in OUT/decode_<variant>"
        "_profile.json, and its compiled HLO in OUT/decode_<variant>.hlo.txt",
    )
    args = p.parse_args(argv)
    device = jax.devices()[0]
    machine = attention_bench.machine()
    print(f"[gpu] {machine}, jax {jax.__version__}, backend {device.platform}", flush=True)
    stages = Stages(args.out, args.budget_s)
    dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    todo = {
        "update": (stage_update, args.quick),
        "decode": (
            stage_decode,
            args.quick,
            [v for v in args.decode_variants.split(",") if v] or None,
            args.out if args.profile else None,
        ),
        "sampler": (stage_sampler, args.quick),
        "ingest": (stage_ingest, args.quick),
        "attention": (stage_attention, args.quick, dtype),
    }
    names = args.stages.split(",")
    for name in names:
        if name not in todo:
            raise SystemExit(f"--stages: unknown stage {name!r}; known: {sorted(todo)}")
    # The update stage first, whatever the order asked: its memory check reads the process's
    # peak, which never goes down (after the decode stages it was 3x the plan, docs/gpu.md).
    for name in sorted(names, key=lambda n: n != "update"):
        fn, *fn_args = todo[name]
        stages.run(name, fn, *fn_args)
        if name == "update" and "memory" in stages.results["update"]:
            stages.record("memory", stages.results["update"].pop("memory"))
    summary = {
        "benchmark": "gpu",
        "machine": machine,
        "jax": jax.__version__,
        "quick": args.quick,
        "total_s": round(stages.elapsed(), 1),
        **stages.results,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
