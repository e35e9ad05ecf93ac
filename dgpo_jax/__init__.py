"""dgpo_jax: teacher-guided RL (DGPO and friends) for compact search agents, in JAX.

The public API is re-exported here. Modules with heavy imports (orbax, transformers, optax,
the retrieval client) load on first attribute access, so that ``import dgpo_jax`` stays quick.
"""

import importlib

__version__ = "0.1.0"

from dgpo_jax.models import (
    PRESETS,
    KVCache,
    Qwen2Config,
    cast_params,
    forward,
    forward_hidden,
    forward_with_cache,
    get_preset,
    greedy_generate,
    init_cache,
    init_params,
    lm_logits,
    load_hf,
    positions_from_segments,
    save_hf,
    split_cache,
    split_layers,
)
from dgpo_jax.parallel.sharding import ShardingPlan, make_mesh, plan_from_config

_LAZY = {
    # errors about the user's input (dgpo_jax.errors: no heavy imports)
    "UserError": "dgpo_jax.errors",
    "MissingFileError": "dgpo_jax.errors",
    "ModelFormatError": "dgpo_jax.errors",
    "NothingToTrainError": "dgpo_jax.errors",
    "NotReproducedError": "dgpo_jax.errors",
    "DataError": "dgpo_jax.data.search_r1",
    "ConfigError": "dgpo_jax.config",
    "RetrievalError": "dgpo_jax.retrieval.errors",
    "load_tokenizer": "dgpo_jax.models.tokenizer",
    "Checkpointer": "dgpo_jax.checkpoint.checkpointer",
    "CheckpointNotFoundError": "dgpo_jax.checkpoint.checkpointer",
    "CheckpointMismatchError": "dgpo_jax.checkpoint.checkpointer",
    "abstract_like": "dgpo_jax.checkpoint.checkpointer",
    "apply_gradients": "dgpo_jax.learner.train_state",
    # retrieval
    "Document": "dgpo_jax.retrieval",
    "HttpRetriever": "dgpo_jax.retrieval",
    "InProcessRetriever": "dgpo_jax.retrieval",
    "format_documents": "dgpo_jax.retrieval",
    "information_observation": "dgpo_jax.retrieval",
    "format_prompt": "dgpo_jax.retrieval",
    "parse_action": "dgpo_jax.retrieval",
    # objectives and the update step
    "ObjectiveConfig": "dgpo_jax.objectives",
    "get_objective": "dgpo_jax.objectives",
    "OBJECTIVE_PRESETS": "dgpo_jax.objectives",
    "CurriculumConfig": "dgpo_jax.curricula.config",
    "get_curriculum": "dgpo_jax.curricula.config",
    "make_update_step": "dgpo_jax.learner.update_step",
    "create_update_state": "dgpo_jax.learner.update_step",
    "OptimConfig": "dgpo_jax.learner.optim",
    "abstract_batch": "dgpo_jax.objectives.batch",
    "sequence_logprobs": "dgpo_jax.learner.scoring",
    # packed batches
    "pack_trajectories": "dgpo_jax.learner.packing",
    "pack_for_update": "dgpo_jax.learner.packing",
    "PackedLayout": "dgpo_jax.learner.packing",
    # sampler
    "Sampler": "dgpo_jax.sampler",
    "SamplerConfig": "dgpo_jax.sampler",
    "stop_sequences_for": "dgpo_jax.sampler",
    "RolloutRetrievalError": "dgpo_jax.sampler",
    # evaluation and data
    "exact_match": "dgpo_jax.evaluation",
    "extract_answer": "dgpo_jax.evaluation",
    "arcap_summary": "dgpo_jax.evaluation",
    "greedy_vs_sampled": "dgpo_jax.evaluation",
    "bootstrap_mean_ci": "dgpo_jax.evaluation.stats",
    "paired_difference": "dgpo_jax.evaluation.stats",
    "t_interval": "dgpo_jax.evaluation.stats",
    "mcnemar_exact": "dgpo_jax.evaluation.stats",
    "summarize_comparison": "dgpo_jax.launch.compare",
    "read_search_r1_parquet": "dgpo_jax.data.search_r1",
    # run configs
    "base_config": "dgpo_jax.config",
    "load_config": "dgpo_jax.config",
    "TrainState": "dgpo_jax.learner.train_state",
    "create_train_state": "dgpo_jax.learner.train_state",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dgpo_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = sorted([n for n in globals() if not n.startswith("_") and n != "importlib"] + list(_LAZY))
