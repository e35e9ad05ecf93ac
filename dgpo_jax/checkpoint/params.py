"""Params-only checkpoints, and the student's weights in any checkpoint this project writes.

A checkpoint holds either ``{"params": ...}`` (``save_params_checkpoint``, what
``convert hf-to-ckpt`` and the cold start write) or a full train state; its JSON metadata
carries the model config under ``model_config`` (HF format).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np

from dgpo_jax.checkpoint.checkpointer import Checkpointer
from dgpo_jax.errors import MissingFileError, ModelFormatError
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


def params_fingerprint(params: Any) -> str:
    """The sha256 of a parameter tree: each leaf's path, dtype, shape and bytes, in path order.
    Equal fingerprints mean bit-for-bit the same weights (how a stage run again on another
    machine is checked against the recorded run, `dgpo_jax.launch.compare`)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        digest.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def checkpoint_fingerprint(directory: str) -> str:
    """`params_fingerprint` of the weights in a checkpoint (`load_params_checkpoint`)."""
    return params_fingerprint(load_params_checkpoint(directory)[1])


def model_source_kind(source: str, role: str = "model") -> str:
    """What a model source names: ``"preset"`` (``preset:NAME``), ``"hf"`` (a directory with
    a ``config.json``) or ``"checkpoint"`` (a dgpo_jax checkpoint directory: numbered step
    directories). Anything else is a one-line error naming ``role`` (the config field) and
    what is missing: a directory with weights but no ``config.json`` is reported as such, not
    as an empty checkpoint directory."""
    if source.startswith("preset:"):
        return "preset"
    expected = "a Hugging Face model directory, a dgpo_jax checkpoint directory or preset:NAME"
    if not os.path.exists(source):
        raise MissingFileError(f"{role} {source!r}: no such directory (expected {expected})")
    if not os.path.isdir(source):
        raise ModelFormatError(f"{role} {source!r}: is a file (expected {expected})")
    if os.path.isfile(os.path.join(source, "config.json")):
        return "hf"
    names = sorted(os.listdir(source))
    if any(n.isdigit() and os.path.isdir(os.path.join(source, n)) for n in names):
        return "checkpoint"
    weights = [n for n in names if n.endswith((".safetensors", ".safetensors.index.json", ".bin"))]
    if weights:
        raise ModelFormatError(
            f"{role} {source!r}: a Hugging Face model directory without its config.json "
            f"(it has {', '.join(weights[:3])}{', ...' if len(weights) > 3 else ''})",
            hint="copy config.json from where the weights came from",
        )
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "empty"
    raise ModelFormatError(
        f"{role} {source!r}: neither a Hugging Face model directory (no config.json) nor a "
        f"dgpo_jax checkpoint (no step directories); contents: {shown}"
    )
