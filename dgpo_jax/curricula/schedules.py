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
    reference_loss: float,
    val_loss: float,
    step: float = 0.1,
    rise: float = 0.1,
) -> tuple[float, float]:
    """DistiLLM's adaptive student-data share after a validation: when ``val_loss >=
    reference_loss + rise`` the share grows by ``step`` (capped at 1) and the reference moves to
    ``val_loss``; otherwise neither changes (jongwooko/distillm ``finetune.py``: the comparison
    point moves only when the share rises; the first reference is a validation before
    training). Returns (share, reference_loss)."""
    if val_loss >= reference_loss + rise:
        return min(1.0, share + step), val_loss
    return share, reference_loss


def distillm_data_source(
    r: float, share: float, progress: float, buffer_len: int, capacity: int
) -> str:
    """Where DistiLLM's batch comes from this step, for a uniform draw ``r``: ``"student"``
    (fresh student samples, pushed to the replay buffer) with probability
    ``share * (1 - progress)`` (the decreasing replay ratio) or whenever ``r < share`` while the
    buffer is not yet full; else ``"replay"`` (a sample of the buffer) when ``r < share``; else
    ``"teacher"`` (jongwooko/distillm ``finetune.py``, ``--replay-ratio decreasing``)."""
    if r < share * (1.0 - progress) or (r < share and buffer_len < capacity):
        return "student"
    if r < share:
        return "replay"
    return "teacher"


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
) -> tuple[float, float]:
    """TAID's adaptive t after a step with ``loss`` (SakanaAI/TAID
    ``src/distil_losses/taid.py`` update_t). The first call (``previous_loss`` None) only
    records the loss: t and the momentum stay. Then ``m <- beta m + (1 - beta) (L_prev - L) /
    (L_prev + 1e-15)`` and ``t <- min(t_end, max(t_target, t + alpha sigmoid(m) (1 - t)))``,
    ``t_target = t_start + (t_end - t_start) progress`` with ``progress`` = the 0-based step
    over the total. Returns (t, m)."""
    if previous_loss is None:
        return t, momentum
    momentum = beta * momentum + (1 - beta) * (previous_loss - loss) / (previous_loss + 1e-15)
    target = t_start + (t_end - t_start) * progress
    sig = 1.0 / (1.0 + math.exp(-momentum))
    return min(t_end, max(target, t + alpha * sig * (1.0 - t))), momentum
