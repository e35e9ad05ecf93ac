"""The run configuration: every field, documented once, and its validation.

Config files in ``configs/`` start from ``base_config()`` and change what they need::

    from dgpo_jax.run_config import base_config

    def get_config():
        cfg = base_config()
        cfg.objective.preset = "dgpo"
        return cfg

Any field can be overridden on the command line (``--config.optim.actor_lr=1e-6``);
ml_collections rejects unknown keys and values of the wrong type. ``validate(cfg)`` then checks
what types cannot: choices, ranges, and that the files a mode needs exist, before anything
heavy starts.
"""

from __future__ import annotations

import os

import ml_collections

from dgpo_jax.data.search_r1 import DEFAULT_TEMPLATE

MODES = ("train", "coldstart", "eval", "export", "plan", "quickstart")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong kind, or points at nothing."""


def env(name: str, default: str = "") -> str:
    """Read a location from the environment (used by the ``*_nq.py`` configs)."""
    return os.environ.get(name, default)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "train"  # one of MODES
    c.workdir = "runs/default"  # checkpoints, metrics.jsonl, tensorboard/, eval results
    c.seed = 0
    c.resume = False  # continue from the latest checkpoint in workdir (same data order)

    c.model = ml_collections.ConfigDict()
    # A model is a local HF directory, a dgpo_jax checkpoint directory, or "preset:NAME"
    # (random weights; NAME from dgpo_jax.models.PRESETS, vocab from the tokenizer).
    c.model.student = ""
    c.model.teacher = ""  # needed by dgpo, opd-family, KD objectives and coldstart
    c.model.reference = ""  # pi_ref when it is not the initial student (ExOPD teacher_base)
    c.model.tokenizer = "qwen2.5"  # "qwen2.5" or a local tokenizer directory
    c.model.dtype = "bfloat16"  # parameter/activation dtype: float32 | bfloat16
    c.model.remat = "none"  # none | full | dots: rematerialisation in the update step

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # comma-separated Search-R1 parquet files
    c.data.test_files = ""  # comma-separated; evaluation reports EM per data_source
    c.data.prompt_template = DEFAULT_TEMPLATE  # used when rows carry raw questions
    c.data.use_chat_template = True  # wrap the user message with the tokenizer's template
    c.data.batch_size = 512  # prompts per RL step (all processes together)
    c.data.rollouts_per_prompt = 1  # n samples per prompt (GRPO: 5)
    c.data.shuffle = True

    c.retrieval = ml_collections.ConfigDict()
    c.retrieval.kind = "http"  # http | in_process
    c.retrieval.urls = "http://127.0.0.1:8000"  # comma-separated; balanced client-side
    c.retrieval.index_dir = ""  # for in_process: a directory built by build_index
    c.retrieval.topk = 3
    c.retrieval.timeout_s = 30.0
    c.retrieval.max_retries = 3

    c.sampler = ml_collections.ConfigDict()
    c.sampler.temperature = 1.0
    c.sampler.top_p = 1.0
    c.sampler.top_k = 0  # 0 = off
    c.sampler.max_turns = 4  # searches, then one final turn with search disabled
    c.sampler.max_new_tokens_per_turn = 500
    c.sampler.max_new_tokens = 2500  # per trajectory
    c.sampler.max_obs_length = 500
    c.sampler.max_prompt_length = 4096
    c.sampler.cache_len = 8704  # context length: prompt + turns + observations
    c.sampler.ingest_chunk = 32
    c.sampler.max_prefix_length = 0  # TrOPD teacher prefixes (tokens); 0 = off

    c.objective = ml_collections.ConfigDict()
    c.objective.preset = "dgpo"  # see dgpo_jax.objectives.presets
    # Any ObjectiveConfig knob, e.g. --config.objective.overrides.token_reward_coef=0.01.
    c.objective.overrides = ml_collections.ConfigDict()
    # (TrOPD's teacher_prefix_share, Guided-OPD's guided_p0 / guided_schedule, GKD's
    # student_data_fraction ... are ObjectiveConfig knobs too.)

    c.optim = ml_collections.ConfigDict()
    c.optim.actor_lr = 1e-6
    c.optim.critic_lr = 1e-5
    c.optim.schedule = "constant"  # constant (after warmup) | cosine
    c.optim.actor_warmup_ratio = 0.285
    c.optim.critic_warmup_ratio = 0.015
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1005
    c.train.mini_batch_size = 256  # PPO mini-batch (prompts); one optimizer step each
    c.train.ppo_epochs = 1
    c.train.micro_batch_size = 16  # sequences per gradient-accumulation micro-batch
    c.train.eval_every = 100  # 0 = only at the end
    # DistiLLM's adaptive student-data share: the objective's loss on the teacher's correct
    # rollouts of the first train.mini_batch_size test questions, every val_every steps
    # (0 = max(1, train.steps // 10)); other objectives ignore it.
    c.train.val_every = 0
    c.train.save_every = 50
    c.train.max_to_keep = 3
    c.train.log_every = 1

    c.coldstart = ml_collections.ConfigDict()
    c.coldstart.epochs = 5
    c.coldstart.lr = 1e-4
    c.coldstart.warmup_ratio = 0.0  # of the KD steps (reference: cosine, no warmup)
    c.coldstart.batch_size = 64  # sequences per step
    c.coldstart.rollouts_per_question = 1  # teacher samples per training question
    c.coldstart.max_questions = 0  # 0 = all training questions
    c.coldstart.greedy = False  # teacher rollouts greedy (else at sampler.temperature)

    c.eval = ml_collections.ConfigDict()
    c.eval.greedy = True
    c.eval.sampled = True  # at sampler.temperature (the reference validated sampled at 1.0)
    # Sampled draws per question; with greedy on too, the eval also reports pass@k and the
    # sampled EM split by the greedy outcome (sharpening vs learning; docs/quickstart.md).
    c.eval.sampled_repeats = 1
    c.eval.max_examples = 0  # per file; 0 = all
    c.eval.batch_size = 128
    c.eval.at_end = True  # train mode: evaluate the final policy
    c.eval.checkpoint_step = -1  # eval mode: -1 = the latest checkpoint (or the model as given)

    c.export = ml_collections.ConfigDict()
    c.export.step = -1  # -1 = the latest checkpoint
    c.export.out = ""  # HF directory to write; default WORKDIR/export_STEP
    c.export.dtype = ""  # default: the checkpoint's

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.mesh.num_devices = 0  # use the first N devices (0 = all of them)
    c.mesh.rules = ""  # overrides of the logical rules: "embed=fsdp,mlp=tensor,vocab="

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True
    c.logging.wandb_project = ""  # set to log to Weights & Biases (when installed)
    c.logging.progress = True

    c.plan = ml_collections.ConfigDict()  # mode=plan: the memory plan (dgpo_jax.memory_plan)
    c.plan.fake_devices = 0  # > 0: plan on this many fake CPU devices (set before JAX starts)
    c.plan.device_memory_gib = 0.0  # per device; > 0: exit non-zero when the peak exceeds it
    return c


def split_list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_rules(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """'embed=fsdp,mlp=tensor+fsdp,vocab=' -> [(name, mesh axes), ...]."""
    rules = []
    for item in split_list(text):
        if "=" not in item:
            raise ConfigError(f"mesh.rules: {item!r} is not 'logical=mesh_axis[+mesh_axis]'")
        name, axes = item.split("=", 1)
        rules.append((name.strip(), tuple(a for a in axes.split("+") if a)))
    return rules


def _model_source_ok(src: str) -> bool:
    return src.startswith("preset:") or os.path.isdir(src)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks choices, ranges and paths; raises ``ConfigError`` naming the field."""

    def need(cond, field, msg):
        if not cond:
            raise ConfigError(f"config.{field}: {msg}")

    need(cfg.mode in MODES, "mode", f"{cfg.mode!r} is not one of {MODES}")
    need(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype",
         f"{cfg.model.dtype!r}: expected float32 or bfloat16")
    need(cfg.retrieval.kind in ("http", "in_process"), "retrieval.kind",
         f"{cfg.retrieval.kind!r}: expected http or in_process")
    if cfg.mode == "quickstart":
        return
    roles = ["student"]
    if cfg.mode == "coldstart":
        roles.append("teacher")
    for role in roles:
        src = getattr(cfg.model, role)
        need(src, f"model.{role}", "is empty: give a HF directory, a dgpo_jax checkpoint "
             "directory or preset:NAME (the *_nq configs read it from the environment)")
        need(_model_source_ok(src), f"model.{role}", f"{src!r} does not exist")
    if cfg.model.teacher:
        need(_model_source_ok(cfg.model.teacher), "model.teacher",
             f"{cfg.model.teacher!r} does not exist")
    tok = cfg.model.tokenizer
    need(tok == "qwen2.5" or os.path.isdir(tok), "model.tokenizer",
         f"{tok!r} is neither 'qwen2.5' nor a directory")
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
            need(os.path.isdir(cfg.retrieval.index_dir), "retrieval.index_dir",
                 f"{cfg.retrieval.index_dir!r} is not an index directory")
        else:
            need(split_list(cfg.retrieval.urls), "retrieval.urls", "is empty")
    for field in ("data.batch_size", "data.rollouts_per_prompt", "train.steps",
                  "train.mini_batch_size", "train.micro_batch_size", "train.ppo_epochs",
                  "retrieval.topk", "coldstart.epochs", "coldstart.batch_size",
                  "eval.batch_size", "eval.sampled_repeats"):
        section, key = field.split(".")
        value = cfg[section][key]
        need(isinstance(value, int) and value >= 1, field, f"must be an int >= 1, got {value!r}")
    need(isinstance(cfg.train.val_every, int) and cfg.train.val_every >= 0, "train.val_every",
         f"must be an int >= 0, got {cfg.train.val_every!r}")
    need(cfg.data.batch_size % cfg.train.mini_batch_size == 0 or
         cfg.train.mini_batch_size >= cfg.data.batch_size, "train.mini_batch_size",
         f"{cfg.train.mini_batch_size} must divide data.batch_size {cfg.data.batch_size}")
    for field in ("optim.actor_lr", "optim.critic_lr", "coldstart.lr"):
        section, key = field.split(".")
        need(cfg[section][key] > 0, field, f"must be > 0, got {cfg[section][key]}")
    for field in ("optim.actor_warmup_ratio", "optim.critic_warmup_ratio",
                  "coldstart.warmup_ratio"):
        section, key = field.split(".")
        need(0 <= cfg[section][key] < 1, field, f"must be in [0, 1), got {cfg[section][key]}")
    need(cfg.optim.schedule in ("constant", "cosine"), "optim.schedule",
         f"{cfg.optim.schedule!r}: expected constant or cosine")
    need(isinstance(cfg.mesh.num_devices, int) and cfg.mesh.num_devices >= 0,
         "mesh.num_devices", f"must be an int >= 0, got {cfg.mesh.num_devices!r}")
    parse_rules(cfg.mesh.rules)
    need(isinstance(cfg.plan.fake_devices, int) and cfg.plan.fake_devices >= 0,
         "plan.fake_devices", f"must be an int >= 0, got {cfg.plan.fake_devices!r}")
    need(cfg.plan.device_memory_gib >= 0, "plan.device_memory_gib",
         f"must be >= 0, got {cfg.plan.device_memory_gib}")


