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
import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dgpo_jax.checkpoint.fileio import write_text_atomically
from dgpo_jax.checkpoint.params import save_params_checkpoint
from dgpo_jax.data.prompts import encode_prompt
from dgpo_jax.data.search_r1 import validate_row
from dgpo_jax.data.synthetic import (
    answer_statistics,
    build_word_tokenizer,
    evidence,
    generate_world,
    write_world,
)
from dgpo_jax.evaluation.stats import DEFAULT_RESAMPLES, bootstrap_mean_ci, paired_difference
from dgpo_jax.launch.coldstart import run_coldstart
from dgpo_jax.launch.evaluate import run_eval
from dgpo_jax.launch.metrics_log import MetricsLogger
from dgpo_jax.launch.train import run_train
from dgpo_jax.learner.batches import TOP_MULTIPLE, trim_to_bucket
from dgpo_jax.learner.optim import OptimConfig
from dgpo_jax.learner.packing import pack_width, trajectory_lengths
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


def train_teacher(qcfg, model_config, seqs, seed: int, workdir: str, params=None):
    """Supervised training (SeqKD objective = NLL on the agent's tokens) of a random model
    (or of ``params``: one more cosine cycle from them), ``qcfg.teacher_steps`` steps."""

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
    if params is None:
        params = init_params(model_config, jax.random.key(seed), jnp.float32)
    state = create_update_state(objective, params, update.tx, seed)
    logger = MetricsLogger(
        workdir, steps, 0, tensorboard=True, progress=True, prefix="teacher_sft_"
    )
    rng = np.random.default_rng(seed)
    n = len(seqs["input_ids"])
    bs = min(qcfg.teacher_batch_size, n)
    tokens = 0
    top = pack_width(trajectory_lengths(seqs["attention_mask"]), TOP_MULTIPLE)
    for step in range(steps):
        idx = rng.choice(n, bs, replace=False)
        state, m = update(state, trim_to_bucket({k: v[idx] for k, v in seqs.items()}, top=top))
        tokens += int(seqs["attention_mask"][idx].sum())
        if step % 10 == 0 or step == steps - 1:
            logger.write(step + 1, jax.device_get(m), tokens=tokens)
            tokens = 0
    logger.close()
    return state.params["policy"]


# ------------------------------------------------------------------------------ the stages ------
# Each stage is the real launcher mode on a config derived from the run's (`stage_config`); the
# quickstart runs them once, `dgpo_jax.launch.compare` once per seed.


def stage_config(cfg, name: str, **changes):
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


def question_scores(results: dict, decoding: str = "greedy") -> dict[str, list[float]]:
    """Per data source (and ``"all"``): the EM of each held-out question, in file order (the
    evaluation's ``_predictions``; the unit every confidence interval resamples)."""
    rows = sorted(
        (p for p in results[decoding]["_predictions"] if p["sample"] == 0),
        key=lambda p: p["index"],
    )
    out: dict[str, list[float]] = {}
    for p in rows:
        out.setdefault(p["data_source"], []).append(float(p["em"]))
    out["all"] = [float(p["em"]) for p in rows]
    return out


@dataclasses.dataclass
class Prepared:
    """The synthetic world of a run and what every stage reads: ``base`` is the run's config
    pointed at the world's files, tokenizer and BM25 index."""

    base: Any
    world: Any
    tokenizer: Any
    retriever: Any
    teacher_config: Any
    expert: dict[str, np.ndarray] | None = None  # the teacher's training data, built once


