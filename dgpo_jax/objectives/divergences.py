"""Full- and top-k-vocabulary divergences between student and teacher, chunked over the sequence.

Per-position divergences take log-probabilities ``[..., V]`` (float32) and return ``[...]``:

  fkl       KL(T || S) = sum_v p_T (log p_T - log p_S)      (KD; = cross-entropy - H(T))
  rkl       KL(S || T)
  jsd       beta * KL(T || M) + (1 - beta) * KL(S || M),  M = beta*T + (1-beta)*S   (GKD)
  skew_fkl  KL(T || a*T + (1-a)*S)                          (DistiLLM SKL)
  skew_rkl  KL(S || a*S + (1-a)*T)                          (DistiLLM SRKL)
  taid      KL(p_t || S),  p_t = softmax((1-t)*sg(z_S) + t*z_T)   (TAID; t is dynamic)
  topk_fkl  forward KL on the teacher's top-k tokens (renormalised over them by default;
            UNVERIFIED how TrOPD truncates: ``renormalize`` is the knob)

``chunked_token_stats`` computes, from final hidden states, the per-token quantities an
objective needs (student log-prob of the sampled token, entropy, teacher log-prob, divergences)
in chunks of ``chunk`` positions under ``jax.checkpoint``, so neither the forward nor the backward
pass ever holds ``[B, T, V]`` float32 logits: only ``[B, chunk, V]`` at a time.

Alignment: outputs are ``[B, T]`` aligned with ``input_ids``; position t is computed from the
logits at t-1 (which predict ``ids[t]``); position 0 is 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "taid", "topk_fkl")


@dataclasses.dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence and its constants (hashable: part of the compiled program)."""

    kind: str
    top_k: int = 0
    renormalize: bool = True
    jsd_beta: float = 0.1
    skew_alpha: float = 0.1

    def __post_init__(self):
        if self.kind not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.kind!r}; expected one of {DIVERGENCES}")

    @property
    def needs_interpolation_t(self) -> bool:
        return self.kind == "taid"


def _kl(p_logp, q_logp):
    """sum_v p (log p - log q) over the last axis."""
    return jnp.sum(jnp.exp(p_logp) * (p_logp - q_logp), axis=-1)


def forward_kl(t_logp, s_logp):
    return _kl(t_logp, s_logp)


def reverse_kl(t_logp, s_logp):
    return _kl(s_logp, t_logp)


def generalized_jsd(t_logp, s_logp, beta: float):
    mix = jnp.logaddexp(t_logp + math.log(beta), s_logp + math.log1p(-beta))
    return beta * _kl(t_logp, mix) + (1.0 - beta) * _kl(s_logp, mix)


def skew_forward_kl(t_logp, s_logp, alpha: float):
    mix = jnp.logaddexp(t_logp + math.log(alpha), s_logp + math.log1p(-alpha))
    return _kl(t_logp, mix)


def skew_reverse_kl(t_logp, s_logp, alpha: float):
    mix = jnp.logaddexp(s_logp + math.log(alpha), t_logp + math.log1p(-alpha))
    return _kl(s_logp, mix)


def taid_kl(t_logits, s_logits, t_interp):
    """KL(p_t || S) with ``p_t = softmax((1 - t) * sg(z_S) + t * z_T)``."""
    target = jax.nn.log_softmax(
        (1.0 - t_interp) * jax.lax.stop_gradient(s_logits) + t_interp * t_logits, axis=-1
    )
    return _kl(jax.lax.stop_gradient(target), jax.nn.log_softmax(s_logits, axis=-1))


def topk_forward_kl(t_logp, s_logp, k: int, renormalize: bool = True):
    """Forward KL restricted to the teacher's top-k tokens at each position."""
    top_t, idx = jax.lax.top_k(t_logp, k)
    top_s = jnp.take_along_axis(s_logp, idx, axis=-1)
    if renormalize:
        top_t = top_t - jax.nn.logsumexp(top_t, axis=-1, keepdims=True)
        top_s = top_s - jax.nn.logsumexp(top_s, axis=-1, keepdims=True)
    return _kl(top_t, top_s)


