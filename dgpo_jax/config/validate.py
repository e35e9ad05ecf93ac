"""``validate(cfg)``: what types cannot check (choices, ranges, the objective's knobs, the files a
mode needs), before anything heavy starts. Errors are ``ConfigError`` naming the field."""

from __future__ import annotations

import difflib
import logging
import os

import jax
import ml_collections

from dgpo_jax.config.build import build_curriculum, build_objective
from dgpo_jax.config.schema import MODES, ConfigError, parse_rules, split_list
from dgpo_jax.data.prompts import TRUNCATION_MODES
from dgpo_jax.data.synthetic import ANSWER_CLASSES
from dgpo_jax.models.config import ATTENTION_KERNELS, PRESETS
from dgpo_jax.objectives.presets import OBJECTIVE_PRESETS
from dgpo_jax.sampler.config import (
    CHUNK_ATTENTION,
    DECODE_ATTENTION,
    DECODE_LAYERS,
    DECODE_PATHS,
    HOST_CALLS,
    ON_RETRIEVER_ERROR,
)

log = logging.getLogger(__name__)

REF_MODELS = ("initial_student", "teacher_base")
# Attention kernels that exist on some backends only (the others run everywhere).
KERNEL_BACKENDS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}


def attention_backend(cfg: ml_collections.ConfigDict) -> str:
    """The backend the run's programs compile for: this process's, or in ``mode=plan`` the
    platform of ``plan.target`` (e.g. ``tpu:v5e-16``) when one is set."""
    target = str(cfg.plan.get("target", "") or "") if "plan" in cfg else ""
    if cfg.mode == "plan" and target:
        return target.split(":", 1)[0]
    return jax.default_backend()


def _did_you_mean(name: str, choices, prefix: str = "") -> str:
    """`` (did you mean 'PREFIXclosest'?)`` for the closest of ``choices``, or ``""``."""
    near = difflib.get_close_matches(name, sorted(choices), n=1)
    return f" (did you mean {prefix + near[0]!r}?)" if near else ""


def _missing_source(src: str) -> str:
    if src.startswith("preset:"):
        hint = _did_you_mean(src[len("preset:") :], PRESETS, prefix="preset:")
        return f"{src!r}: no such preset{hint}; presets: {', '.join(sorted(PRESETS))}"
    return f"{src!r} does not exist"


