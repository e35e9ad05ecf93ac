"""``CurriculumConfig``: what a run changes between steps around a fixed objective.

The objective (``dgpo_jax.objectives.ObjectiveConfig``) says what one update computes on one
batch. The curriculum says where the batch comes from and how that changes over the run: the
teacher writing some turns (Guided-OPD) or the first turn of some rollouts (TrOPD prefixes), the
share of student-generated data in off-policy KD (GKD, DistiLLM) and DistiLLM's replay buffer,
and TAID's interpolation t. Presets of both share names (``get_curriculum("gkd")``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dgpo_jax.objectives.config import ObjectiveConfig

GUIDED_SCHEDULES = ("linear", "cosine", "exponential")


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    """All curriculum knobs (defaults: none of them on)."""

    # --- Guided-OPD: the teacher writes a turn with probability p(k), decaying to 0 ------------
    guided_p0: float = 0.0  # p at step 0 (UNVERIFIED: the paper gives no value)
    guided_schedule: str = "linear"  # linear | cosine | exponential (UNVERIFIED shape)
    guided_decay_rate: float = 5.0  # exponential schedule steepness
    # --- TrOPD: some rollouts continue from a teacher-written first turn ------------------------
    teacher_prefix_share: float = 0.0  # share of rollouts with a teacher prefix
    teacher_prefix_tokens: int = 0  # prefix length in tokens (UNVERIFIED)
    # --- off-policy KD data mixing (GKD, DistiLLM) ---------------------------------------------
    student_data_fraction: float = 0.0  # GKD lambda; DistiLLM's initial student-data share
    adaptive_student_share: bool = False  # DistiLLM: the share rises with the validation loss
    distillm_share_step: float = 0.1  # DistiLLM: share increment ...
    distillm_loss_rise: float = 0.1  # ... when the validation loss rises by more than this
    replay_buffer_size: int = 0  # DistiLLM: student rollouts go through a buffer of this size
    # --- TAID: the interpolation t of p_t = softmax((1-t) sg(z_S) + t z_T) ----------------------
    taid_t_start: float = 0.4
    taid_t_end: float = 1.0
    taid_alpha: float = 5e-4  # step size of the adaptive update
    taid_momentum: float = 0.99  # EMA of the relative loss decrease

    def __post_init__(self):
        e = []
        if self.guided_schedule not in GUIDED_SCHEDULES:
            e.append(f"guided_schedule={self.guided_schedule!r} is not one of {GUIDED_SCHEDULES}")
        for f in ("teacher_prefix_share", "guided_p0", "student_data_fraction"):
            if not 0 <= getattr(self, f) <= 1:
                e.append(f"{f} must be in [0, 1], got {getattr(self, f)}")
        if self.teacher_prefix_share > 0 and self.teacher_prefix_tokens < 1:
            e.append(
                f"teacher_prefix_share={self.teacher_prefix_share} needs teacher_prefix_tokens "
                f">= 1 (got {self.teacher_prefix_tokens})"
            )
        if self.teacher_prefix_tokens < 0 or self.replay_buffer_size < 0:
            e.append("teacher_prefix_tokens and replay_buffer_size must be >= 0")
        if self.guided_decay_rate <= 0:
            e.append("guided_decay_rate must be > 0")
        if not 0 <= self.taid_t_start <= self.taid_t_end <= 1:
            e.append("need 0 <= taid_t_start <= taid_t_end <= 1")
        if e:
            raise ValueError("CurriculumConfig: " + "; ".join(e))

    @property
    def teacher_in_rollout(self) -> bool:
        """The rollout needs the teacher's weights (teacher turns or prefixes)."""
        return self.guided_p0 > 0 or self.teacher_prefix_share > 0

    @property
    def mixes_student_data(self) -> bool:
        return self.student_data_fraction > 0 or self.adaptive_student_share

    def replace(self, **knobs) -> CurriculumConfig:
        return _replace_checked(self, knobs)


# Each preset's curriculum where it is not the default (the rest of a preset is its objective).
CURRICULUM_PRESETS: dict[str, dict[str, Any]] = {
    "guided_opd": dict(guided_p0=0.5),  # UNVERIFIED p0
    "gkd": dict(student_data_fraction=0.5),  # GKD lambda 0.5
    "distillm": dict(adaptive_student_share=True, replay_buffer_size=1000),
}


def curriculum_knob_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(CurriculumConfig))


def _replace_checked(cfg: CurriculumConfig, knobs: dict[str, Any]) -> CurriculumConfig:
    unknown = sorted(set(knobs) - set(curriculum_knob_names()))
    if unknown:
        raise ValueError(
            f"unknown curriculum knob(s) {unknown}; known: {list(curriculum_knob_names())}"
        )
    return dataclasses.replace(cfg, **knobs)


def get_curriculum(preset: str, **knobs: Any) -> CurriculumConfig:
    """The curriculum of objective preset ``preset`` (the default one for most), with ``knobs``
    applied last."""
    return _replace_checked(CurriculumConfig(), {**CURRICULUM_PRESETS.get(preset, {}), **knobs})


def check_compatible(objective: ObjectiveConfig, curriculum: CurriculumConfig) -> None:
    """Raises ``ValueError`` for a curriculum that the objective cannot use."""
    e = []
    on_policy = objective.uses_policy
    if curriculum.teacher_in_rollout and not on_policy:
        e.append(
            "teacher turns/prefixes (guided_p0, teacher_prefix_share) mix the teacher into "
            "on-policy rollouts; this objective has no policy loss"
        )
    if curriculum.teacher_prefix_share > 0 and objective.teacher_token_loss == "none":
        e.append(
            "teacher_prefix_share > 0: the prefix tokens get no loss; set the objective's "
            "teacher_token_loss (TrOPD: fkl)"
        )
    if (curriculum.mixes_student_data or curriculum.replay_buffer_size) and on_policy:
        e.append(
            "student_data_fraction / adaptive_student_share / replay_buffer_size mix data for "
            "off-policy KD; this objective samples from the student at every step already"
        )
    if e:
        raise ValueError(f"objective {objective.name!r} and its curriculum: " + "; ".join(e))


def needs_teacher_model(objective: ObjectiveConfig, curriculum: CurriculumConfig) -> bool:
    """A run needs teacher weights: in the update, for rollouts (Guided-OPD turns, TrOPD
    prefixes) or as the data source (the KD family)."""
    return objective.teacher_in_update or curriculum.teacher_in_rollout or not objective.uses_policy
