"""One process of a sampler rollout over a mesh of every process's devices (run by
tests/test_multiprocess.py, alone or as several JAX processes; not a test module).

    python tests/mp_rollout_driver.py JOB.json RETRIEVAL_URL OUT_DIR

JOB.json holds the tokenizer directory, the prompts and the teacher prefixes (each a complete
``<search> ... </search>`` action, so that every row searches whatever the untrained model
samples). Every process writes ``OUT_DIR/process_<i>.json``: its `Rollout`'s tokens, finish
reasons, queries, turn texts and stats.
"""

import json
import os
import sys

import jax
import numpy as np

from dgpo_jax.models import get_preset
from dgpo_jax.models.tokenizer import load_tokenizer
from dgpo_jax.parallel.distributed import initialize_from_env
from dgpo_jax.parallel.sharding import plan_from_config
from dgpo_jax.retrieval import HttpRetriever
from dgpo_jax.sampler import Sampler, SamplerConfig, stop_sequences_for
from tests.conftest import random_params


def main(job_path: str, url: str, out_dir: str) -> None:
    initialize_from_env()
    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    tokenizer = load_tokenizer(job["tokenizer"])
    model_config = get_preset("tiny", vocab_size=len(tokenizer))
    plan = plan_from_config({"data": 2, "fsdp": -1})  # every global device
    params = plan.shard_params(model_config, random_params(model_config, seed=0, std=0.5))
    config = SamplerConfig(
        **stop_sequences_for(tokenizer),
        cache_len=128,
        max_prompt_length=48,
        max_prefix_length=32,
        max_new_tokens_per_turn=4,
        max_new_tokens=16,
        max_obs_length=32,
        max_turns=2,
        ingest_chunk=16,
        temperature=1.0,
        decode_path="accelerator",
    )
    retriever = HttpRetriever(url, topk=1, max_retries=2, deadline=30.0)
    sampler = Sampler(model_config, config, tokenizer, retriever, plan=plan, topk=1)
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in job["prompts"]]
    prefixes = [tokenizer.encode(p, add_special_tokens=False) for p in job["prefixes"]]
    out = sampler.generate(params, prompts, seed=0, prefixes=prefixes)
    record = {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "tokens": np.asarray(out.arrays.tokens).tolist(),
        "logprobs": np.asarray(out.arrays.logprobs).tolist(),
        "finish_reasons": out.finish_reasons,
        "queries": out.queries,
        "turn_texts": out.turn_texts,
        "stats": out.stats,
    }
    with open(os.path.join(out_dir, f"process_{jax.process_index()}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
