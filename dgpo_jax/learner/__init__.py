"""The learner: the fused update step, its train state and the optimizer.

- `dgpo_jax.learner.update_step`: one compiled program per objective (student and teacher
  forwards, advantages, the loss terms, gradient accumulation, the optax update).
- `dgpo_jax.learner.train_state`: the state pytree and the non-finite guard.
- `dgpo_jax.learner.optim`: AdamW with the actor/critic learning-rate schedules.
- `dgpo_jax.learner.scoring`: behaviour/reference log-probs of whole sequences.
- `dgpo_jax.learner.batches`: rollouts -> update batches (rewards, padding, micro-batches).
"""
