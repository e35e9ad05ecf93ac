"""dgpo_jax: teacher-guided RL (DGPO and friends) for compact search agents, in JAX."""

__version__ = "0.1.0"

from dgpo_jax.models import (PRESETS, KVCache, Qwen2Config, forward, forward_hidden,
                             forward_with_cache, get_preset, greedy_generate, init_cache,
                             init_params, lm_logits, load_hf, save_hf)
