"""Jitted Qwen2 forward and forward+backward vs transformers/PyTorch, same model and inputs.

    python benchmarks/model.py --quick          # < 1 minute on CPU
    python benchmarks/model.py --size small     # a ~27M-parameter Qwen2 shape
    python benchmarks/model.py --size qwen2.5-0.5b --batch 8 --seq 1024   # on a GPU

The loss for forward+backward is next-token cross-entropy over the full vocabulary, the same in
both frameworks. The last stdout line is one JSON object; ``ratio_*_vs_torch`` are our tokens/s
divided by PyTorch's (> 1 means faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.models import Qwen2Config, get_preset, init_params
from dgpo_jax.models.qwen2 import forward_hidden, lm_logits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import machine  # noqa: E402 (benchmarks/attention.py, beside this file)

SIZES = {
    # name: (vocab, hidden, ffn, layers, heads, kv_heads)
    "tiny": (2048, 128, 384, 2, 4, 2),
    "small": (8192, 384, 1024, 6, 6, 2),
    "medium": (32768, 512, 1536, 8, 8, 2),
}


def _time(fn, repeats):
    fn()  # compile / warm up
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, few repeats (< 1 min CPU)")
    p.add_argument("--size", default="small", help=f"{sorted(SIZES)} or a preset name")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.seq, args.repeats = "tiny", 4, 128, 3

    import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)
    import transformers  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    on_gpu = jax.default_backend() == "gpu"
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.size in SIZES:
        v, d, f, l, h, kv = SIZES[args.size]
        config = Qwen2Config(
            vocab_size=v,
            hidden_size=d,
            intermediate_size=f,
            num_hidden_layers=l,
            num_attention_heads=h,
            num_key_value_heads=kv,
            tie_word_embeddings=True,
        )
    else:
        config = get_preset(args.size)
    params = init_params(config, jax.random.key(0), jnp.dtype(dtype))
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, args.seq))
    ids_j = jnp.asarray(ids)

    def loss_fn(params, ids):
        h = forward_hidden(config, params, ids)
        logits = lm_logits(config, params, h[:, :-1])
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

    fwd = jax.jit(lambda p, x: loss_fn(p, x))
    fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
    t_fwd = _time(lambda: jax.block_until_ready(fwd(params, ids_j)), args.repeats)
    t_fb = _time(lambda: jax.block_until_ready(fwd_bwd(params, ids_j)), args.repeats)

    # The same model in PyTorch.
    device = "cuda" if (on_gpu and torch.cuda.is_available()) else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config.to_hf_dict()))
    hf = hf.to(device=device, dtype=tdtype)
    ids_t = torch.tensor(ids, device=device)

    def torch_loss():
        logits = hf(input_ids=ids_t).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids_t[:, 1:].reshape(-1)
        )

    def torch_sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def torch_fwd():
        with torch.no_grad():
            torch_loss()
        torch_sync()

    def torch_fb():
        hf.zero_grad(set_to_none=True)
        torch_loss().backward()
        torch_sync()

    tt_fwd = _time(torch_fwd, args.repeats)
    tt_fb = _time(torch_fb, args.repeats)
    tokens = args.batch * args.seq
    result = {
        "benchmark": "model",
        "machine": machine(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "size": args.size,
        "params": config.num_params(),
        "batch": args.batch,
        "seq": args.seq,
        "dtype": dtype,
        "jax_fwd_tokens_per_s": round(tokens / t_fwd, 1),
        "torch_fwd_tokens_per_s": round(tokens / tt_fwd, 1),
        "jax_fwd_bwd_tokens_per_s": round(tokens / t_fb, 1),
        "torch_fwd_bwd_tokens_per_s": round(tokens / tt_fb, 1),
        "ratio_fwd_vs_torch": round(tt_fwd / t_fwd, 3),
        "ratio_fwd_bwd_vs_torch": round(tt_fb / t_fb, 3),
    }
    print(
        f"forward      jax {result['jax_fwd_tokens_per_s']:>10} tok/s   torch "
        f"{result['torch_fwd_tokens_per_s']:>10} tok/s",
        file=sys.stderr,
    )
    print(
        f"forward+back jax {result['jax_fwd_bwd_tokens_per_s']:>10} tok/s   torch "
        f"{result['torch_fwd_bwd_tokens_per_s']:>10} tok/s",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
