"""Hugging Face safetensors directories <-> dgpo_jax parameter trees.

Loading reads tensors lazily (``safe_open``) and builds each parameter leaf directly with the
sharding it will live in (``jax.make_array_from_callback``): every device shard reads only the
layers and slices it needs, in the target dtype, so the model never exists as one host copy in
float32. Saving streams leaves to safetensors shards and commits the directory atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from dgpo_jax.errors import MissingFileError, ModelFormatError, OutputExistsError
from dgpo_jax.models import qwen2
from dgpo_jax.models.config import GENERATION_CONFIG_FILE, Qwen2Config, parse_dtype
from dgpo_jax.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

_FILE_DTYPES = {"F32": np.float32, "BF16": jnp.bfloat16, "F16": np.float16}


# ----------------------------------------------------------------------------------------------
# Layout: one entry per parameter leaf. ``hf`` is the HF key (``{i}`` = layer index); ``to_ours``
# maps an HF tensor to our layout, ``to_hf`` back.
# ----------------------------------------------------------------------------------------------
class _Leaf:
    def __init__(
        self, path: tuple[str, ...], hf: str, to_ours: Callable, to_hf: Callable, per_layer: bool
    ):
        self.path, self.hf, self.to_ours, self.to_hf, self.per_layer = (
            path,
            hf,
            to_ours,
            to_hf,
            per_layer,
        )


def _layout(c: Qwen2Config) -> list[_Leaf]:
    d, hd = c.hidden_size, c.dim_per_head
    h, kv = c.num_attention_heads, c.num_key_value_heads
    ident = lambda x: x
    p = "model.layers.{i}."

    def proj(n):  # HF [n*hd, d] <-> ours [d, n, hd]
        return (lambda w: w.T.reshape(d, n, hd), lambda w: w.reshape(d, n * hd).T)

    def bias(n):  # HF [n*hd] <-> ours [n, hd]
        return (lambda b: b.reshape(n, hd), lambda b: b.reshape(n * hd))

    leaves = [
        _Leaf(("embed_tokens",), "model.embed_tokens.weight", ident, ident, False),
        _Leaf(("final_norm",), "model.norm.weight", ident, ident, False),
        _Leaf(("layers", "input_norm"), p + "input_layernorm.weight", ident, ident, True),
        _Leaf(
            ("layers", "post_attention_norm"),
            p + "post_attention_layernorm.weight",
            ident,
            ident,
            True,
        ),
        _Leaf(("layers", "attn", "q_kernel"), p + "self_attn.q_proj.weight", *proj(h), True),
        _Leaf(("layers", "attn", "q_bias"), p + "self_attn.q_proj.bias", *bias(h), True),
        _Leaf(("layers", "attn", "k_kernel"), p + "self_attn.k_proj.weight", *proj(kv), True),
        _Leaf(("layers", "attn", "k_bias"), p + "self_attn.k_proj.bias", *bias(kv), True),
        _Leaf(("layers", "attn", "v_kernel"), p + "self_attn.v_proj.weight", *proj(kv), True),
        _Leaf(("layers", "attn", "v_bias"), p + "self_attn.v_proj.bias", *bias(kv), True),
        _Leaf(
            ("layers", "attn", "o_kernel"),
            p + "self_attn.o_proj.weight",
            lambda w: w.T.reshape(h, hd, d),
            lambda w: w.reshape(h * hd, d).T,
            True,
        ),
        _Leaf(
            ("layers", "mlp", "gate_kernel"),
            p + "mlp.gate_proj.weight",
            np.transpose,
            np.transpose,
            True,
        ),
        _Leaf(
            ("layers", "mlp", "up_kernel"),
            p + "mlp.up_proj.weight",
            np.transpose,
            np.transpose,
            True,
        ),
        _Leaf(
            ("layers", "mlp", "down_kernel"),
            p + "mlp.down_proj.weight",
            np.transpose,
            np.transpose,
            True,
        ),
    ]
    if not c.tie_word_embeddings:
        leaves.append(_Leaf(("lm_head",), "lm_head.weight", np.transpose, np.transpose, False))
    return leaves


def _hf_shape(leaf: _Leaf, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = our_shape[1:] if leaf.per_layer else our_shape
    return tuple(leaf.to_hf(np.empty(shape, np.int8)).shape)


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
class _SafetensorsDir:
    """Lazy view of the tensors of a (single or sharded) safetensors checkpoint."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ModelFormatError(
                        f"{index}: not a valid safetensors index ({e!r})"
                    ) from None
            self.key_to_file = {k: os.path.join(path, v) for k, v in weight_map.items()}
            for fname in sorted(set(self.key_to_file.values())):
                if not os.path.isfile(fname):
                    raise MissingFileError(
                        f"{index} names {os.path.basename(fname)}, which is missing"
                    )
        elif os.path.isfile(single):
            with safe_open(single, framework="numpy") as f:
                self.key_to_file = {k: single for k in f.keys()}
        else:
            found = sorted(os.listdir(path))
            hint = (
                (
                    " (PyTorch .bin checkpoints are not read: they are pickles; re-save with "
                    "safe_serialization=True)"
                )
                if any(x.endswith(".bin") for x in found)
                else ""
            )
            raise MissingFileError(
                f"{path}: no model.safetensors or model.safetensors.index.json{hint}; found {found}"
            )
        self._handles: dict[str, Any] = {}

    def _handle(self, key: str):
        fname = self.key_to_file[key]
        if fname not in self._handles:
            self._handles[fname] = safe_open(fname, framework="numpy")
        return self._handles[fname]

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        s = self._handle(key).get_slice(key)
        return tuple(s.get_shape()), s.get_dtype()

    def get(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)

    def close(self):
        self._handles.clear()


