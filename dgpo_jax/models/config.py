"""Qwen2 / Qwen2.5 model configuration: presets and Hugging Face ``config.json`` reading."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from dgpo_jax.errors import MissingFileError, ModelFormatError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_KERNELS = ("auto", "xla", "chunked", "cudnn", "splash")
# Read only by the uncached forward (training, scoring); see `Qwen2Config.for_decoding`.
_UNCACHED_ONLY = ("remat", "attention", "attention_block")
GENERATION_CONFIG_FILE = "generation_config.json"
# Where to_hf_dict records the source's generation config (checkpoint metadata; not config.json).
GENERATION_CONFIG_KEY = "dgpo_generation_config"


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture of a Qwen2-family decoder (every field up to ``pad_token_id`` mirrors HF
    ``Qwen2Config``; the compute-graph knobs after ``generation_config`` are neither written to
    nor read from ``config.json``).

    ``generation_config`` is the source model's ``generation_config.json`` (its eos list, pad
    id, sampling defaults) when the config was read from a Hugging Face directory, else
    ``None``. It does not shape the model: it takes no part in ``==`` and ``hash`` (configs
    that differ only there share compiled programs), travels in checkpoint metadata through
    ``to_hf_dict``/``from_hf_dict`` and is what ``save_hf`` writes back (docs/checkpoint.md).

    Frozen and hashable, so it can be a static argument of ``jax.jit``.
    """

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # hidden_size // num_attention_heads when None
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151643  # the first one when config.json lists several
    pad_token_id: int | None = None
    generation_config: dict[str, Any] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    # Compute-graph knobs (not part of the HF architecture).
    remat: str = "none"  # "none" | "full" | "dots": rematerialisation policy per layer.
    # Attention kernel of the uncached (training / scoring) path, see dgpo_jax.models.attention:
    # "auto" | "xla" | "chunked" | "cudnn" | "splash". The KV-cache path does not use it.
    attention: str = "auto"
    attention_block: int = 512  # query/key block size of "chunked" and "splash"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); give head_dim explicitly"
            )
        if self.generation_config is not None:
            if not isinstance(self.generation_config, dict):
                raise ValueError(
                    "generation_config must be a dict (generation_config.json) or None, got "
                    f"{type(self.generation_config).__name__}"
                )
            # A private JSON copy: no aliasing with the caller's dict, and it must serialise.
            object.__setattr__(
                self, "generation_config", json.loads(json.dumps(self.generation_config))
            )
        if self.head_dim is None:  # normalise, so configs compare equal after an HF round trip
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_KERNELS)}; got {self.attention!r}"
            )
        if (
            not isinstance(self.attention_block, int)
            or isinstance(self.attention_block, bool)
            or self.attention_block < 1
        ):
            raise ValueError(
                f"attention_block must be a positive int, got {self.attention_block!r}"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **kw) -> Qwen2Config:
        """``dataclasses.replace``; a head_dim that was derived (hidden_size // heads) is derived
        again when hidden_size or num_attention_heads changes, an explicit one is kept."""
        shape_changed = "hidden_size" in kw or "num_attention_heads" in kw
        derived = self.head_dim == self.hidden_size // self.num_attention_heads
        if shape_changed and derived and "head_dim" not in kw:
            kw["head_dim"] = None
        return dataclasses.replace(self, **kw)

    def for_decoding(self) -> Qwen2Config:
        """This config with the fields that only the uncached forward reads (``remat``,
        ``attention``, ``attention_block``: training and scoring) at their defaults. The cached
        decode path reads none of them, so the sampler compiles one program for a model
        whatever the update's settings (a run's rollouts and evaluations share it)."""
        return self.replace(
            **{f.name: f.default for f in dataclasses.fields(self) if f.name in _UNCACHED_ONLY}
        )

    def num_params(self) -> int:
        d, f, l = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        hd, h, kv = self.dim_per_head, self.num_attention_heads, self.num_key_value_heads
        attn = d * h * hd + h * hd + 2 * (d * kv * hd + kv * hd) + h * hd * d
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + l * per_layer + d + head

    # --- Hugging Face interop -------------------------------------------------------------
    def to_hf_dict(
        self, torch_dtype: str = "float32", with_generation_config: bool = True
    ) -> dict[str, Any]:
        """A ``config.json`` dict that transformers (4.x and 5.x) loads as Qwen2.

        A known ``generation_config`` rides along under ``GENERATION_CONFIG_KEY`` (so checkpoint
        metadata keeps it); ``with_generation_config=False`` leaves it out (``save_hf`` writes
        it to ``generation_config.json`` instead).
        """
        d = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.dim_per_head,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
        }
        if with_generation_config and self.generation_config is not None:
            d[GENERATION_CONFIG_KEY] = json.loads(json.dumps(self.generation_config))
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> Qwen2Config:
        """Reads both the old (top-level ``rope_theta``) and transformers-5 formats, and the
        generation config that ``to_hf_dict`` records (``GENERATION_CONFIG_KEY``)."""
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type not in (None, "qwen2") or (archs and not any("Qwen2" in a for a in archs)):
            raise ModelFormatError(
                f"{source}: unsupported architecture (model_type={model_type!r}, "
                f"architectures={archs}); dgpo_jax supports Qwen2/Qwen2.5 (model_type 'qwen2')"
            )
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in d
        ]
        if missing:
            raise ModelFormatError(f"{source}: missing required keys {missing}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ModelFormatError(
                f"{source}: rope_type {rope_type!r} is not supported (only 'default')"
            )
        if d.get("use_sliding_window", False):
            raise ModelFormatError(f"{source}: use_sliding_window=true is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ModelFormatError(
                f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')"
            )
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        heads = d["num_attention_heads"]
        generation = d.get(GENERATION_CONFIG_KEY)
        if generation is not None and not isinstance(generation, dict):
            raise ModelFormatError(f"{source}: {GENERATION_CONFIG_KEY} must be a JSON object")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            rope_theta=float(theta),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
            generation_config=generation,
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> Qwen2Config:
        """``config.json`` of a Hugging Face directory, with its ``generation_config.json`` (when
        there is one) as ``generation_config``."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise MissingFileError(
                f"{path}: not a directory (expected a Hugging Face model directory)"
            )
        if not os.path.isfile(cfg_path):
            raise MissingFileError(f"{path}: no config.json in this directory")
        with open(cfg_path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ModelFormatError(f"{cfg_path}: not valid JSON ({e})") from None
        config = cls.from_hf_dict(d, source=cfg_path)
        gen_path = os.path.join(path, GENERATION_CONFIG_FILE)
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                try:
                    gen = json.load(f)
                except json.JSONDecodeError as e:
                    raise ModelFormatError(f"{gen_path}: not valid JSON ({e})") from None
            if not isinstance(gen, dict):
                raise ModelFormatError(
                    f"{gen_path}: expected a JSON object, got {type(gen).__name__}"
                )
            # The writer's version describes the file, not the model; save_hf writes none.
            gen.pop("transformers_version", None)
            config = dataclasses.replace(config, generation_config=gen)
        return config


PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": Qwen2Config(151936, 896, 4864, 24, 14, 2, tie_word_embeddings=True),
    "qwen2.5-1.5b": Qwen2Config(151936, 1536, 8960, 28, 12, 2, tie_word_embeddings=True),
    "qwen2.5-3b": Qwen2Config(151936, 2048, 11008, 36, 16, 2, tie_word_embeddings=True),
    "qwen2.5-7b": Qwen2Config(
        152064, 3584, 18944, 28, 28, 4, tie_word_embeddings=False, eos_token_id=151643
    ),
    # Tiny sizes for tests and the CPU quickstart (vocab is set by the tokenizer in use).
    "tiny": Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=None,
    ),
    "tiny-teacher": Qwen2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=None,
    ),
}
# The teacher's depth at half its width (a student tried in the quickstart, docs/quickstart.md).
PRESETS["tiny-4l"] = PRESETS["tiny"].replace(num_hidden_layers=4, intermediate_size=256)
# The quickstart's pair (configs/quickstart.py): `tiny-teacher` with RoPE base 10^4 instead of
# Qwen2.5's 10^6, and its 2-layer cut as the student. With 32-dimensional heads and contexts of
# ~200 tokens, base 10^6 leaves few rotation frequencies that tell neighbouring positions apart,
# and the copy-from-context skill the synthetic task needs forms later (docs/quickstart.md,
# 2026-11-22).
PRESETS["quickstart-teacher"] = PRESETS["tiny-teacher"].replace(rope_theta=10_000.0)
PRESETS["quickstart-student"] = PRESETS["quickstart-teacher"].replace(num_hidden_layers=2)
# The GPU-sized quickstart's pair (configs/quickstart_gpu.py): tens of millions of parameters,
# 64-dimensional heads, RoPE base 10^4 like the CPU pair; the student is the teacher's lower
# half. With the word tokenizer's ~1000 tokens: about 25M and 13M parameters.
PRESETS["quickstart-gpu-teacher"] = PRESETS["quickstart-teacher"].replace(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
)
PRESETS["quickstart-gpu-student"] = PRESETS["quickstart-gpu-teacher"].replace(num_hidden_layers=4)


def get_preset(name: str, **overrides) -> Qwen2Config:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def parse_dtype(dtype: Any) -> jnp.dtype:
    """'float32' | 'bfloat16' | a jnp dtype -> jnp dtype, with a clear error otherwise."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; supported: {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    dt = jnp.dtype(dtype)
    if dt not in {jnp.dtype(v) for v in _DTYPES.values()}:
        raise ValueError(f"unsupported dtype {dt}; supported: {sorted(_DTYPES)}")
    return dt
