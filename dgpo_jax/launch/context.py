"""What every launcher mode builds once: the mesh, the models (by source), the tokenizer, the
retriever, samplers and the evaluation of a policy."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from dgpo_jax.checkpoint.params import load_params_checkpoint
from dgpo_jax.config import parse_rules, sampler_config, split_list, validate
from dgpo_jax.data.search_r1 import read_question_files
from dgpo_jax.evaluation.evaluate import evaluate, write_results
from dgpo_jax.models import Qwen2Config, get_preset, init_params
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
    if source.startswith("preset:"):
        config = get_preset(source[len("preset:") :], vocab_size=vocab_size)
        params = init_params(config, jax.random.key(seed), jnp.dtype(dtype))
    elif os.path.isfile(os.path.join(source, "config.json")):
        config, params = load_hf(source, dtype=dtype)
    elif os.path.isdir(source):
        config, params, _ = load_params_checkpoint(source, dtype=dtype)
    else:
        raise FileNotFoundError(
            f"{role} {source!r}: not a HF directory, a checkpoint directory or preset:NAME"
        )
    if config.vocab_size < vocab_size:
        raise ValueError(
            f"{role} {source!r} has vocab_size {config.vocab_size} < the tokenizer's {vocab_size}"
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


class RunContext:
    """Everything a mode needs, built once: mesh, tokenizer, student (and teacher), retriever."""

    def __init__(self, cfg, need_teacher: bool):
        validate(cfg)
        self.cfg = cfg
        self.plan = make_plan(cfg)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        vocab = len(self.tokenizer)
        self.student_config, self.student_params = load_model(
            cfg.model.student, cfg.model.dtype, vocab, self.plan, cfg.seed, "model.student"
        )
        if cfg.model.remat != "none":
            self.student_config = self.student_config.replace(remat=cfg.model.remat)
        self.teacher_config = self.teacher_params = None
        if need_teacher:
            if not cfg.model.teacher:
                raise ValueError(
                    f"objective {cfg.objective.preset!r} / mode {cfg.mode!r} needs "
                    "a teacher: set config.model.teacher"
                )
            self.teacher_config, self.teacher_params = load_model(
                cfg.model.teacher, cfg.model.dtype, vocab, self.plan, cfg.seed + 1, "model.teacher"
            )
        self.retriever = build_retriever(cfg)
        os.makedirs(cfg.workdir, exist_ok=True)

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
        )
        write_results(cfg.workdir, name, results)
        return results
