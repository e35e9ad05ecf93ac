"""Params-only checkpoints, and the student's weights in any checkpoint this project writes.

A checkpoint holds either ``{"params": ...}`` (``save_params_checkpoint``, what
``convert hf-to-ckpt`` and the cold start write) or a full train state; its JSON metadata
carries the model config under ``model_config`` (HF format).
"""

from __future__ import annotations

from typing import Any

import jax

from dgpo_jax.checkpoint.checkpointer import Checkpointer
from dgpo_jax.models import Qwen2Config
from dgpo_jax.models.config import parse_dtype


def save_params_checkpoint(
    config: Qwen2Config,
    params: Any,
    directory: str,
    step: int = 0,
    extra_metadata: dict | None = None,
) -> None:
    """Write ``{"params": params}`` as checkpoint ``step`` with the model config in metadata."""
    metadata = {"model_config": config.to_hf_dict(), "kind": "params"}
    metadata.update(extra_metadata or {})
    with Checkpointer(directory, max_to_keep=None) as ckpt:
        ckpt.save(step, {"params": params}, metadata, force=True)
        ckpt.wait_until_finished()


def policy_params(state: Any, source: str = "checkpoint") -> Any:
    """The student's weights in a restored checkpoint: a params checkpoint (``{"params": p}``,
    ``save_params_checkpoint``), a state with ``params``, or a training run's
    (``{"train": UpdateState}``, whose params are ``{"policy": ..., "critic": ...}``)."""
    if isinstance(state, dict) and "train" in state and "params" not in state:
        state = state["train"]
    params = state.get("params") if isinstance(state, dict) else getattr(state, "params", None)
    if params is None:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise KeyError(
            f"{source}: no model weights in the checkpoint (top level: {keys}); "
            "expected 'params' or 'train.params'"
        )
    if isinstance(params, dict) and "policy" in params:
        params = params["policy"]
    return params


def load_params_checkpoint(
    directory: str, step: int | None = None, dtype: Any = None
) -> tuple[Qwen2Config, Any, dict]:
    """Read (config, params, metadata) from any dgpo_jax checkpoint (see ``policy_params``)."""
    with Checkpointer(directory) as ckpt:
        metadata = ckpt.restore_metadata(step)
        if "model_config" not in metadata:
            raise KeyError(
                f"{directory}: checkpoint metadata has no 'model_config' "
                f"(keys: {sorted(metadata)}); it was not written by dgpo_jax"
            )
        config = Qwen2Config.from_hf_dict(metadata["model_config"], source=f"{directory} metadata")
        state, _ = ckpt.restore(step)
    params = policy_params(state, directory)
    if dtype is not None:
        dt = parse_dtype(dtype)
        params = jax.tree.map(lambda x: x.astype(dt), params)
    return config, params, metadata
