"""What every launcher mode builds once: the mesh, the models (by source), the tokenizer, the
retriever, samplers and the evaluation of a policy."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from dgpo_jax.checkpoint.params import load_params_checkpoint, model_source_kind
from dgpo_jax.config import ConfigError, parse_rules, sampler_config, split_list, validate
from dgpo_jax.data.search_r1 import read_question_files
from dgpo_jax.errors import ModelFormatError
from dgpo_jax.evaluation.evaluate import evaluate, write_results
from dgpo_jax.models import Qwen2Config, cast_params, get_preset, init_params
from dgpo_jax.models.hf_io import load_hf
from dgpo_jax.models.tokenizer import load_tokenizer
from dgpo_jax.parallel.sharding import ShardingPlan, plan_from_config
from dgpo_jax.retrieval import HttpRetriever, InProcessRetriever
from dgpo_jax.sampler import Sampler

log = logging.getLogger(__name__)


def make_plan(cfg) -> ShardingPlan:
    """The mesh of ``config.mesh`` and its logical-axis rules."""
    shape = {k: int(v) for k, v in cfg.mesh.shape.items()}
    devices = jax.devices()[: cfg.mesh.num_devices] if cfg.mesh.num_devices else None
    return plan_from_config(shape, parse_rules(cfg.mesh.rules), devices=devices)


def load_model(
    source: str,
    dtype: str,
    vocab_size: int,
    plan: ShardingPlan | None = None,
    seed: int = 0,
    role: str = "model",
) -> tuple[Qwen2Config, Any]:
    """A model from a HF directory, a dgpo_jax checkpoint directory, or ``preset:NAME``.

    Presets get random weights and the tokenizer's vocabulary size.
    """
    kind = model_source_kind(source, role)
    if kind == "preset":
        config = get_preset(source[len("preset:") :], vocab_size=vocab_size)
        params = init_params(config, jax.random.key(seed), jnp.dtype(dtype))
    elif kind == "hf":
        config, params = load_hf(source, dtype=dtype)
    else:
        config, params, _ = load_params_checkpoint(source, dtype=dtype)
    if config.vocab_size < vocab_size:
        raise ModelFormatError(
            f"{role} {source!r} has vocab_size {config.vocab_size} < the tokenizer's {vocab_size}",
            hint="model.tokenizer must be the tokenizer the model was trained with",
        )
    if plan is not None:
        params = plan.shard_params(config, params)
    return config, params


def build_retriever(cfg):
    """``config.retrieval``: an in-process index or HTTP servers."""
    if cfg.retrieval.kind == "in_process":
        return InProcessRetriever(cfg.retrieval.index_dir, topk=cfg.retrieval.topk)
    return HttpRetriever(
        split_list(cfg.retrieval.urls),
        topk=cfg.retrieval.topk,
        timeout=cfg.retrieval.timeout_s,
        max_retries=cfg.retrieval.max_retries,
        deadline=cfg.retrieval.deadline_s,
    )


def eval_records(cfg):
    """The test questions, at most ``eval.max_examples`` per data source."""
    records = read_question_files(split_list(cfg.data.test_files))
    if not cfg.eval.max_examples:
        return records
    per_source: dict[str, int] = {}
    kept = []
    for r in records:
        if per_source.get(r.data_source, 0) < cfg.eval.max_examples:
            per_source[r.data_source] = per_source.get(r.data_source, 0) + 1
            kept.append(r)
    return kept


def eval_sampler_configs(cfg, tokenizer) -> dict:
    """One sampler config per decoding the evaluation reports (greedy, sampled)."""
    out = {}
    if cfg.eval.greedy:
        out["greedy"] = sampler_config(cfg, tokenizer, greedy=True)
    if cfg.eval.sampled:
        out[f"sampled_t{cfg.sampler.temperature:g}"] = sampler_config(cfg, tokenizer)
    return out


def batch_shards(plan: ShardingPlan) -> int:
    """How many ways the plan splits a batch's rows (`ShardingPlan.batch_shards`)."""
    return plan.batch_shards()


class RunContext:
    """Everything a mode needs, built once: mesh, tokenizer, student (and teacher), retriever.

    Mixed precision: a student that this mode trains (``train_student``) is loaded in
    ``model.param_dtype`` (its master weights), otherwise in ``model.dtype``, the compute dtype
    the teacher is always stored in; ``compute`` casts a policy to it. ``model.attention`` is
    the student's and the teacher's attention kernel.
    """

    def __init__(self, cfg, need_teacher: bool, train_student: bool = True):
        validate(cfg)
        self.cfg = cfg
        self.plan = make_plan(cfg)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        self.compute_dtype = jnp.dtype(cfg.model.dtype)
        self.param_dtype = jnp.dtype(cfg.model.param_dtype if train_student else cfg.model.dtype)
        vocab = len(self.tokenizer)
        self.student_config, self.student_params = load_model(
            cfg.model.student, self.param_dtype.name, vocab, self.plan, cfg.seed, "model.student"
        )
        if cfg.model.remat != "none":
            self.student_config = self.student_config.replace(remat=cfg.model.remat)
        self.student_config = self.with_attention(self.student_config)
        self.teacher_config = self.teacher_params = None
        if need_teacher:
            if not cfg.model.teacher:
                raise ConfigError(
                    f"config.model.teacher: objective {cfg.objective.preset!r} / mode "
                    f"{cfg.mode!r} needs a teacher: set config.model.teacher"
                )
            self.teacher_config, self.teacher_params = load_model(
                cfg.model.teacher, cfg.model.dtype, vocab, self.plan, cfg.seed + 1, "model.teacher"
            )
            self.teacher_config = self.with_attention(self.teacher_config)
        self.retriever = build_retriever(cfg)
        epath.Path(cfg.workdir).mkdir(parents=True, exist_ok=True)  # local or gs://

    def with_attention(self, config: Qwen2Config) -> Qwen2Config:
        """``config`` with the run's attention kernel (``model.attention``, its block
        ``model.attention_block``)."""
        model = self.cfg.model
        return config.replace(attention=model.attention, attention_block=model.attention_block)

    def compute(self, params):
        """``params`` in the compute dtype (a cast copy of float32 masters; the same arrays
        when they are in it already): what the sampler, the scoring passes and evaluation
        run."""
        return cast_params(params, self.compute_dtype)

    @property
    def batch_shards(self) -> int:
        return batch_shards(self.plan)

    def place(self, *arrays):
        """Host arrays -> the global mesh, batch dimension over the data axes."""
        return self.plan.shard_batch(arrays)

    def sampler(self, model_config, greedy=False, teacher=False, max_prefix_length=0):
        scfg = sampler_config(self.cfg, self.tokenizer, greedy, max_prefix_length)
        return Sampler(
            model_config,
            scfg,
            self.tokenizer,
            self.retriever,
            plan=self.plan,
            teacher_config=self.teacher_config if teacher else None,
            topk=self.cfg.retrieval.topk,
            on_retriever_error=self.cfg.retrieval.on_error,
        )

    def evaluate(self, params, name: str, model_config=None) -> dict:
        cfg = self.cfg
        results = evaluate(
            model_config or self.student_config,
            params,
            eval_records(cfg),
            self.tokenizer,
            self.retriever,
            eval_sampler_configs(cfg, self.tokenizer),
            cfg.eval.batch_size,
            cfg.seed,
            self.plan,
            cfg.data.use_chat_template,
            sampled_repeats=cfg.eval.sampled_repeats,
            dtype=self.compute_dtype,
            truncation=cfg.data.truncation,
        )
        write_results(cfg.workdir, name, results)
        return results
