"""Attention kernels of the training / scoring path: forward + backward time and temporary bytes.

    python benchmarks/attention.py --quick      # < 1 minute on CPU
    python benchmarks/attention.py              # 2048 and 8704 positions (GPU: also cudnn)

Shapes like Qwen2.5-0.5B: 14 query heads, 2 kv heads, head dim 64. Each row of the batch holds
one sequence left-padded by an eighth of the length (the padding the kernels must mask). The
timed program is ``jax.value_and_grad`` of a weighted sum of the attention output with respect
to q, k and v; the bytes are the compiled program's temporaries (``memory_analysis``). A kernel
whose temporaries exceed ``--max-temp-gib`` is compiled but not run. The last stdout line is
one JSON object naming the machine.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from hostinfo import cpu_machine  # benchmarks/hostinfo.py, beside this file

from dgpo_jax.models import attention as attn


def machine() -> str:
    """The GPU/TPU name, or the CPU model and core count (`hostinfo.cpu_machine`)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{jax.device_count()} x {device.device_kind}"
    return cpu_machine()


def run(kernel, batch, length, heads, kv_heads, head_dim, dtype, block, repeats, max_temp):
    rng = np.random.default_rng(0)
    groups = heads // kv_heads
    q = jnp.asarray(rng.normal(size=(batch, length, kv_heads, groups, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), dtype)
    w = jnp.asarray(rng.normal(size=q.shape), dtype)
    segments = np.ones((batch, length), np.int32)
    segments[:, : length // 8] = 0  # left padding
    segments = jnp.asarray(segments)

    def loss(q, k, v):
        out = attn.attention(q, k, v, segments, kernel=kernel, block=block)
        return jnp.sum(out.astype(jnp.float32) * w)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    start = time.perf_counter()
    compiled = step.lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    result = {
        "kernel": kernel,
        "length": length,
        "batch": batch,
        "temp_bytes": int(temp),
        "temp_mib": round(temp / 2**20, 1),
        "compile_s": round(compile_s, 2),
    }
    if temp > max_temp * 2**30:
        result["ms"] = None
        result["skipped"] = f"temporaries over {max_temp} GiB"
        return result
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    result["ms"] = round(1000 * float(np.median(times)), 2)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short lengths, few repeats (< 1 min CPU)")
    p.add_argument("--lengths", default="2048,8704", help="comma-separated positions per row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (accelerators)")
    p.add_argument("--kernels", default=None, help="default: xla,chunked (+ cudnn on GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-temp-gib", type=float, default=None, help="default: 8 (CPU), 60")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = "512,2048", 2
    backend = attn.backend()
    dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    kernels = args.kernels or {"gpu": "xla,chunked,cudnn", "tpu": "xla,chunked,splash"}.get(
        backend, "xla,chunked"
    )
    max_temp = args.max_temp_gib or (8.0 if backend == "cpu" else 60.0)
    results = []
    for length in (int(x) for x in args.lengths.split(",")):
        for kernel in kernels.split(","):
            r = run(
                kernel,
                args.batch,
                length,
                args.heads,
                args.kv_heads,
                args.head_dim,
                dtype,
                args.block,
                args.repeats,
                max_temp,
            )
            results.append(r)
            print(
                f"{kernel:8s} T={length:5d}  fwd+bwd {r['ms']} ms  temporaries {r['temp_mib']} MiB"
                f"  (compile {r['compile_s']} s)",
                flush=True,
            )
    summary = {
        "benchmark": "attention",
        "machine": machine(),
        "backend": backend,
        "jax": jax.__version__,
        "dtype": dtype.name,
        "shape": {
            "batch": args.batch,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "block": args.block,
        },
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
