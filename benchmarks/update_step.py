"""Tokens/s of the fused DGPO update step (teacher forward included) vs the same computation in
PyTorch (transformers Qwen2ForCausalLM student + teacher, a Qwen2Model critic with a value
head, a straightforward loss, torch.optim.AdamW). Same weights, same batch, one run each.

    python benchmarks/update_step.py --quick                 # < 1 minute on CPU
    python benchmarks/update_step.py                         # small shapes
    python benchmarks/update_step.py --student qwen2.5-0.5b --teacher qwen2.5-3b \
        --batch 8 --seq 1024 --dtype bfloat16                # on a GPU (also reports MFU)

The step, in both frameworks: teacher log-probs of the sampled tokens (no gradient), the DGPO
token reward ``R*[last] + beta*[R=0]*(l^T - l^old)``, GAE (gamma = lambda = 1) over the student
tokens with whitening, PPO-clip + entropy bonus, a separate critic with a clipped value loss,
gradient clipping and AdamW for actor and critic. The first step's losses are printed for both
(they agree: the same objective on the same weights). The last stdout line is one JSON object;
``ratio_vs_torch`` = our tokens/s / PyTorch's (> 1: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.learner.optim import OptimConfig
from dgpo_jax.learner.update_step import create_update_state, make_update_step
from dgpo_jax.models import Qwen2Config, get_preset, init_params, save_hf
from dgpo_jax.objectives import get_objective

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import machine  # noqa: E402 (benchmarks/attention.py, beside this file)

# name: (vocab, hidden, ffn, layers, heads, kv_heads)
SIZES = {
    "bench-tiny": (2048, 128, 384, 2, 4, 2),
    "bench-tiny-teacher": (2048, 256, 768, 2, 4, 2),
    "bench-small": (8192, 384, 1024, 6, 6, 2),
    "bench-small-teacher": (8192, 768, 2048, 8, 12, 2),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
BETA, CLIP, ENT, VCLIP, LR, CRITIC_LR, WD = 0.001, 0.2, 0.001, 0.5, 1e-6, 1e-5, 0.01


def model_config(name, vocab=None):
    if name in SIZES:
        v, d, f, l, h, k = SIZES[name]
        return Qwen2Config(
            vocab_size=vocab or v,
            hidden_size=d,
            intermediate_size=f,
            num_hidden_layers=l,
            num_attention_heads=h,
            num_key_value_heads=k,
            bos_token_id=None,
            eos_token_id=None,
        )
    return get_preset(name, **({"vocab_size": vocab} if vocab else {}))


def make_batch(b, t, vocab, seed=0):
    r = np.random.default_rng(seed)
    ids = r.integers(0, vocab, (b, t)).astype(np.int32)
    lm = np.zeros((b, t), np.float32)
    lm[:, t // 4 :] = 1
    lm[:, t // 2 : t // 2 + t // 8] = 0  # a tool observation
    return dict(
        input_ids=ids,
        attention_mask=np.ones((b, t), np.int32),
        loss_mask=lm,
        old_logprobs=(-r.random((b, t)) * 8).astype(np.float32),
        rewards=(np.arange(b) % 2).astype(np.float32),
        values=r.normal(0, 0.5, (b, t)).astype(np.float32),
    )


def flops_per_token(config, with_logits: bool, backward: bool, seq: int) -> float:
    """6N (fwd+bwd) or 2N (fwd) per token plus the attention score/value matmuls."""
    embed = config.vocab_size * config.hidden_size
    n = config.num_params() - embed * (1 if config.tie_word_embeddings else 2)  # matmul params
    if with_logits:
        n += config.vocab_size * config.hidden_size
    attn = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * config.dim_per_head * seq
    mult = 3 if backward else 1
    return mult * (2 * n + attn)


# ------------------------------------------------------------------------------------------
# PyTorch
# ------------------------------------------------------------------------------------------
def torch_step_fn(student, teacher, critic, head, opt_actor, opt_critic, batch, beta=BETA):
    """The DGPO step written plainly in PyTorch (also the tests' independent reference).
    ``batch["values"]`` may be absent: the critic then computes them (no gradient) first."""
    import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)

    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    am = torch.as_tensor(batch["attention_mask"])
    lm = torch.as_tensor(batch["loss_mask"])
    old = torch.as_tensor(batch["old_logprobs"])
    given_values = torch.as_tensor(batch["values"]) if "values" in batch else None
    rewards = torch.as_tensor(batch["rewards"])
    b, t = ids.shape

    def token_logprobs(logits):
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        out = torch.gather(lp, -1, ids[:, 1:, None])[..., 0]
        return torch.nn.functional.pad(out, (1, 0)), lp

    def critic_values():
        h = critic(input_ids=ids, attention_mask=am).last_hidden_state
        return torch.nn.functional.pad(head(h[:, :-1].float())[..., 0], (1, 0))

    def step():
        with torch.no_grad():
            values = given_values if given_values is not None else critic_values()
            t_lp, _ = token_logprobs(teacher(input_ids=ids, attention_mask=am).logits)
            last = torch.zeros_like(lm)
            idx = torch.arange(t)[None].expand(b, t)
            last_pos = torch.where(lm > 0, idx, -1).max(1).values
            last[torch.arange(b), last_pos.clamp(min=0)] = (last_pos >= 0).float()
            gate = (rewards < 0.1).float()  # create_reward_based_mask: score < 0.1
            tok_r = (
                rewards[:, None] * last
                + beta * gate[:, None] * torch.clamp(t_lp - old, -20, 20) * lm
            )
            adv = torch.zeros_like(lm)
            nv, na = torch.zeros(b), torch.zeros(b)
            for j in reversed(range(t)):
                m = lm[:, j] > 0
                a = tok_r[:, j] + nv - values[:, j] + na
                adv[:, j] = torch.where(m, a, torch.zeros_like(a))
                nv = torch.where(m, values[:, j], nv)
                na = torch.where(m, a, na)
            returns = (adv + values) * lm
            n = lm.sum()
            mean = (adv * lm).sum() / n
            var = (((adv - mean) ** 2) * lm).sum() / n * n / (n - 1)
            adv = (adv - mean) * torch.rsqrt(var + 1e-8) * lm
        logits = student(input_ids=ids, attention_mask=am).logits
        lp, lp_all = token_logprobs(logits)
        ent = torch.nn.functional.pad(-(lp_all.exp() * lp_all).sum(-1), (1, 0))
        ratio = torch.exp(torch.clamp(lp - old, -20, 20))
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
        actor_loss = ((pg - ENT * ent) * lm).sum() / n
        v = critic_values()
        v_clip = values + torch.clamp(v - values, -VCLIP, VCLIP)
        vl = 0.5 * torch.maximum((v - returns) ** 2, (v_clip - returns) ** 2)
        value_loss = (vl * lm).sum() / n
        loss = actor_loss + value_loss
        opt_actor.zero_grad(set_to_none=True)
        opt_critic.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(list(critic.parameters()) + list(head.parameters()), 1.0)
        opt_actor.step()
        opt_critic.step()
        return loss.detach().item()

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (< 1 minute on CPU)")
    p.add_argument("--student", default="bench-small", help=f"{sorted(SIZES)} or a model preset")
    p.add_argument("--teacher", default="bench-small-teacher")
    p.add_argument("--vocab", type=int, default=None, help="override both vocab sizes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU on unknown devices")
    args = p.parse_args(argv)
    if args.quick:
        args.student, args.teacher, args.batch, args.seq, args.steps = (
            "bench-tiny",
            "bench-tiny-teacher",
            4,
            128,
            2,
        )

    platform = jax.devices()[0].platform
    dtype = args.dtype or ("bfloat16" if platform == "gpu" else "float32")
    jdtype = jnp.dtype(dtype)
    sc, tc = model_config(args.student, args.vocab), model_config(args.teacher, args.vocab)
    if sc.vocab_size != tc.vocab_size:
        raise SystemExit(f"student vocab {sc.vocab_size} != teacher vocab {tc.vocab_size}")
    print(
        f"[update_step] {platform} {dtype}: student {args.student} ({sc.num_params() / 1e6:.1f}M), "
        f"teacher {args.teacher} ({tc.num_params() / 1e6:.1f}M), batch {args.batch} x {args.seq}",
        flush=True,
    )
    init = jax.jit(init_params, static_argnums=(0, 2))
    sp = init(sc, jax.random.key(0), jdtype)
    tp = init(tc, jax.random.key(1), jdtype)
    batch = make_batch(args.batch, args.seq, sc.vocab_size)
    tokens = args.batch * args.seq

    cfg = get_objective("dgpo")  # separate critic, KL in the reward, GAE + whitening
    step = make_update_step(
        cfg,
        sc,
        tc,
        micro_batches=args.micro_batches,
        optimizer=OptimConfig(
            lr=LR, critic_lr=CRITIC_LR, schedule="constant", weight_decay=WD, grad_clip=1.0
        ),
    )
    state = create_update_state(cfg, jax.tree.map(jnp.copy, sp), step.tx, 0)
    head = jax.device_get(state.params["critic"]["value_head"])
    t0 = time.perf_counter()
    state, metrics = step(state, batch, tp)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    jax_loss = float(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch, tp)
    jax.block_until_ready((state, metrics))
    jax_tps = tokens * args.steps / (time.perf_counter() - t0)
    print(
        f"[update_step] jax: first call (compile) {compile_s:.1f}s, {jax_tps:,.0f} tokens/s, "
        f"first loss {jax_loss:.6f}",
        flush=True,
    )

    result = {
        "benchmark": "update_step",
        "machine": machine(),
        "objective": "dgpo",
        "device": str(jax.devices()[0]),
        "dtype": dtype,
        "student": args.student,
        "teacher": args.teacher,
        "batch": args.batch,
        "seq": args.seq,
        "micro_batches": args.micro_batches,
        "steps": args.steps,
        "jax_tokens_per_s": jax_tps,
        "jax_compile_s": compile_s,
        "jax_first_loss": jax_loss,
    }

    flops = tokens * (
        flops_per_token(sc, True, True, args.seq)
        + flops_per_token(tc, True, False, args.seq)
        + flops_per_token(sc, False, True, args.seq)
    )
    kind = jax.devices()[0].device_kind
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)
    )
    result["mfu"] = (flops / (tokens / jax_tps)) / peak if peak and dtype == "bfloat16" else None

    if not args.skip_torch:
        import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)
        import transformers  # noqa: PLC0415 (transformers is slow to import; loaded on use)

        torch.manual_seed(0)
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(sc, jax.device_get(sp), os.path.join(tmp, "s"))
            save_hf(tc, jax.device_get(tp), os.path.join(tmp, "t"))
            student = transformers.Qwen2ForCausalLM.from_pretrained(
                os.path.join(tmp, "s"), dtype=tdtype
            )
            teacher = transformers.Qwen2ForCausalLM.from_pretrained(
                os.path.join(tmp, "t"), dtype=tdtype
            ).eval()
            critic = transformers.Qwen2Model.from_pretrained(os.path.join(tmp, "s"), dtype=tdtype)
        student.train()
        critic.train()
        head_t = torch.nn.Linear(sc.hidden_size, 1)
        with torch.no_grad():
            head_t.weight.copy_(torch.from_numpy(np.array(head["kernel"], np.float32))[None])
            head_t.bias.fill_(float(head["bias"]))
        opt_a = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WD)
        opt_c = torch.optim.AdamW(
            list(critic.parameters()) + list(head_t.parameters()), lr=CRITIC_LR, weight_decay=WD
        )
        run = torch_step_fn(student, teacher, critic, head_t, opt_a, opt_c, batch)
        torch_loss = run()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            run()
        torch_tps = tokens * args.steps / (time.perf_counter() - t0)
        print(
            f"[update_step] torch ({torch.get_num_threads()} threads): {torch_tps:,.0f} tokens/s, "
            f"first loss {torch_loss:.6f}",
            flush=True,
        )
        result.update(
            torch_tokens_per_s=torch_tps,
            torch_first_loss=torch_loss,
            ratio_vs_torch=jax_tps / torch_tps,
        )
    else:
        result["ratio_vs_torch"] = None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