def _model_source_ok(src: str) -> bool:
    if src.startswith("preset:"):
        return src[len("preset:") :] in PRESETS
    return os.path.isdir(src)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks choices, ranges and paths; raises ``ConfigError`` naming the field."""

    def need(cond, field, msg):
        if not cond:
            raise ConfigError(f"config.{field}: {msg}")

    need(cfg.mode in MODES, "mode", f"{cfg.mode!r} is not one of {MODES}")
    need(
        cfg.model.dtype in ("float32", "bfloat16"),
        "model.dtype",
        f"{cfg.model.dtype!r}: expected float32 or bfloat16",
    )
    need(
        cfg.model.param_dtype in ("float32", "bfloat16"),
        "model.param_dtype",
        f"{cfg.model.param_dtype!r}: expected float32 or bfloat16 (the master weights and "
        "optimizer state of the trained models)",
    )
    if cfg.model.param_dtype == "bfloat16" and cfg.mode in ("train", "coldstart"):
        log.warning(
            "model.param_dtype='bfloat16': the master weights and AdamW moments are bfloat16, so "
            "an update smaller than half a bfloat16 ulp of its weight (lr 1e-6 on any weight "
            "above ~5e-4) rounds away and the second moment stops decaying; float32 masters "
            "are the default (docs/training_at_scale.md)"
        )
    need(
        cfg.model.attention in ATTENTION_KERNELS,
        "model.attention",
        f"{cfg.model.attention!r} is not one of {ATTENTION_KERNELS}",
    )
    backends = KERNEL_BACKENDS.get(cfg.model.attention)
    if backends:
        backend = attention_backend(cfg)
        need(
            backend in backends,
            "model.attention",
            f"attention={cfg.model.attention!r} needs a {backends[0].upper()} backend; "
            + (
                f"plan.target compiles for {backend}"
                if cfg.mode == "plan" and backend != jax.default_backend()
                else f"this process runs on {backend}"
            )
            + " (auto, chunked and xla run everywhere)",
        )
    need(
        cfg.retrieval.kind in ("http", "in_process"),
        "retrieval.kind",
        f"{cfg.retrieval.kind!r}: expected http or in_process",
    )
    need(
        cfg.retrieval.on_error in ON_RETRIEVER_ERROR,
        "retrieval.on_error",
        f"{cfg.retrieval.on_error!r}: expected one of {ON_RETRIEVER_ERROR}",
    )
    for field, choices in (
        ("decode_path", DECODE_PATHS),
        ("decode_layers", DECODE_LAYERS),
        ("decode_attention", DECODE_ATTENTION),
        ("chunk_attention", CHUNK_ATTENTION),
        ("host_calls", HOST_CALLS),
    ):
        value = cfg.sampler[field]
        need(value in choices, f"sampler.{field}", f"{value!r}: expected one of {choices}")
    need(
        cfg.sampler.decode_attention == "xla"
        or (cfg.sampler.decode_layers != "scan" and cfg.sampler.decode_path != "cpu"),
        "sampler.decode_attention",
        f"{cfg.sampler.decode_attention!r} runs on the accelerator path with split layers; got "
        "decode_path="
        f"{cfg.sampler.decode_path!r}, decode_layers={cfg.sampler.decode_layers!r}",
    )
    need(
        cfg.sampler.decode_attention == "xla" or cfg.sampler.cache_len % 16 == 0,
        "sampler.cache_len",
        f"{cfg.sampler.cache_len}: decode_attention={cfg.sampler.decode_attention!r} reads the "
        "cache in blocks of 16 slots; expected a multiple of 16",
    )
    need(
        cfg.sampler.chunk_attention != "pallas" or cfg.sampler.decode_path != "cpu",
        "sampler.chunk_attention",
        "'pallas' runs on the accelerator path (all rows every step); got decode_path='cpu'",
    )
    need(
        0.0 <= cfg.sampler.wave_fraction <= 1.0,
        "sampler.wave_fraction",
        f"{cfg.sampler.wave_fraction}: expected a share in [0, 1]",
    )
    need(
        cfg.model.ref_model in REF_MODELS,
        "model.ref_model",
        f"{cfg.model.ref_model!r} is not one of {REF_MODELS}",
    )
    if cfg.mode in ("train", "plan", "coldstart"):
        objective = build_objective(cfg)
        build_curriculum(cfg)
        need(
            cfg.mode != "coldstart" or not objective.uses_policy,
            "objective.preset",
            f"{cfg.objective.preset!r} is on-policy; mode=coldstart trains the student on "
            "fixed teacher trajectories (dgpo_coldstart, kd, seqkd, ...)",
        )
        if cfg.mode != "coldstart" and objective.needs_ref_logp:
            need(
                cfg.model.ref_model != "teacher_base" or cfg.model.reference,
                "model.reference",
                "is empty: model.ref_model='teacher_base' reads pi_ref from "
                "it (the teacher's pre-RL base model)",
            )
    if cfg.mode in ("quickstart", "compare"):
        _validate_quickstart(cfg, need)
        return
    roles = ["student"]
    if cfg.mode == "coldstart":
        roles.append("teacher")
    for role in roles:
        src = getattr(cfg.model, role)
        need(
            src,
            f"model.{role}",
            "is empty: give a HF directory, a dgpo_jax checkpoint "
            "directory or preset:NAME (the *_nq configs read it from the environment)",
        )
        need(_model_source_ok(src), f"model.{role}", _missing_source(src))
    for role in ("teacher", "reference"):
        src = getattr(cfg.model, role)
        need(not src or _model_source_ok(src), f"model.{role}", _missing_source(src))
    tok = cfg.model.tokenizer
    need(
        tok == "qwen2.5" or os.path.isdir(tok),
        "model.tokenizer",
        f"{tok!r} is neither 'qwen2.5' nor a directory",
    )
    if cfg.mode in ("train", "coldstart"):
        files = split_list(cfg.data.train_files)
        need(files, "data.train_files", "is empty: give comma-separated parquet files")
        for f in files:
            need(os.path.isfile(f), "data.train_files", f"{f!r} does not exist")
    if cfg.mode == "eval":
        files = split_list(cfg.data.test_files)
        need(files, "data.test_files", "is empty: give comma-separated parquet files")
        for f in files:
            need(os.path.isfile(f), "data.test_files", f"{f!r} does not exist")
    if cfg.mode in ("train", "coldstart", "eval"):
        if cfg.retrieval.kind == "in_process":
            need(
                os.path.isdir(cfg.retrieval.index_dir),
                "retrieval.index_dir",
                f"{cfg.retrieval.index_dir!r} is not an index directory",
            )
        else:
            need(split_list(cfg.retrieval.urls), "retrieval.urls", "is empty")
    for field in (
        "data.batch_size",
        "data.rollouts_per_prompt",
        "train.steps",
        "train.mini_batch_size",
        "train.micro_batch_size",
        "train.ppo_epochs",
        "retrieval.topk",
        "model.attention_block",
        "coldstart.epochs",
        "coldstart.batch_size",
        "train.length_groups",
        "eval.batch_size",
        "eval.sampled_repeats",
    ):
        section, key = field.split(".")
        value = cfg[section][key]
        need(isinstance(value, int) and value >= 1, field, f"must be an int >= 1, got {value!r}")
    for field in (
        "train.val_every",
        "train.score_micro_batch_size",
        "train.pack_width",
        "train.width_buckets",
    ):
        section, key = field.split(".")
        value = cfg[section][key]
        need(isinstance(value, int) and value >= 0, field, f"must be an int >= 0, got {value!r}")
    need(
        cfg.train.length_groups == 1 or not cfg.train.pack,
        "train.length_groups",
        f"{cfg.train.length_groups} groups need train.pack=False (one trajectory per row); "
        "packed rows already follow the real tokens",
    )
    need(
        cfg.train.pack_width == 0 or cfg.train.pack_width >= cfg.sampler.cache_len,
        "train.pack_width",
        f"{cfg.train.pack_width} is shorter than sampler.cache_len {cfg.sampler.cache_len}: a "
        "trajectory could not fit in a row (0 = the cache length)",
    )
    need(
        cfg.data.batch_size % cfg.train.mini_batch_size == 0
        or cfg.train.mini_batch_size >= cfg.data.batch_size,
        "train.mini_batch_size",
        f"{cfg.train.mini_batch_size} must divide data.batch_size {cfg.data.batch_size}",
    )
    for field in ("optim.actor_lr", "optim.critic_lr", "coldstart.lr"):
        section, key = field.split(".")
        need(cfg[section][key] > 0, field, f"must be > 0, got {cfg[section][key]}")
    for field in (
        "optim.actor_warmup_ratio",
        "optim.critic_warmup_ratio",
        "coldstart.warmup_ratio",
    ):
        section, key = field.split(".")
        need(0 <= cfg[section][key] < 1, field, f"must be in [0, 1), got {cfg[section][key]}")
    for field in ("retrieval.timeout_s", "retrieval.deadline_s"):
        value = cfg.retrieval[field.split(".")[1]]
        need(value > 0, field, f"must be > 0 seconds, got {value}")
    need(
        cfg.retrieval.max_retries >= 0,
        "retrieval.max_retries",
        f"must be >= 0, got {cfg.retrieval.max_retries}",
    )
    need(
        cfg.data.truncation in TRUNCATION_MODES,
        "data.truncation",
        f"{cfg.data.truncation!r} is not one of {TRUNCATION_MODES}",
    )
    need(
        cfg.optim.schedule in ("constant", "cosine"),
        "optim.schedule",
        f"{cfg.optim.schedule!r}: expected constant or cosine",
    )
    need(
        isinstance(cfg.mesh.num_devices, int) and cfg.mesh.num_devices >= 0,
        "mesh.num_devices",
        f"must be an int >= 0, got {cfg.mesh.num_devices!r}",
    )
    parse_rules(cfg.mesh.rules)
    need(
        isinstance(cfg.plan.fake_devices, int) and cfg.plan.fake_devices >= 0,
        "plan.fake_devices",
        f"must be an int >= 0, got {cfg.plan.fake_devices!r}",
    )
    need(
        cfg.plan.device_memory_gib >= 0,
        "plan.device_memory_gib",
        f"must be >= 0, got {cfg.plan.device_memory_gib}",
    )


def _validate_quickstart(cfg, need) -> None:
    """The quickstart's and compare mode's own fields."""
    q = cfg.quickstart
    for role in ("teacher", "student"):
        name = q[f"{role}_preset"]
        hint = _did_you_mean(name, PRESETS)
        need(name in PRESETS, f"quickstart.{role}_preset", f"{name!r}: no such preset{hint}")
    need(
        0.0 <= q.teacher_min_train_em <= 1.0,
        "quickstart.teacher_min_train_em",
        f"{q.teacher_min_train_em}: expected a share in [0, 1] (0 = no check)",
    )
    need(q.teacher_max_rounds >= 1, "quickstart.teacher_max_rounds", "expected >= 1")
    need(
        0.0 <= q.coldstart_min_train_em <= 1.0,
        "quickstart.coldstart_min_train_em",
        f"{q.coldstart_min_train_em}: expected a share in [0, 1] (0 = no check)",
    )
    need(q.coldstart_max_rounds >= 1, "quickstart.coldstart_max_rounds", "expected >= 1")
    need(
        q.answers in ANSWER_CLASSES,
        "quickstart.answers",
        f"{q.answers!r}: expected one of {', '.join(ANSWER_CLASSES)}",
    )
    need(q.teacher_check_questions >= 1, "quickstart.teacher_check_questions", "expected >= 1")
    if cfg.mode != "compare":
        return
    c = cfg.compare
    seeds = split_list(c.seeds)
    need(seeds, "compare.seeds", "is empty: give comma-separated integers, e.g. 0,1,2")
    for s in seeds:
        need(s.lstrip("-").isdigit(), "compare.seeds", f"{s!r} is not an integer")
    need(len(set(seeds)) == len(seeds), "compare.seeds", f"{c.seeds!r} repeats a seed")
    methods = split_list(c.methods)
    for m in methods:
        hint = _did_you_mean(m, OBJECTIVE_PRESETS)
        need(
            m in OBJECTIVE_PRESETS and m != "dgpo_coldstart",
            "compare.methods",
            f"{m!r} is not an objective preset{hint}; presets: "
            + ", ".join(p for p in sorted(OBJECTIVE_PRESETS) if p != "dgpo_coldstart")
            + " (the teacher and the KD cold start are always rows)",
        )
    need(len(set(methods)) == len(methods), "compare.methods", f"{c.methods!r} repeats a method")
    need(0.0 < c.level < 1.0, "compare.level", f"{c.level}: expected a level in (0, 1)")
    need(c.resamples >= 100, "compare.resamples", f"{c.resamples}: expected >= 100")
