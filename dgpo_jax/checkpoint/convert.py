"""Convert between Hugging Face directories and dgpo_jax (orbax) checkpoints, and check it.

    python -m dgpo_jax.checkpoint.convert hf-to-ckpt --hf HF_DIR --out CKPT_DIR [--dtype bfloat16]
    python -m dgpo_jax.checkpoint.convert ckpt-to-hf --ckpt CKPT_DIR [--step N] --out HF_DIR \
        [--tokenizer qwen2.5|TOKENIZER_DIR] [--dtype bfloat16]
    python -m dgpo_jax.checkpoint.convert demo --workdir /tmp/dgpo_convert_demo

After converting, each direction checks itself on a sample batch: it runs the converted weights
and the source weights on the same random tokens and prints the max abs logit difference and
the mean per-token KL. With PyTorch installed the HF side runs in transformers (an independent
implementation); without it, both sides run in dgpo_jax. It exits non-zero if the check fails.

A checkpoint holds either ``{"params": ...}`` (what ``hf-to-ckpt`` writes) or a full
``TrainState``; its JSON metadata carries the model config under ``model_config`` (HF format).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.checkpoint.params import load_params_checkpoint, save_params_checkpoint
from dgpo_jax.errors import run_cli
from dgpo_jax.models import Qwen2Config, forward, get_preset, init_params, load_hf, save_hf
from dgpo_jax.models.tokenizer import load_tokenizer

KL_TOLERANCE = {"float32": 1e-4, "bfloat16": 1.5e-2, "float16": 1.5e-2}


def _kl_report(ref_logits: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    ref = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), -1)
    ours = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    kl = jnp.sum(jnp.exp(ref) * (ref - ours), -1)
    return float(np.abs(np.asarray(ref_logits, np.float32) - logits).max()), float(kl.mean())


def _sample_ids(config: Qwen2Config, batch=2, seq=16, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, config.vocab_size, (batch, seq))


def _torch_logits(hf_dir: str, ids: np.ndarray, dtype: str) -> np.ndarray | None:
    try:
        import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)
        import transformers  # noqa: PLC0415 (transformers is slow to import; loaded on use)
    except ImportError:
        return None
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=tdtype).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def check(config: Qwen2Config, params: Any, hf_dir: str, dtype: str, label: str) -> bool:
    """Compare our logits for ``params`` with the HF directory's, print the figures."""
    ids = _sample_ids(config)
    ours = np.asarray(forward(config, params, ids))
    ref = _torch_logits(hf_dir, ids, dtype)
    engine = "transformers"
    if ref is None:
        engine = "dgpo_jax (PyTorch not installed)"
        c2, p2 = load_hf(hf_dir, dtype=dtype)
        ref = np.asarray(forward(c2, p2, ids))
    max_diff, kl = _kl_report(ref, ours)
    ok = kl <= KL_TOLERANCE[dtype]
    print(
        f"[{label}] self-check vs {engine} on {ids.shape[0]}x{ids.shape[1]} tokens, {dtype}: "
        f"max abs logit diff {max_diff:.3g}, mean per-token KL {kl:.3g} "
        f"({'OK' if ok else 'FAILED'}; tolerance {KL_TOLERANCE[dtype]:g})"
    )
    return ok


def hf_to_ckpt(hf_dir: str, out: str, dtype: str = "bfloat16", step: int = 0) -> bool:
    t = time.time()
    config, params = load_hf(hf_dir, dtype=dtype)
    save_params_checkpoint(config, params, out, step)
    print(
        f"wrote {out} (step {step}, {config.num_params() / 1e6:.1f}M params, {dtype}) "
        f"in {time.time() - t:.1f}s"
    )
    _, restored, _ = load_params_checkpoint(out, step)
    return check(config, restored, hf_dir, dtype, "hf-to-ckpt")


def ckpt_to_hf(
    ckpt_dir: str,
    out: str,
    step: int | None = None,
    dtype: str | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> bool:
    t = time.time()
    config, params, _ = load_params_checkpoint(ckpt_dir, step, dtype)
    dtype = dtype or str(jnp.dtype(params["embed_tokens"].dtype))
    tok = None
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    save_hf(config, params, out, tokenizer=tok, overwrite=overwrite)
    print(
        f"wrote {out} ({config.num_params() / 1e6:.1f}M params, {dtype}) in {time.time() - t:.1f}s"
    )
    return check(config, params, out, dtype, "ckpt-to-hf")


def demo(workdir: str) -> bool:
    """A tiny random Qwen2 through both directions: HF -> checkpoint -> HF."""
    config = get_preset("tiny", vocab_size=1024)
    params = init_params(config, jax.random.key(0), jnp.float32)
    for sub in ("hf_source", "checkpoint", "hf_export"):
        shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
    src = os.path.join(workdir, "hf_source")
    save_hf(config, params, src, overwrite=True)
    print(f"demo: a random {config.num_params() / 1e6:.2f}M-parameter Qwen2 written to {src}")
    ok = hf_to_ckpt(src, os.path.join(workdir, "checkpoint"), dtype="float32")
    ok &= ckpt_to_hf(
        os.path.join(workdir, "checkpoint"), os.path.join(workdir, "hf_export"), overwrite=True
    )
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dgpo_jax.checkpoint.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-ckpt", help="Hugging Face directory -> orbax checkpoint")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--dtype", default="bfloat16", choices=sorted(KL_TOLERANCE))
    a.add_argument("--step", type=int, default=0)
    b = sub.add_parser("ckpt-to-hf", help="orbax checkpoint -> Hugging Face directory")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--step", type=int, default=None, help="default: the latest")
    b.add_argument("--dtype", default=None, choices=sorted(KL_TOLERANCE))
    b.add_argument("--tokenizer", default=None, help="'qwen2.5' or a tokenizer directory")
    b.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("demo", help="round-trip a tiny random model through both directions")
    c.add_argument("--workdir", default="/tmp/dgpo_convert_demo")
    args = p.parse_args(argv)
    if args.cmd == "hf-to-ckpt":
        ok = hf_to_ckpt(args.hf, args.out, args.dtype, args.step)
    elif args.cmd == "ckpt-to-hf":
        ok = ckpt_to_hf(args.ckpt, args.out, args.step, args.dtype, args.tokenizer, args.overwrite)
    else:
        ok = demo(args.workdir)
    return 0 if ok else 1


def run_main(argv=None) -> None:
    """The console entry point (``dgpo-convert``): a missing or malformed model directory or
    checkpoint, or an existing output, as one ``error:`` line and exit status 2 (``--debug``
    or ``DGPO_DEBUG=1``: the traceback)."""
    run_cli(main, argv)


if __name__ == "__main__":
    run_main()