def prepare_world(cfg) -> Prepared:
    """Generates the synthetic world (``cfg.seed``), its tokenizer and BM25 index in
    ``cfg.workdir`` (an index already there is reused)."""
    q = cfg.quickstart
    os.makedirs(cfg.workdir, exist_ok=True)
    world = generate_world(
        seed=cfg.seed,
        num_entities=q.num_entities,
        prompt_template=q.prompt_template or cfg.data.prompt_template,
        answers=q.answers,
    )
    paths = write_world(world, os.path.join(cfg.workdir, "world"))
    tok_dir = os.path.join(cfg.workdir, "tokenizer")
    expert_text = [" ".join(t for t in expert_turns(world, r)[0]) for r in world.train[:50]]
    tokenizer = build_word_tokenizer(world, tok_dir, extra_texts=expert_text)
    index_dir = os.path.join(cfg.workdir, "index_bm25")
    if not os.path.isdir(index_dir):
        build_index(paths["corpus.jsonl"], index_dir, "bm25")
    retriever = InProcessRetriever(index_dir, topk=cfg.retrieval.topk)
    base = stage_config(
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
    print(
        f"corpus {len(world.corpus)} docs, {len(world.train)} train / {len(world.test)} test "
        f"questions, vocabulary {len(tokenizer)}"
    )
    stats = answer_statistics(world)
    top = max(stats["question_types"].items(), key=lambda kv: kv[1]["majority_share"])
    print(
        f"{q.answers} answers: the most frequent training answer of a question type covers up "
        f"to {top[1]['majority_share']:.1%} of its questions ({top[0]}); guessing it scores EM "
        f"{stats['majority_test_em']:.3f} on the held-out questions (world.json)"
    )
    teacher_config = get_preset(
        q.teacher_preset,
        vocab_size=len(tokenizer),
        remat=cfg.model.remat,  # the teacher stage's update, like every other stage's
        attention=cfg.model.attention,
        attention_block=cfg.model.attention_block,
    )
    return Prepared(base, world, tokenizer, retriever, teacher_config)


def train_em(base, model_dir: str, name: str, seed: int) -> float:
    """Greedy EM of the model in ``model_dir`` on (the first
    ``quickstart.teacher_check_questions`` per data source of) the *training* questions: the
    teacher's and the cold start's stopping signal, which never looks at the held-out
    questions."""
    c = stage_config(
        base,
        name,
        **{
            "model.student": model_dir,
            "data.test_files": base.data.train_files,
            "eval.max_examples": base.quickstart.teacher_check_questions,
            "seed": seed,
        },
    )
    return float(run_eval(c)["final_eval"]["greedy"]["all"]["em"])


def _round_passes(record: dict, em: float, threshold: float, what: str) -> bool:
    """Records a training round's check (``train_em`` in its ``record``), prints it (``what``
    formatted with the record's fields), and says whether the EM reached the threshold."""
    record["train_em"] = round(em, 4)
    print(f"{what.format(**record)}: EM {em:.3f} on training questions (threshold {threshold})")
    return em >= threshold


def teacher_stage(
    prep: Prepared, seed: int, teacher_dir: str, workdir: str, cycles_done: int | None = None
) -> dict:
    """Trains the teacher on the expert trajectories and saves it to ``teacher_dir``.

    With ``quickstart.teacher_min_train_em`` > 0 the teacher trains in cosine cycles of
    ``teacher_steps`` until its greedy EM on training questions reaches that share, at most
    ``teacher_max_rounds`` cycles (a seed whose copying skill forms late gets more steps; the
    held-out questions are never consulted). Returns the steps and train EM per cycle.

    ``cycles_done`` replays a recorded run: exactly that many cycles, without the checks (which
    change no weight), for a teacher trained again only to reproduce its recorded weights.
    """
    cfg, q = prep.base, prep.base.quickstart
    if prep.expert is None:
        rows = prep.world.train[: q.teacher_questions] if q.teacher_questions else prep.world.train
        prep.expert = expert_sequences(
            prep.world,
            rows,
            prep.tokenizer,
            prep.retriever,
            cfg.sampler.max_obs_length,
            cfg.data.use_chat_template,
        )
        print(
            f"{len(rows)} expert trajectories, {prep.expert['input_ids'].shape[1]} positions, "
            f"{prep.teacher_config.num_params() / 1e6:.2f}M-parameter teacher"
        )
    params, rounds = None, []
    replay = cycles_done is not None
    check = q.teacher_min_train_em > 0 and not replay
    for r in range(cycles_done if replay else (q.teacher_max_rounds if check else 1)):
        params = train_teacher(
            q,
            prep.teacher_config,
            prep.expert,
            seed + 1000 * r,  # cycle r > 0: another data order
            os.path.join(workdir, f"teacher_sft_{r}" if r else "teacher_sft"),
            params,
        )
        shutil.rmtree(teacher_dir, ignore_errors=True)
        save_params_checkpoint(prep.teacher_config, params, teacher_dir)
        rounds.append({"steps": q.teacher_steps * (r + 1)})
        if not check:
            continue  # one cycle, or the replayed ones
        check_dir = os.path.join(os.path.relpath(workdir, cfg.workdir), f"teacher_check_{r}")
        em = train_em(cfg, teacher_dir, check_dir, seed)
        if _round_passes(rounds[-1], em, q.teacher_min_train_em, "teacher after {steps} steps"):
            break
    return {"rounds": rounds}


def coldstart_stage(
    base, name: str, teacher_dir: str, seed: int, rounds_done: int | None = None
) -> dict:
    """``mode=coldstart``: KD of a fresh student on the teacher's correct trajectories.

    With ``quickstart.coldstart_min_train_em`` > 0, further rounds of ``coldstart.epochs``
    continue from the last round's student until its greedy EM on training questions reaches
    that share, at most ``coldstart_max_rounds`` rounds (the held-out questions are never
    consulted). Returns the last round's result with ``rounds`` (epochs and train EM each).

    ``rounds_done`` replays a recorded run: exactly that many rounds, without the checks or the
    held-out evaluations (``final_eval`` is None), for a cold start trained again only to
    reproduce its recorded weights.
    """
    q = base.quickstart
    replay = rounds_done is not None
    check = q.coldstart_min_train_em > 0 and not replay
    student, rounds, result = f"preset:{q.student_preset}", [], None
    for r in range(rounds_done if replay else (q.coldstart_max_rounds if check else 1)):
        result = run_coldstart(
            stage_config(
                base,
                name if r == 0 else f"{name}_{r}",
                **{
                    "mode": "coldstart",
                    "seed": seed + 1000 * r,  # round r > 0: another data order
                    "model.student": student,
                    "model.teacher": teacher_dir,
                    "objective.preset": "dgpo_coldstart",
                },
            ),
            evaluate=not replay,
        )
        student = os.path.abspath(result["checkpoint"])
        rounds.append({"epochs": base.coldstart.epochs * (r + 1)})
        if not check:
            continue  # one round, or the replayed ones
        em = train_em(base, student, os.path.join(f"{name}_check", str(r)), seed)
        if _round_passes(
            rounds[-1], em, q.coldstart_min_train_em, "cold start after {epochs} epochs"
        ):
            break
    return {**result, "rounds": rounds}


def rl_stage(base, name: str, preset: str, student: str, teacher_dir: str, seed: int) -> dict:
    """``mode=train`` with objective ``preset`` from the checkpoint ``student``, at the
    quickstart's RL sizes (``quickstart.rl_*``; one update per step)."""
    q = base.quickstart
    return run_train(
        stage_config(
            base,
            name,
            **{
                "mode": "train",
                "seed": seed,
                "model.student": student,
                "model.teacher": teacher_dir,  # loaded only by objectives that use it
                "objective.preset": preset,
                "train.steps": q.rl_steps,
                "data.batch_size": q.rl_batch_size,
                "train.mini_batch_size": q.rl_batch_size,
                "train.ppo_epochs": 1,
                "train.eval_every": 0,
                "train.save_every": max(1, q.rl_steps // 2),
                "optim.actor_lr": q.rl_actor_lr,
                "optim.critic_lr": q.rl_critic_lr,
            },
        )
    )


# ------------------------------------------------------------------------------- the run ------
COLDSTART_ROW = "student + KD cold start"


def run_quickstart(cfg) -> dict:
    q = cfg.quickstart
    t_start = time.time()
    timings = {}

    _stage(f"1/6 synthetic world ({q.num_entities} entities), tokenizer, BM25 index")
    t = time.time()
    prep = prepare_world(cfg)
    base = prep.base
    timings["world"] = time.time() - t

    _stage("2/6 teacher: supervised on scripted expert trajectories")
    t = time.time()
    teacher_dir = os.path.join(cfg.workdir, "teacher")
    teacher = {}
    if cfg.resume and os.path.isdir(teacher_dir):
        print(f"reusing the teacher in {teacher_dir} (--config.resume=True)")
    else:
        teacher = teacher_stage(prep, cfg.seed, teacher_dir, cfg.workdir)
    timings["teacher"] = time.time() - t

    evals = {}
    _stage("3/6 evaluate the teacher and the untrained student")
    t = time.time()
    evals["teacher"] = run_eval(
        stage_config(base, "eval_teacher", **{"model.student": teacher_dir})
    )
    student_src = f"preset:{q.student_preset}"
    evals["student (untrained)"] = run_eval(
        stage_config(base, "eval_student", **{"model.student": student_src})
    )
    timings["eval"] = time.time() - t
    print(json.dumps({k: _em(v["final_eval"]) for k, v in evals.items()}, indent=1))

    _stage("4/6 cold start: KD of the student on the teacher's correct trajectories")
    t = time.time()
    cs = coldstart_stage(base, "coldstart", teacher_dir, cfg.seed)
    evals[COLDSTART_ROW] = cs
    timings["coldstart"] = time.time() - t
    print(f"{cs['num_sequences']} correct teacher trajectories; EM {_em(cs['final_eval'])}")

    _stage("5/6 DGPO from the cold start")
    t = time.time()
    evals["student + KD + DGPO"] = rl_stage(
        base, "dgpo", "dgpo", cs["checkpoint"], teacher_dir, cfg.seed
    )
    timings["dgpo"] = time.time() - t

    elapsed = time.time() - t_start
    if q.ppo_baseline and elapsed + timings["dgpo"] <= q.time_budget_s:
        _stage("6/6 baseline: PPO from the same cold start")
        t = time.time()
        evals["student + KD + PPO"] = rl_stage(
            base, "ppo", "ppo", cs["checkpoint"], teacher_dir, cfg.seed
        )
        timings["ppo"] = time.time() - t
    else:
        _stage("6/6 PPO baseline skipped (time budget)")

    table = {name: _em(r["final_eval"]) for name, r in evals.items()}
    scores = {name: question_scores(r["final_eval"]) for name, r in evals.items()}
    uncertainty = table_uncertainty(scores, COLDSTART_ROW, seed=cfg.seed)
    timings = {k: round(v, 1) for k, v in timings.items()}
    timings["total"] = round(time.time() - t_start, 1)
    result = {
        "table": table,
        "ci95": uncertainty["ci95"],
        "vs_coldstart": uncertainty["vs_coldstart"],
        "statistics": uncertainty["method"],
        "teacher": teacher,
        "decoding": "greedy",
        "split": "test (held-out entities)",
        "seconds": timings,
        "config": cfg.to_dict(),
    }
    write_text_atomically(os.path.join(cfg.workdir, "results.json"), json.dumps(result, indent=1))
    print_table(table, uncertainty["ci95"], uncertainty["vs_coldstart"])
    print(f"\nresults: {os.path.join(cfg.workdir, 'results.json')}  ({timings['total']:.0f}s)")
    return result


def table_uncertainty(
    scores: dict[str, dict[str, list[float]]], reference: str, seed: int = 0
) -> dict:
    """95% CIs of one seed's table: per cell a percentile bootstrap over the held-out
    questions; per row a paired bootstrap of its difference to ``reference`` (the same
    questions) with an exact McNemar p-value. The run's seed is fixed: these intervals say
    how much the table would move with other questions, not with another seed (that is
    ``mode=compare``)."""
    ci = {
        name: {src: list(bootstrap_mean_ci(v, seed=seed)[1:]) for src, v in per.items()}
        for name, per in scores.items()
    }
    vs = {}
    for name, per in scores.items():
        if name != reference and reference in scores:
            d = paired_difference(per["all"], scores[reference]["all"], seed=seed)
            vs[name] = {
                "diff": d.diff,
                "ci_low": d.low,
                "ci_high": d.high,
                "p_value": d.p_value,
                "test": d.test,
            }
    method = (
        f"95% percentile bootstrap over questions ({DEFAULT_RESAMPLES} resamples, seed {seed}); "
        f"differences to {reference!r}: paired bootstrap, exact McNemar p-value"
    )
    return {"ci95": ci, "vs_coldstart": vs, "method": method}


def print_table(
    table: dict[str, dict[str, float]],
    ci: dict[str, dict[str, list[float]]] | None = None,
    vs_reference: dict[str, dict] | None = None,
    reference: str = "KD cold start",
) -> None:
    """The EM table; with ``ci``, each cell as ``0.610 [0.54, 0.68]``; with ``vs_reference``, a
    line per row with its paired difference to the reference row."""
    sources = sorted({s for row in table.values() for s in row if s != "all"}) + ["all"]
    width = max(len(k) for k in table) + 2
    col = 22 if ci else 18
    title = "EM on held-out entities (greedy)"
    print(f"\n{title}" + (", 95% CI over questions" if ci else ""))
    print("model".ljust(width) + "".join(s.rjust(col) for s in sources))
    for name, row in table.items():
        cells = []
        for s in sources:
            cell = f"{row.get(s, float('nan')):.3f}"
            if ci and s in ci.get(name, {}):
                lo, hi = ci[name][s]
                cell += f" [{lo:.2f}, {hi:.2f}]"
            cells.append(cell.rjust(col))
        print(name.ljust(width) + "".join(cells))
    for name, d in (vs_reference or {}).items():
        print(
            f"{name} vs {reference}: {d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            f" (p = {d['p_value']:.2g}, {d['test']})"
        )