# Learning rates of algorithms.md where they differ from DGPO's actor lr (1e-6).
PRESET_ACTOR_LR = {"opd": 1e-5, "exopd": 1e-5, "tropd": 1e-5, "guided_opd": 1e-5,
                   "kd": 1e-4, "seqkd": 1e-4, "gkd": 1e-4, "distillm": 1e-4, "taid": 1e-4}


def nq_config(name: str, preset: str) -> ml_collections.ConfigDict:
    """The reference setting of algorithms.md (Qwen2.5-0.5B student, Qwen2.5-3B teacher,
    NQ + HotpotQA) for ``preset``, with locations from the environment:

      DGPO_STUDENT    student HF directory (Qwen2.5-0.5B-Instruct, or its KD cold start)
      DGPO_TEACHER    teacher HF directory (Qwen2.5-3B trained with Search-R1 PPO)
      DGPO_REFERENCE  optional reference model (ExOPD reward correction)
      DGPO_TRAIN      comma-separated train parquet files (NQ train + HotpotQA train)
      DGPO_TEST       comma-separated test parquet files (the seven QA test sets)
      DGPO_RETRIEVER  comma-separated retrieval server URLs (default http://127.0.0.1:8000)
      DGPO_WORKDIR    output directory (default runs/<name>)
    """
    cfg = base_config()
    cfg.workdir = env("DGPO_WORKDIR", f"runs/{name}")
    cfg.model.student = env("DGPO_STUDENT")
    cfg.model.teacher = env("DGPO_TEACHER")
    cfg.model.reference = env("DGPO_REFERENCE")
    cfg.data.train_files = env("DGPO_TRAIN")
    cfg.data.test_files = env("DGPO_TEST")
    cfg.retrieval.urls = env("DGPO_RETRIEVER", "http://127.0.0.1:8000")
    cfg.objective.preset = preset
    cfg.optim.actor_lr = PRESET_ACTOR_LR.get(preset, cfg.optim.actor_lr)
    return cfg
