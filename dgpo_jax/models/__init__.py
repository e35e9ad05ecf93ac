"""Qwen2 / Qwen2.5 in Flax: config, model, KV cache, Hugging Face I/O."""

# (The dispatcher itself stays `dgpo_jax.models.attention.attention`: exporting it here would
# shadow the submodule.)
from dgpo_jax.models.attention import resolve_kernel
from dgpo_jax.models.config import ATTENTION_KERNELS, PRESETS, Qwen2Config, get_preset, parse_dtype
from dgpo_jax.models.hf_io import load_hf, save_hf
from dgpo_jax.models.qwen2 import (
    KVCache,
    cast_params,
    causal_mask,
    forward,
    forward_hidden,
    forward_with_cache,
    greedy_generate,
    init_cache,
    init_params,
    lm_logits,
    param_logical_axes,
    param_shapes,
    positions_from_mask,
    positions_from_segments,
    split_cache,
    split_layers,
)
