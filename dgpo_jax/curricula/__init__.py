"""Teacher-guided curricula: what a run changes between steps around a fixed objective.

- `dgpo_jax.curricula.config`: `CurriculumConfig`, the rollout, schedule and data-mixing knobs
  (Guided-OPD teacher turns, TrOPD teacher prefixes, GKD/DistiLLM student-data share, the
  DistiLLM replay buffer, TAID's interpolation t), and each preset's defaults.
- `dgpo_jax.curricula.schedules`: the host-side schedules (pure Python floats).
- `dgpo_jax.curricula.replay`: DistiLLM's replay buffer.
"""