def _default_sharding_tree(shapes):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: dev, shapes)


def load_hf(
    path: str, dtype: Any = "bfloat16", shardings: Any = None, plan: Any = None
) -> tuple[Qwen2Config, dict]:
    """Load a local Hugging Face Qwen2 directory into a parameter tree.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      dtype: parameter dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
      shardings: optional tree of ``jax.sharding.Sharding`` matching the parameter tree.
      plan: optional ``dgpo_jax.parallel.sharding.ShardingPlan``; its parameter shardings are used.
    Returns:
      ``(config, params)``; every leaf is created directly in its sharding.
    """
    dtype = parse_dtype(dtype)
    config = Qwen2Config.from_hf_dir(path)
    files = _SafetensorsDir(path)
    shapes = qwen2.param_shapes(config, dtype)
    if shardings is None:
        shardings = (
            plan.param_shardings(config) if plan is not None else _default_sharding_tree(shapes)
        )
    layout = _layout(config)
    _validate(files, layout, shapes, config)

    params: dict = {}
    for leaf in layout:
        shape = _get(shapes, leaf.path).shape
        sharding = _get(shardings, leaf.path)

        def read(index, leaf=leaf, shape=shape):
            if leaf.per_layer:
                layers = range(config.num_hidden_layers)[index[0]]
                blocks = [
                    np.asarray(leaf.to_ours(files.get(leaf.hf.format(i=i))))[index[1:]]
                    for i in layers
                ]
                return np.stack(blocks).astype(dtype)
            return np.asarray(leaf.to_ours(files.get(leaf.hf)))[index].astype(dtype)

        _set(params, leaf.path, jax.make_array_from_callback(shape, sharding, read))
    files.close()
    return config, params


