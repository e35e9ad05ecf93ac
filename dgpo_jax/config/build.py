"""The run config -> the objects the program uses, each built in this one place: the objective,
the curriculum, the sampler config and the optimizer config."""

from __future__ import annotations

import ml_collections

from dgpo_jax.config.schema import ConfigError
from dgpo_jax.curricula.config import CurriculumConfig, check_compatible, get_curriculum
from dgpo_jax.learner.optim import OptimConfig
from dgpo_jax.objectives.config import ObjectiveConfig
from dgpo_jax.objectives.presets import get_objective
from dgpo_jax.sampler.config import SamplerConfig, stop_sequences_for


def _set_knobs(section: ml_collections.ConfigDict, exclude: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in section.items() if k not in exclude and v is not None}


def build_objective(cfg: ml_collections.ConfigDict) -> ObjectiveConfig:
    """``objective.preset`` with every knob the config sets (the rest keep the preset's)."""
    try:
        return get_objective(cfg.objective.preset, **_set_knobs(cfg.objective, ("preset",)))
    except ValueError as e:
        raise ConfigError(f"config.objective: {e}") from None


def build_curriculum(cfg: ml_collections.ConfigDict) -> CurriculumConfig:
    """The preset's curriculum with every knob the config sets; checked against the objective."""
    try:
        curriculum = get_curriculum(cfg.objective.preset, **_set_knobs(cfg.curriculum))
        check_compatible(build_objective(cfg), curriculum)
    except ValueError as e:
        raise ConfigError(f"config.curriculum: {e}") from None
    return curriculum


def sampler_config(
    cfg: ml_collections.ConfigDict, tokenizer, greedy: bool = False, max_prefix_length: int = 0
) -> SamplerConfig:
    """``config.sampler`` with the tokenizer's stop sequences; ``max_prefix_length`` is the
    longest teacher prefix a rollout may carry (TrOPD: the curriculum's prefix length)."""
    s = cfg.sampler
    return SamplerConfig(
        **stop_sequences_for(tokenizer),
        cache_len=s.cache_len,
        max_prompt_length=s.max_prompt_length,
        max_new_tokens_per_turn=s.max_new_tokens_per_turn,
        max_new_tokens=s.max_new_tokens,
        max_obs_length=s.max_obs_length,
        max_turns=s.max_turns,
        greedy=greedy,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        ingest_chunk=s.ingest_chunk,
        max_prefix_length=max_prefix_length,
        wave_fraction=s.wave_fraction,
        wave_max_wait=s.wave_max_wait,
        decode_path=s.decode_path,
        decode_layers=s.decode_layers,
        decode_attention=s.decode_attention,
        chunk_attention=s.chunk_attention,
        host_calls=s.host_calls,
    )


def optim_config(
    cfg: ml_collections.ConfigDict,
    total_updates: int,
    lr: float | None = None,
    schedule: str | None = None,
    warmup_ratio: float | None = None,
) -> OptimConfig:
    """``config.optim`` for a run of ``total_updates`` optimizer steps. ``lr``, ``schedule`` and
    ``warmup_ratio`` replace the actor's ``optim.actor_lr``, ``optim.schedule`` and
    ``optim.actor_warmup_ratio`` when given (the cold start's own ``coldstart.*`` values)."""
    o = cfg.optim
    schedule = schedule or o.schedule
    ratio = o.actor_warmup_ratio if warmup_ratio is None else warmup_ratio
    actor_warmup = OptimConfig.warmup_from_ratio(ratio, total_updates)
    critic_warmup = OptimConfig.warmup_from_ratio(o.critic_warmup_ratio, total_updates)
    if schedule == "constant" and (actor_warmup or critic_warmup):
        schedule = "warmup_constant"
    return OptimConfig(
        lr=lr if lr is not None else o.actor_lr,
        critic_lr=o.critic_lr,
        schedule=schedule,
        warmup_steps=actor_warmup,
        critic_warmup_steps=critic_warmup,
        total_steps=max(total_updates, 1),
        weight_decay=o.weight_decay,
        grad_clip=o.grad_clip,
    )
