"""Host-side schedules between steps (pure Python floats): Guided-OPD's teacher-turn
probability, DistiLLM's student-data share, TAID's interpolation t."""

from __future__ import annotations

import math

def teacher_turn_probability(
    step: int, total_steps: int, p0: float, shape: str = "linear", decay_rate: float = 5.0
) -> float:
    """Guided-OPD curriculum p(k): p0 at step 0, decaying to exactly 0 at ``total_steps``.

    linear: p0 (1 - x); cosine: p0 (1 + cos(pi x)) / 2; exponential: p0 (e^{-r x} - e^{-r}) /
    (1 - e^{-r}), with x = step / total_steps clipped to [0, 1].
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    x = min(max(step / total_steps, 0.0), 1.0)
    if shape == "linear":
        return p0 * (1.0 - x)
    if shape == "cosine":
        return p0 * 0.5 * (1.0 + math.cos(math.pi * x))
    if shape == "exponential":
        if decay_rate <= 0:
            raise ValueError("exponential schedule needs decay_rate > 0")
        return (
            p0 * (math.exp(-decay_rate * x) - math.exp(-decay_rate)) / (1 - math.exp(-decay_rate))
        )
    raise ValueError(f"unknown schedule {shape!r}; expected linear, cosine or exponential")


def distillm_student_share(
    share: float,
    previous_val_loss: float | None,
    val_loss: float,
    step: float = 0.1,
    rise: float = 0.1,
) -> float:
    """DistiLLM adaptive student-data share: +step (capped at 1) when the validation loss rose
    by more than ``rise`` since the previous evaluation; unchanged otherwise."""
    if previous_val_loss is not None and val_loss - previous_val_loss > rise:
        return min(1.0, share + step)
    return share


def taid_update(
    t: float,
    momentum: float,
    previous_loss: float | None,
    loss: float,
    progress: float,
    t_start: float = 0.4,
    t_end: float = 1.0,
    alpha: float = 5e-4,
    beta: float = 0.99,
    eps: float = 1e-8,
) -> tuple[float, float]:
    """TAID adaptive t: ``m <- beta m + (1 - beta) * (L_prev - L) / L_prev``;
    ``t <- min(1, max(t_target, t + alpha * sigmoid(m) * (1 - t)))`` with the linear target
    ``t_target = t_start + (t_end - t_start) * progress``. Returns (t, m)."""
    if previous_loss is not None:
        momentum = beta * momentum + (1 - beta) * (previous_loss - loss) / (
            abs(previous_loss) + eps
        )
    target = t_start + (t_end - t_start) * min(max(progress, 0.0), 1.0)
    sig = 1.0 / (1.0 + math.exp(-momentum))
    return min(1.0, max(target, t + alpha * sig * (1.0 - t))), momentum
