"""Persistence: orbax train-state checkpoints (`dgpo_jax.checkpoint.checkpointer`), params-only
checkpoints and the policy of a run (`dgpo_jax.checkpoint.params`), the Hugging Face converter
command (`python -m dgpo_jax.checkpoint.convert`), and atomic file writes
(`dgpo_jax.checkpoint.fileio`)."""
