"""The run configuration: every field with its default, documented once.

Config files (``dgpo_jax/configs/``, also reachable as ``configs/`` in a checkout) start from
``base_config()`` or ``nq_config()`` and change what they need::

    from dgpo_jax.config import nq_config

    def get_config():
        cfg = nq_config("dgpo_nq", "dgpo")
        cfg.objective.token_reward_coef = 0.001  # beta (source of the value)
        return cfg

Any field can be overridden on the command line (``--config.optim.actor_lr=1e-6``,
``--config.objective.teacher_lambda=1.5``). ``dgpo_jax.config.resolve`` rejects unknown keys
naming the nearest valid one; ``dgpo_jax.config.validate`` checks what types cannot.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing

import ml_collections
from ml_collections.config_dict import placeholder

from dgpo_jax.curricula.config import CurriculumConfig
from dgpo_jax.data.search_r1 import DEFAULT_TEMPLATE
from dgpo_jax.errors import UserError
from dgpo_jax.objectives.config import ObjectiveConfig

MODES = ("train", "coldstart", "eval", "export", "plan", "quickstart", "compare")


class ConfigError(UserError, ValueError):
    """A configuration value is missing, of the wrong kind, or points at nothing."""

    hint = "--print_config shows every field; --debug shows the traceback"


def env(name: str, default: str = "") -> str:
    """Read a location from the environment (used by the ``*_nq.py`` configs)."""
    return os.environ.get(name, default)


def _knob_section(dataclass_type, exclude: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """One typed, unset (None) field per knob of ``dataclass_type``: settable from a config file
    or the command line with the knob's type; None means "the preset's value"."""
    hints = typing.get_type_hints(dataclass_type)
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(dataclass_type):
        if field.name in exclude:
            continue
        kind = hints[field.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        section[field.name] = placeholder(kind)
    return section


def base_config() -> ml_collections.ConfigDict:
    """Every field of the run config with its default (DGPO's reference run where one applies)."""
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
    # Where ref_logprobs (pi_ref) come from, for objectives that use them (PPO's KL, G-OPD
    # with lambda != 1, GRPO's KL loss): "initial_student" (a frozen copy of the student at
    # step 0) or "teacher_base" (model.reference, e.g. the teacher's pre-RL base model: G-OPD's
    # reward correction). Objectives without a reference ignore it.
    c.model.ref_model = "initial_student"
    c.model.reference = ""  # the model read by ref_model="teacher_base" (a model source)
    c.model.tokenizer = "qwen2.5"  # "qwen2.5" or a local tokenizer directory
    # Mixed precision: every trained model (the student / policy and the critic) keeps its
    # master weights and optimizer state in param_dtype; the programs compute in dtype (the
    # update step casts the masters inside its loss; sampler, scoring and evaluation get a
    # cast copy once per step). Models never trained (teacher, reference) are stored in dtype.
    # Checkpoints hold the masters. (docs/training_at_scale.md)
    c.model.param_dtype = "float32"  # float32 | bfloat16 (bfloat16 masters: updates vanish)
    c.model.dtype = "bfloat16"  # compute dtype: float32 | bfloat16
    c.model.remat = "none"  # none | full | dots: rematerialisation in the update step
    # Attention kernel of training and scoring (student and teacher; the KV-cache decode path
    # has its own): auto | xla | chunked | cudnn (GPU) | splash (TPU); dgpo_jax.models.attention.
    c.model.attention = "auto"
    c.model.attention_block = 512  # query/key block of "chunked" and "splash" (positions)

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # comma-separated Search-R1 parquet files
    c.data.test_files = ""  # comma-separated; evaluation reports EM per data_source
    c.data.prompt_template = DEFAULT_TEMPLATE  # used when rows carry raw questions
    c.data.use_chat_template = True  # wrap the user message with the tokenizer's template
    c.data.batch_size = 512  # prompts per RL step (all processes together)
    c.data.rollouts_per_prompt = 1  # n samples per prompt (GRPO: 5)
    c.data.shuffle = True
    # Prompts longer than sampler.max_prompt_length: error (name the row) | left (keep the last
    # max_prompt_length tokens) | drop (skip the row, counted in the metrics as dropped_prompts)
    c.data.truncation = "error"

    c.retrieval = ml_collections.ConfigDict()
    c.retrieval.kind = "http"  # http | in_process
    c.retrieval.urls = "http://127.0.0.1:8000"  # comma-separated; balanced client-side
    c.retrieval.index_dir = ""  # for in_process: a directory built by build_index
    c.retrieval.topk = 3
    c.retrieval.timeout_s = 30.0  # one HTTP request
    c.retrieval.max_retries = 3  # retries of a search, with exponential backoff (0.2 s .. 5 s)
    c.retrieval.deadline_s = 120.0  # one search, its retries included
    # A wave whose search still fails after the client's retries: "raise" stops the run with an
    # error naming the URLs and the waiting rows; "finish" ends those rows (retriever_error).
    c.retrieval.on_error = "raise"

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
    c.sampler.ingest_chunk = 32  # observation tokens appended to the KV cache per model call
    # Host waves (docs/sampler.md): call the host when this share of the live rows waits (0: at
    # every turn end, 1: only when no row generates), or after wave_max_wait decode steps.
    c.sampler.wave_fraction = 0.75
    c.sampler.wave_max_wait = 0  # 0 = no limit
    c.sampler.decode_path = "auto"  # auto | cpu | accelerator
    c.sampler.decode_layers = (
        "auto"  # auto (split on the cpu path and GPUs, else scan) | scan | split
    )
    # one-token decode attention: xla | pallas (JAX's Pallas GPU kernel over each row's slots)
    # | fused (a Triton kernel a layer: rotary, cache write, attention); the accelerator path
    # with split layers
    c.sampler.decode_attention = "xla"
    # prefill and observation chunks' attention: auto (pallas on TPUs) | xla | pallas (a Pallas
    # flash kernel over the cache: TPU kernels on TPUs, a Triton one on GPUs; the accelerator
    # path)
    c.sampler.chunk_attention = "auto"
    c.sampler.host_calls = "auto"  # auto | single | per_shard (auto: per_shard over processes)

    # The objective: a preset (dgpo_jax.objectives.presets) and any of its knobs
    # (dgpo_jax.objectives.ObjectiveConfig, documented there and in docs/algorithms.md), e.g.
    # --config.objective.token_reward_coef=0.01. A knob left at None keeps the preset's value.
    c.objective = _knob_section(ObjectiveConfig, exclude=("name",))
    c.objective.preset = "dgpo"
    # The curriculum: what changes between steps (teacher turns, teacher prefixes, data mixing,
    # TAID's t; dgpo_jax.curricula.CurriculumConfig), e.g. --config.curriculum.guided_p0=0.3.
    # None keeps the preset's value (dgpo_jax.curricula.config.CURRICULUM_PRESETS).
    c.curriculum = _knob_section(CurriculumConfig)

    c.optim = ml_collections.ConfigDict()
    c.optim.actor_lr = 1e-6
    c.optim.critic_lr = 1e-5
    c.optim.schedule = "constant"  # constant (after the warmup) | cosine (after the warmup)
    c.optim.actor_warmup_ratio = 0.285
    c.optim.critic_warmup_ratio = 0.015
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1005
    c.train.mini_batch_size = 256  # PPO mini-batch (prompts); one optimizer step each
    c.train.ppo_epochs = 1
    c.train.micro_batch_size = 16  # rows per gradient-accumulation micro-batch
    # Pack several trajectories into each update row (segment ids; dgpo_jax.learner.packing):
    # N trajectories go into N rows of pack_width positions, filled micro-batch by micro-batch;
    # the programs skip the micro-batches of empty rows, so one shape (one compile) serves the
    # whole run and the work follows the real tokens. False: one trajectory per row, padded.
    c.train.pack = True
    c.train.pack_width = 0  # positions per packed row; 0 = sampler.cache_len (rounded up to 64)
    # pack=False: each update batch is cut to the smallest of this many widths (1/n, 2/n, ...,
    # n/n of the context, rounded up to 64) that holds its longest trajectory, after moving each
    # row's prompt padding to its end: the passes follow the real length, and a run compiles its
    # update for at most this many widths. 0 or 1: always the full context width.
    c.train.width_buckets = 4
    # pack=False, updates of one micro-batch on one batch shard (a CPU or one chip): the
    # update's model passes run over at most this many groups of rows sorted by length, each
    # cut to the smallest width bucket that holds its longest row, so the short rows' padding
    # is not computed (the same loss). Each grouping is one more compile; a new one is compiled
    # only when it saves more than a compile costs over the updates left
    # (learner.batches.RowGrouper). 1: one group.
    c.train.length_groups = 1
    # Rows per micro-batch of the scoring passes (behaviour / reference log-probs, and the
    # whole-batch pass before the mini-batches); 0 = the update's micro-batch rows.
    c.train.score_micro_batch_size = 0
    # When a step makes one update (one mini-batch, one epoch, one micro-batch), the behaviour
    # log-probs and the critic's old values are the update's own forward at the rollout's
    # parameters (stop-gradient): no scoring pass and no critic pre-pass, the same numbers.
    # False: separate passes as the reference runs them (learner.update_step, on_policy).
    c.train.behaviour_from_update = True
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
    c.export.dtype = ""  # default: the checkpoint's (a run's master weights: model.param_dtype)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.mesh.num_devices = 0  # use the first N devices (0 = all of them)
    c.mesh.rules = ""  # overrides of the logical rules: "embed=fsdp,mlp=tensor,vocab="

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True
    c.logging.wandb_project = ""  # set to log to Weights & Biases (when installed)
    c.logging.progress = True

    c.plan = ml_collections.ConfigDict()  # mode=plan: the memory plan (dgpo_jax.launch.plan)
    c.plan.fake_devices = 0  # > 0: plan on this many fake CPU devices (set before JAX starts)
    c.plan.device_memory_gib = 0.0  # per device (chip); > 0: exit non-zero above it
    # "" = this process's (or the fake) devices; "tpu:v5e-16", "tpu:v5p-16", "tpu:v6e-8",
    # "tpu:v4-16" or "tpu:KIND:TOPOLOGY" (e.g. tpu:v5e:4x4): compile for that TPU slice on this
    # host with libtpu (the tpu extra); "gpu:h100-8" / "gpu:h200-N": compile for N GPUs with
    # XLA:GPU on this host, no GPU needed (the gpu extra); device_memory_gib then defaults to
    # the chip's HBM.
    c.plan.target = ""
    # Mean real tokens per trajectory (0 = sampler.cache_len): packed batches skip their empty
    # micro-batches, so this sets the step's expected FLOPs (not its memory: the shapes do not
    # depend on the lengths). Packing is assumed to add ~15% padding.
    c.plan.tokens_per_trajectory = 0
    c.plan.prompt_width = 0  # prompt positions the rollouts compile for (0 = max_prompt_length)
    c.plan.peak_tflops = 0.0  # bf16 TFLOP/s per chip for the ideal step time (0 = TPU table)
    # Program groups to compile, comma-separated (rollout, score, prepare, update, loss, eval);
    # "" = every program of the step.
    c.plan.programs = ""

    c.quickstart = ml_collections.ConfigDict()  # mode=quickstart (dgpo_jax.launch.quickstart)
    c.quickstart.num_entities = 1000  # size of the synthetic world
    # "closed": attribute values from short lists (a type's most frequent answer covers up to
    # ~20% of its questions); "open": values that do not repeat (dgpo_jax.data.synthetic).
    c.quickstart.answers = "closed"
    c.quickstart.prompt_template = ""  # "" = data.prompt_template
    c.quickstart.teacher_preset = "quickstart-teacher"  # dgpo_jax.models.PRESETS names
    c.quickstart.student_preset = "quickstart-student"
    c.quickstart.teacher_questions = 0  # expert trajectories for the teacher; 0 = all
    c.quickstart.teacher_steps = 800  # supervised steps of the teacher
    c.quickstart.teacher_batch_size = 8
    c.quickstart.teacher_lr = 2e-3
    # Train the teacher in cosine cycles of teacher_steps until its greedy EM on training
    # questions reaches teacher_min_train_em (0 = one cycle, no check), at most
    # teacher_max_rounds cycles; the check evaluates teacher_check_questions per data source.
    c.quickstart.teacher_min_train_em = 0.0
    c.quickstart.teacher_max_rounds = 1
    c.quickstart.teacher_check_questions = 50
    # Likewise the KD cold start: further rounds of coldstart.epochs from the last round's
    # student until its greedy EM on training questions (teacher_check_questions per data
    # source) reaches coldstart_min_train_em (0 = one round, no check), at most
    # coldstart_max_rounds rounds.
    c.quickstart.coldstart_min_train_em = 0.0
    c.quickstart.coldstart_max_rounds = 1
    c.quickstart.ppo_baseline = True  # run PPO from the cold start too, time allowing
    c.quickstart.time_budget_s = 600  # skip the PPO baseline when it would end past this
    c.quickstart.rl_steps = 30  # steps of each RL stage (DGPO, PPO)
    c.quickstart.rl_batch_size = 32  # prompts per RL step (one rollout each)
    c.quickstart.rl_actor_lr = 1e-4
    c.quickstart.rl_critic_lr = 1e-3

    # mode=compare (dgpo_jax.launch.compare): the quickstart's stages over several seeds, one
    # world (config.seed's), sized by the quickstart.* fields above.
    c.compare = ml_collections.ConfigDict()
    c.compare.seeds = "0,1,2"  # comma-separated: teacher, cold start and every method per seed
    c.compare.methods = "dgpo,ppo"  # objective presets trained from each seed's cold start
    c.compare.level = 0.95  # confidence level of every interval
    c.compare.resamples = 10000  # bootstrap resamples
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


def nq_config(name: str, preset: str) -> ml_collections.ConfigDict:
    """The shared Search-R1 setting (NQ + HotpotQA train, the seven QA test sets, the
    protocol's lengths and turns; the defaults of ``base_config``) for ``preset``, with
    locations from the environment. Each ``configs/*_nq.py`` then states its algorithm's own
    hyperparameters with their sources (docs/algorithms.md has the table).

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
    return cfg