def divergence(spec: DivergenceSpec, s_logits, t_logits, t_interp=None):
    """Per-position divergence from raw logits ``[..., V]`` -> ``[...]`` (float32)."""
    s_logits = s_logits.astype(jnp.float32)
    t_logits = jax.lax.stop_gradient(t_logits.astype(jnp.float32))
    if spec.kind == "taid":
        if t_interp is None:
            raise ValueError("the taid divergence needs the interpolation t (batch field 'taid_t')")
        return taid_kl(t_logits, s_logits, t_interp)
    s_logp = jax.nn.log_softmax(s_logits, axis=-1)
    t_logp = jax.nn.log_softmax(t_logits, axis=-1)
    if spec.kind == "fkl":
        return forward_kl(t_logp, s_logp)
    if spec.kind == "rkl":
        return reverse_kl(t_logp, s_logp)
    if spec.kind == "jsd":
        return generalized_jsd(t_logp, s_logp, spec.jsd_beta)
    if spec.kind == "skew_fkl":
        return skew_forward_kl(t_logp, s_logp, spec.skew_alpha)
    if spec.kind == "skew_rkl":
        return skew_reverse_kl(t_logp, s_logp, spec.skew_alpha)
    return topk_forward_kl(t_logp, s_logp, spec.top_k, spec.renormalize)


def _entropy(logp):
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def chunked_token_stats(
    student_logits_fn: Callable,
    student_hidden,
    input_ids,
    *,
    teacher_logits_fn: Callable | None = None,
    teacher_hidden=None,
    want_entropy: bool = False,
    want_teacher_logp: bool = False,
    divergences: dict[str, DivergenceSpec] | None = None,
    t_interp=None,
    chunk: int = 128,
) -> dict[str, jax.Array]:
    """Per-token statistics from final hidden states, ``chunk`` positions at a time.

    Args:
      student_logits_fn: ``[..., D] -> [..., V]`` float32 (e.g. ``lm_logits`` with params bound).
      student_hidden: ``[B, T, D]``.
      input_ids: ``[B, T]`` int.
      teacher_logits_fn / teacher_hidden ``[B, T, Dt]``: needed for teacher quantities; never
        differentiated.
      want_entropy: add "entropy" (student, full vocabulary).
      want_teacher_logp: add "teacher_logp".
      divergences: name -> spec; adds each name.
      t_interp: scalar for TAID.
      chunk: positions per chunk.
    Returns:
      dict of ``[B, T]`` float32 arrays aligned with ``input_ids`` (position 0 is 0), always with
      "logp" (student log-prob of the sampled token).
    """
    divergences = divergences or {}
    need_teacher = want_teacher_logp or bool(divergences)
    if need_teacher and (teacher_logits_fn is None or teacher_hidden is None):
        raise ValueError("teacher quantities requested but no teacher hidden states were given")
    b, t = input_ids.shape
    n = t - 1
    chunk = max(1, min(chunk, n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n

    def split(x):  # [B, n, ...] -> [n_chunks, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, n_chunks, chunk) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1)

    xs = {"h": split(student_hidden[:, :-1]), "ids": split(input_ids[:, 1:])}
    if need_teacher:
        xs["th"] = split(jax.lax.stop_gradient(teacher_hidden[:, :-1]))

    def body(x):
        s_logits = student_logits_fn(x["h"]).astype(jnp.float32)  # [B, C, V]
        s_logp = jax.nn.log_softmax(s_logits, axis=-1)
        out = {"logp": jnp.take_along_axis(s_logp, x["ids"][..., None], axis=-1)[..., 0]}
        if want_entropy:
            out["entropy"] = _entropy(s_logp)
        if need_teacher:
            t_logits = jax.lax.stop_gradient(teacher_logits_fn(x["th"]).astype(jnp.float32))
            if want_teacher_logp:
                t_logp = jax.nn.log_softmax(t_logits, axis=-1)
                out["teacher_logp"] = jnp.take_along_axis(t_logp, x["ids"][..., None], axis=-1)[
                    ..., 0
                ]
            for name, spec in divergences.items():
                out[name] = divergence(spec, s_logits, t_logits, t_interp)
        return out

    body = jax.checkpoint(body)
    _, stacked = jax.lax.scan(lambda carry, x: (carry, body(x)), None, xs)

    def unsplit(y):  # [n_chunks, B, chunk] -> [B, T]
        y = jnp.swapaxes(y, 0, 1).reshape(b, n_chunks * chunk)[:, :n]
        return jnp.pad(y, [(0, 0), (1, 0)])

    return {k: unsplit(v) for k, v in stacked.items()}
