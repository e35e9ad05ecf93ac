"""The compiled multi-turn search sampler (see docs/sampler.md).

from dgpo_jax.sampler import Sampler, SamplerConfig, stop_sequences_for

config = SamplerConfig(**stop_sequences_for(tokenizer), max_turns=4, temperature=1.0)
rollout = Sampler(model_config, config, tokenizer, retriever).generate(params, prompts, seed=0)
"""

from dgpo_jax.sampler.config import FINISH_REASONS, SamplerConfig, stop_sequences_for
from dgpo_jax.sampler.host import (
    RolloutHost,
    RolloutRetrievalError,
    prepare_prefixes,
    prepare_prompts,
    prompt_widths,
)
from dgpo_jax.sampler.loop import RolloutArrays, SamplerLoop, rollout_program
from dgpo_jax.sampler.rollout import Rollout, Sampler
from dgpo_jax.sampler.sampling import sample_tokens, sampling_logprobs

__all__ = [
    "FINISH_REASONS",
    "SamplerConfig",
    "stop_sequences_for",
    "RolloutHost",
    "RolloutRetrievalError",
    "prompt_widths",
    "SamplerLoop",
    "prepare_prefixes",
    "prepare_prompts",
    "RolloutArrays",
    "rollout_program",
    "Rollout",
    "Sampler",
    "sample_tokens",
    "sampling_logprobs",
]
