"""The quickstart: DGPO end to end on the built-in synthetic world, on a CPU, in minutes.

1. Generate the synthetic encyclopedia (fictional people, places, organisations), its
   Search-R1-format questions (single-hop and two-hop, train/test split by entity), a
   word-level tokenizer and a BM25 index.
2. Train a small Qwen2-architecture *teacher* to search and answer: supervised on scripted
   expert trajectories (think, search the entity, read the retrieved documents, search the
   linked entity for two-hop questions, quote the sentence that states the answer, answer),
   with the observations produced by the real retriever and tokenized exactly as the sampler
   inserts them (loss on the agent's tokens only).
3. Then the real pipeline, the same code as ``mode=eval|coldstart|train``:
   evaluate the untrained student and the teacher; cold-start a smaller *student* by KD on the
   teacher's correct trajectories; run DGPO from the cold start; time allowing, PPO from the
   same cold start as a baseline.
4. Print the EM table (held-out entities, single-hop and two-hop, greedy decoding) and write it
   to ``WORKDIR/results.json``. Every number comes from this run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.checkpoint.fileio import write_text_atomically
from dgpo_jax.checkpoint.params import save_params_checkpoint
from dgpo_jax.data.prompts import encode_prompt
from dgpo_jax.data.search_r1 import validate_row
from dgpo_jax.data.synthetic import build_word_tokenizer, evidence, generate_world, write_world
from dgpo_jax.launch.coldstart import run_coldstart
from dgpo_jax.launch.evaluate import run_eval
from dgpo_jax.launch.metrics_log import MetricsLogger
from dgpo_jax.launch.train import run_train
from dgpo_jax.learner.batches import trim_to_bucket
from dgpo_jax.learner.optim import OptimConfig
from dgpo_jax.learner.update_step import create_update_state, make_update_step
from dgpo_jax.models import get_preset, init_params
from dgpo_jax.objectives.presets import get_objective
from dgpo_jax.retrieval import InProcessRetriever, information_observation
from retrieval_service.index import build_index

log = logging.getLogger(__name__)


def _stage(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


# ------------------------------------------------------------------------ expert trajectories ---
def expert_turns(world, row: dict) -> tuple[list[str], list[str]]:
    """(turn texts, search queries) of a scripted expert answering ``row``.

    The expert searches each entity of the question's chain, then quotes the sentence of the
    last document that states the answer and answers::

        <think> I need to find Kalo Venter </think> <search> Kalo Venter </search>
        <think> Kalo Venter is an engineer born in Port Avel in 1954 </think> <answer> 1954 </answer>

    Quoting turns finding the answer into copying: each quoted word follows the one before it
    in the document, and the answer repeats the end of the quote. Without the quote ("So the
    answer is 1954") the 0.7M-parameter teacher never learned to pick professions, years or a
    founder's first name out of a document (docs/quickstart.md).
    """

    by_doc = {e.doc_id: e for e in world.entities}
    extra = row["extra_info"]
    chain = [by_doc[d] for d in extra["gold_doc_ids"]]
    answer = row["golden_answers"][0]
    turns, queries = [], []
    for hop, entity in enumerate(chain):
        lead = "I need to find" if hop == 0 else "Now I need to find"
        turns.append(f"<think> {lead} {entity.name} </think> <search> {entity.name} </search>")
        queries.append(entity.name)
    turns.append(f"<think> {evidence(chain[-1], answer)} </think> <answer> {answer} </answer>")
    return turns, queries


def expert_sequences(
    world, rows, tokenizer, retriever, max_obs_length: int, use_chat_template: bool
) -> dict[str, np.ndarray]:
    """Token ids, attention and loss masks of the expert trajectories (right-padded)."""

    seqs, masks = [], []
    all_queries = []
    plans = [expert_turns(world, r) for r in rows]
    for _, q in plans:
        all_queries.extend(q)
    docs = {}
    for lo in range(0, len(all_queries), 256):
        batch = all_queries[lo : lo + 256]
        docs.update(zip(batch, retriever.search(batch)))
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)
    for i, (row, (turns, queries)) in enumerate(zip(rows, plans)):
        ids = encode_prompt(validate_row(row, f"expert row {i}"), tokenizer, use_chat_template)
        mask = [0] * len(ids)
        for t, turn in enumerate(turns):
            turn_ids = enc(turn)
            ids += turn_ids
            mask += [1] * len(turn_ids)
            if t < len(queries):
                obs = enc(information_observation(docs[queries[t]]))[:max_obs_length]
                ids += obs
                mask += [0] * len(obs)
        seqs.append(ids)
        masks.append(mask)
    width = max(len(s) for s in seqs)
    width += (-width) % 64
    out = {
        "input_ids": np.zeros((len(seqs), width), np.int32),
        "attention_mask": np.zeros((len(seqs), width), np.int32),
        "loss_mask": np.zeros((len(seqs), width), np.float32),
    }
    for i, (s, m) in enumerate(zip(seqs, masks)):
        out["input_ids"][i, : len(s)] = s
        out["attention_mask"][i, : len(s)] = 1
        out["loss_mask"][i, : len(s)] = m
    return out


def train_teacher(qcfg, model_config, seqs, seed: int, workdir: str):
    """Supervised training (SeqKD objective = NLL on the agent's tokens) of a random model."""

    objective = get_objective("seqkd")
    steps = qcfg.teacher_steps
    update = make_update_step(
        objective,
        model_config,
        None,
        optimizer=OptimConfig(
            lr=qcfg.teacher_lr,
            schedule="cosine",
            warmup_steps=steps // 20,
            total_steps=steps,
            weight_decay=0.0,
            grad_clip=1.0,
        ),
    )
    params = init_params(model_config, jax.random.key(seed), jnp.float32)
    state = create_update_state(objective, params, update.tx, seed)
    logger = MetricsLogger(
        workdir, steps, 0, tensorboard=True, progress=True, prefix="teacher_sft_"
    )
    rng = np.random.default_rng(seed)
    n = len(seqs["input_ids"])
    bs = min(qcfg.teacher_batch_size, n)
    tokens = 0
    for step in range(steps):
        idx = rng.choice(n, bs, replace=False)
        state, m = update(state, trim_to_bucket({k: v[idx] for k, v in seqs.items()}))
        tokens += int(seqs["attention_mask"][idx].sum())
        if step % 10 == 0 or step == steps - 1:
            logger.write(step + 1, jax.device_get(m), tokens=tokens)
            tokens = 0
    logger.close()
    return state.params["policy"]


# ------------------------------------------------------------------------------- the run ------
def _sub(cfg, name: str, **changes):
    """A copy of ``cfg`` for one stage, in a fresh ``WORKDIR/name`` (stages never resume:
    ``--config.resume=True`` only reuses a trained teacher)."""
    c = copy.deepcopy(cfg)
    with c.unlocked():
        c.resume = False
        if name != ".":
            shutil.rmtree(os.path.join(cfg.workdir, name), ignore_errors=True)
        c.workdir = os.path.join(cfg.workdir, name)
        for key, value in changes.items():
            node = c
            *path, last = key.split(".")
            for p in path:
                node = node[p]
            node[last] = value
    return c


def _em(results: dict, decoding: str = "greedy") -> dict[str, float]:
    per = results[decoding]
    return {src: round(m["em"], 3) for src, m in per.items() if not src.startswith("_")}


def _train_teacher_stage(cfg, q, world, tokenizer, retriever, teacher_config, teacher_dir):
    rows = world.train[: q.teacher_questions] if q.teacher_questions else world.train
    seqs = expert_sequences(
        world, rows, tokenizer, retriever, cfg.sampler.max_obs_length, cfg.data.use_chat_template
    )
    print(
        f"{len(rows)} expert trajectories, {seqs['input_ids'].shape[1]} positions, "
        f"{teacher_config.num_params() / 1e6:.2f}M-parameter teacher"
    )
    teacher_params = train_teacher(
        q, teacher_config, seqs, cfg.seed, os.path.join(cfg.workdir, "teacher_sft")
    )
    shutil.rmtree(teacher_dir, ignore_errors=True)
    save_params_checkpoint(teacher_config, teacher_params, teacher_dir)


def run_quickstart(cfg) -> dict:
    q = cfg.quickstart
    t_start = time.time()
    os.makedirs(cfg.workdir, exist_ok=True)
    timings = {}

    _stage(f"1/6 synthetic world ({q.num_entities} entities), tokenizer, BM25 index")
    t = time.time()
    world = generate_world(
        seed=cfg.seed,
        num_entities=q.num_entities,
        prompt_template=q.prompt_template or cfg.data.prompt_template,
    )
    paths = write_world(world, os.path.join(cfg.workdir, "world"))
    tok_dir = os.path.join(cfg.workdir, "tokenizer")
    expert_text = [" ".join(t for t in expert_turns(world, r)[0]) for r in world.train[:50]]
    tokenizer = build_word_tokenizer(world, tok_dir, extra_texts=expert_text)
    index_dir = os.path.join(cfg.workdir, "index_bm25")
    if not os.path.isdir(index_dir):
        build_index(paths["corpus.jsonl"], index_dir, "bm25")
    retriever = InProcessRetriever(index_dir, topk=cfg.retrieval.topk)
    base = _sub(
        cfg,
        ".",
        **{
            "model.tokenizer": tok_dir,
            "retrieval.kind": "in_process",
            "retrieval.index_dir": index_dir,
            "data.train_files": paths["train.parquet"],
            "data.test_files": paths["test.parquet"],
        },
    )
    with base.unlocked():
        base.workdir = cfg.workdir
    vocab = len(tokenizer)
    print(
        f"corpus {len(world.corpus)} docs, {len(world.train)} train / {len(world.test)} test "
        f"questions, vocabulary {vocab}"
    )
    timings["world"] = time.time() - t

    _stage("2/6 teacher: supervised on scripted expert trajectories")
    t = time.time()
    teacher_dir = os.path.join(cfg.workdir, "teacher")
    teacher_config = get_preset(q.teacher_preset, vocab_size=vocab)
    if cfg.resume and os.path.isdir(teacher_dir):
        print(f"reusing the teacher in {teacher_dir} (--config.resume=True)")
    else:
        _train_teacher_stage(cfg, q, world, tokenizer, retriever, teacher_config, teacher_dir)
    timings["teacher"] = time.time() - t

    table = {}
    _stage("3/6 evaluate the teacher and the untrained student")
    t = time.time()
    student_src = f"preset:{q.student_preset}"
    table["teacher"] = _em(
        run_eval(_sub(base, "eval_teacher", **{"model.student": teacher_dir}))["final_eval"]
    )
    table["student (untrained)"] = _em(
        run_eval(_sub(base, "eval_student", **{"model.student": student_src}))["final_eval"]
    )
    timings["eval"] = time.time() - t
    print(json.dumps(table, indent=1))

    _stage("4/6 cold start: KD of the student on the teacher's correct trajectories")
    t = time.time()
    cs = run_coldstart(
        _sub(
            base,
            "coldstart",
            **{
                "mode": "coldstart",
                "model.student": student_src,
                "model.teacher": teacher_dir,
                "objective.preset": "dgpo_coldstart",
            },
        )
    )
    table["student + KD cold start"] = _em(cs["final_eval"])
    timings["coldstart"] = time.time() - t
    print(
        f"{cs['num_sequences']} correct teacher trajectories; EM {table['student + KD cold start']}"
    )

    _stage("5/6 DGPO from the cold start")
    t = time.time()
    rl = {
        "train.steps": q.rl_steps,
        "data.batch_size": q.rl_batch_size,
        "train.mini_batch_size": q.rl_batch_size,
        "train.ppo_epochs": 1,
        "train.eval_every": 0,
        "train.save_every": max(1, q.rl_steps // 2),
        "optim.actor_lr": q.rl_actor_lr,
        "optim.critic_lr": q.rl_critic_lr,
    }
    dg = run_train(
        _sub(
            base,
            "dgpo",
            **{
                "mode": "train",
                "model.student": cs["checkpoint"],
                "model.teacher": teacher_dir,
                "objective.preset": "dgpo",
                **rl,
            },
        )
    )
    table["student + KD + DGPO"] = _em(dg["final_eval"])
    timings["dgpo"] = time.time() - t

    elapsed = time.time() - t_start
    if q.ppo_baseline and elapsed + timings["dgpo"] <= q.time_budget_s:
        _stage("6/6 baseline: PPO from the same cold start")
        t = time.time()
        pp = run_train(
            _sub(
                base,
                "ppo",
                **{
                    "mode": "train",
                    "model.student": cs["checkpoint"],
                    "model.teacher": "",
                    "objective.preset": "ppo",
                    **rl,
                },
            )
        )
        table["student + KD + PPO"] = _em(pp["final_eval"])
        timings["ppo"] = time.time() - t
    else:
        _stage("6/6 PPO baseline skipped (time budget)")

    timings = {k: round(v, 1) for k, v in timings.items()}
    timings["total"] = round(time.time() - t_start, 1)
    result = {
        "table": table,
        "decoding": "greedy",
        "split": "test (held-out entities)",
        "seconds": timings,
        "config": cfg.to_dict(),
    }
    write_text_atomically(os.path.join(cfg.workdir, "results.json"), json.dumps(result, indent=1))
    print_table(table)
    print(f"\nresults: {os.path.join(cfg.workdir, 'results.json')}  ({timings['total']:.0f}s)")
    return result


def print_table(table: dict[str, dict[str, float]]) -> None:
    sources = sorted({s for row in table.values() for s in row if s != "all"}) + ["all"]
    width = max(len(k) for k in table) + 2
    print("\nEM on held-out entities (greedy)")
    print("model".ljust(width) + "".join(s.rjust(18) for s in sources))
    for name, row in table.items():
        print(name.ljust(width) + "".join(f"{row.get(s, float('nan')):18.3f}" for s in sources))
