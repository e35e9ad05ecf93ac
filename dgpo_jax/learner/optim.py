"""Optimiser: optax AdamW with global-norm gradient clipping and learning-rate schedules, with
separate settings for the policy and the critic (value head / critic model).

Parameter trees handled here are ``{"policy": student_params, <other keys>: critic params}``:
the ``"policy"`` subtree uses ``lr``/``warmup_steps``; every other top-level subtree uses the
critic's. Each group is clipped by its own global norm (as the reference trainer's separate
actor and critic optimisers).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("constant", "warmup_constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW settings. DGPO reference: actor lr 1e-6 (warmup ratio 0.285, then constant), critic
    lr 1e-5 (warmup ratio 0.015), wd 0.01, clip 1.0. Cold-start KD: lr 1e-4, cosine, no warmup."""

    lr: float = 1e-6
    critic_lr: float = 1e-5
    schedule: str = "warmup_constant"  # constant | warmup_constant | cosine
    warmup_steps: int = 0
    critic_warmup_steps: int = 0
    total_steps: int | None = None  # needed by cosine
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.schedule == "cosine" and not self.total_steps:
            raise ValueError("OptimConfig: schedule='cosine' needs total_steps")
        if self.lr < 0 or self.critic_lr < 0:
            raise ValueError("OptimConfig: learning rates must be >= 0")
        if self.warmup_steps < 0 or self.critic_warmup_steps < 0:
            raise ValueError("OptimConfig: warmup steps must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError("OptimConfig: grad_clip must be > 0 or None")

    @staticmethod
    def warmup_from_ratio(ratio: float, total_steps: int) -> int:
        """The reference configs give warmup as a ratio of the total steps."""
        return int(round(ratio * total_steps))


def make_schedule(
    peak_lr: float,
    schedule: str,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """constant; warmup_constant (linear 0 -> peak over warmup, then constant); cosine (linear
    warmup, then cosine decay to ``min_lr_ratio * peak`` at ``total_steps``)."""
    if schedule == "constant":
        return optax.constant_schedule(peak_lr)
    if schedule == "warmup_constant":
        if warmup_steps == 0:
            return optax.constant_schedule(peak_lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak_lr, warmup_steps), optax.constant_schedule(peak_lr)],
            [warmup_steps],
        )
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup_steps else peak_lr,
            peak_lr,
            max(warmup_steps, 0),
            total_steps,
            end_value=min_lr_ratio * peak_lr,
        )
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def _group(cfg: OptimConfig, lr: float, warmup: int) -> optax.GradientTransformation:
    sched = make_schedule(lr, cfg.schedule, warmup, cfg.total_steps, cfg.min_lr_ratio)
    parts = [] if cfg.grad_clip is None else [optax.clip_by_global_norm(cfg.grad_clip)]
    parts.append(
        optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    )
    return optax.chain(*parts)


def param_group_labels(params: dict) -> dict:
    """ "policy" for the ``params["policy"]`` subtree, "critic" for every other subtree."""
    if not isinstance(params, dict) or "policy" not in params:
        got = list(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            "make_optimizer expects params as {'policy': ..., ['value_head' | "
            f"'critic': ...]}}; got top-level keys {got}"
        )
    return {
        k: jax.tree.map(lambda _: "policy" if k == "policy" else "critic", v)
        for k, v in params.items()
    }


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW + clipping per group; the policy and the critic have their own lr and warmup."""
    return optax.multi_transform(
        {
            "policy": _group(cfg, cfg.lr, cfg.warmup_steps),
            "critic": _group(cfg, cfg.critic_lr, cfg.critic_warmup_steps),
        },
        param_group_labels,
    )


def learning_rates(cfg: OptimConfig, step: int) -> dict[str, float]:
    """Host-side view of both learning rates at ``step`` (for logging)."""
    pol = make_schedule(cfg.lr, cfg.schedule, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio)
    cri = make_schedule(
        cfg.critic_lr, cfg.schedule, cfg.critic_warmup_steps, cfg.total_steps, cfg.min_lr_ratio
    )
    return {"lr": float(pol(step)), "critic_lr": float(cri(step))}