def _validate(files: _SafetensorsDir, layout, shapes, config: Qwen2Config) -> None:
    """Every expected tensor exists with the right shape and a supported dtype."""
    expected = {}
    for leaf in layout:
        hf_shape = _hf_shape(leaf, _get(shapes, leaf.path).shape)
        keys = (
            [leaf.hf.format(i=i) for i in range(config.num_hidden_layers)]
            if leaf.per_layer
            else [leaf.hf]
        )
        for k in keys:
            expected[k] = hf_shape
    missing = [k for k in expected if k not in files]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelFormatError(f"{files.path}: missing tensors {missing[:5]}{more}")
    for k, want in expected.items():
        got, dt = files.shape_dtype(k)
        if got != want:
            raise ModelFormatError(
                f"{files.path}: tensor {k} has shape {got}, expected {want} for this config.json"
            )
        if dt not in _FILE_DTYPES:
            raise ModelFormatError(
                f"{files.path}: tensor {k} has unsupported dtype {dt}; "
                f"supported: {sorted(_FILE_DTYPES)}"
            )
    extra = [
        k
        for k in files.key_to_file
        if k not in expected and not k.endswith("inv_freq") and k != "lm_head.weight"
    ]
    if extra:
        log.warning(
            "%s: ignoring %d unexpected tensors, e.g. %s", files.path, len(extra), extra[:3]
        )


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _hf_tensors(config: Qwen2Config, params: dict, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF key, host array) one tensor at a time (a layer slice is fetched alone)."""
    for leaf in _layout(config):
        value = _get(params, leaf.path)
        if leaf.per_layer:
            for i in range(config.num_hidden_layers):
                arr = np.asarray(jax.device_get(value[i])).astype(dtype)
                yield leaf.hf.format(i=i), np.ascontiguousarray(leaf.to_hf(arr))
        else:
            arr = np.asarray(jax.device_get(value)).astype(dtype)
            yield leaf.hf, np.ascontiguousarray(leaf.to_hf(arr))


def _check_params(config: Qwen2Config, params: dict) -> None:
    shapes = qwen2.param_shapes(config)
    for leaf in _layout(config):
        try:
            got = tuple(_get(params, leaf.path).shape)
        except (KeyError, TypeError):
            raise KeyError(f"params has no leaf {'/'.join(leaf.path)}") from None
        want = _get(shapes, leaf.path).shape
        if got != want:
            raise ValueError(f"params leaf {'/'.join(leaf.path)} has shape {got}, expected {want}")


# Qwen's document end: Qwen2.5 chat models stop at their eos (<|im_end|>) or at it.
_ENDOFTEXT = "<|endoftext|>"


def _int_or_none(x: Any) -> int | None:
    return None if x is None else int(x)


def _as_list(x: Any) -> list[int]:
    return [] if x is None else [int(i) for i in (x if isinstance(x, list | tuple) else [x])]


def _first(*values: Any) -> int | None:
    return next((v for v in values if v is not None), None)


def _tokenizer_ids(tokenizer: Any) -> tuple[int | None, list[int], int | None]:
    """(bos id, eos list, pad id) of a Hugging Face tokenizer; the eos list is its eos token,
    then ``<|endoftext|>`` when the vocabulary has that too (as Qwen2.5's generation config)."""
    eos = _as_list(getattr(tokenizer, "eos_token_id", None))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if _ENDOFTEXT in vocab:
        eos.append(int(vocab[_ENDOFTEXT]))
    return (
        _int_or_none(getattr(tokenizer, "bos_token_id", None)),
        list(dict.fromkeys(eos)),
        _int_or_none(getattr(tokenizer, "pad_token_id", None)),
    )


def generation_settings(
    config: Qwen2Config, tokenizer: Any = None
) -> tuple[dict[str, int | None], dict[str, Any]]:
    """What ``save_hf`` writes: (bos/eos/pad ids for ``config.json``, ``generation_config.json``).

    The generation config is the source model's (``config.generation_config``, read from its HF
    directory) as it was, with any of bos/eos/pad it lacks filled in; without one it holds just
    those ids. Ids come from the config first, then the tokenizer; the eos list is the source's,
    else the tokenizer's eos and ``<|endoftext|>`` plus the config's eos. ``config.json`` gets
    the config's ids, its missing ones from the tokenizer (eos: the first of the eos list).
    """
    tok_bos, tok_eos, tok_pad = (
        _tokenizer_ids(tokenizer) if tokenizer is not None else (None, [], None)
    )
    source = dict(config.generation_config or {})
    source.pop("transformers_version", None)
    eos = _as_list(source.get("eos_token_id")) or list(
        dict.fromkeys(tok_eos + _as_list(config.eos_token_id))
    )
    ids = {
        "bos_token_id": _first(config.bos_token_id, tok_bos, source.get("bos_token_id")),
        "eos_token_id": _first(config.eos_token_id, *eos[:1]),
        "pad_token_id": _first(config.pad_token_id, tok_pad, source.get("pad_token_id")),
    }
    known = dict(ids, eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None)
    missing = {k: v for k, v in known.items() if v is not None and source.get(k) is None}
    return ids, {**source, **missing}


def save_hf(
    config: Qwen2Config,
    params: dict,
    path: str,
    tokenizer: Any = None,
    dtype: Any = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> str:
    """Write a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    Tensors stream out one at a time into safetensors shards of at most ``max_shard_bytes``
    (with ``model.safetensors.index.json`` when there are several). The directory is written
    under a temporary name and renamed into place, so an interrupted save leaves no partial
    model at ``path``.

    ``tokenizer`` (a Hugging Face tokenizer, a tokenizer directory or ``"qwen2.5"``) is saved
    alongside. ``config.json`` carries bos/eos/pad ids and ``generation_config.json`` the
    source model's generation config (``config.generation_config``) or, without one, the eos
    list and pad id of the config and the tokenizer, so that transformers and vLLM stop at the
    end of a turn (``generation_settings``; docs/checkpoint.md).
    """
    _check_params(config, params)
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(tokenizer)
    ids, generation = generation_settings(config, tokenizer)
    dtype = parse_dtype(dtype) if dtype is not None else jnp.dtype(params["embed_tokens"].dtype)
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        shards: list[dict[str, np.ndarray]] = [{}]
        sizes = [0]
        files: list[str] = []

        def flush():
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], os.path.join(tmp, name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shards[-1]})
            shards[-1] = {}
            sizes[-1] = 0

        weight_map: dict[str, str] = {}
        total = 0
        for key, arr in _hf_tensors(config, params, dtype):
            if sizes[-1] and sizes[-1] + arr.nbytes > max_shard_bytes:
                flush()
            shards[-1][key] = arr
            sizes[-1] += arr.nbytes
            total += arr.nbytes
        flush()
        if len(files) == 1:
            os.replace(os.path.join(tmp, files[0]), os.path.join(tmp, "model.safetensors"))
        else:
            n = len(files)
            renamed = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
            for old, new in renamed.items():
                os.replace(os.path.join(tmp, old), os.path.join(tmp, new))
            index = {
                "metadata": {"total_size": total},
                "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())},
            }
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        dtype_name = {jnp.dtype(jnp.bfloat16): "bfloat16", jnp.dtype(jnp.float16): "float16"}.get(
            jnp.dtype(dtype), "float32"
        )
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(
                {**config.to_hf_dict(dtype_name, with_generation_config=False), **ids}, f, indent=2
            )
        with open(os.path.join(tmp, GENERATION_CONFIG_FILE), "w") as f:
            json.dump(generation, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(path):
            old = path + ".old-" + os.path.basename(tmp)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
