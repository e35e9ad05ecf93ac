"""The launcher's pipeline on a tiny synthetic world: every preset runs, kill -9 + resume equals
an uninterrupted run, and an exported checkpoint reloads in transformers with the same logits."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from dgpo_jax.checkpoint.checkpointer import Checkpointer
from dgpo_jax.config import base_config
from dgpo_jax.curricula.replay import ReplayBuffer
from dgpo_jax.data.search_r1 import read_question_files
from dgpo_jax.data.synthetic import build_word_tokenizer, generate_world, write_world
from dgpo_jax.evaluation import exact_match
from dgpo_jax.launch.context import load_model
from dgpo_jax.launch.evaluate import run_eval
from dgpo_jax.launch.export import run_export
from dgpo_jax.launch.train import run_train
from dgpo_jax.models import Qwen2Config, forward
from dgpo_jax.objectives import OBJECTIVE_PRESETS
from retrieval_service.index import build_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = "Answer with <search> q </search> or <answer> a </answer>. Question: {question}\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    w = generate_world(seed=0, num_entities=40, prompt_template=TEMPLATE)
    paths = write_world(w, d / "world")
    build_word_tokenizer(w, d / "tok")
    build_index(paths["corpus.jsonl"], d / "idx", "bm25")
    return {"dir": d, **paths}


def tiny_config(world, workdir, preset="dgpo", steps=1):
    cfg = base_config()
    cfg.workdir = str(workdir)
    cfg.model.student, cfg.model.teacher = "preset:tiny", "preset:tiny-teacher"
    cfg.model.tokenizer, cfg.model.dtype = str(world["dir"] / "tok"), "float32"
    cfg.data.train_files, cfg.data.test_files = world["train.parquet"], world["test.parquet"]
    cfg.data.use_chat_template = False
    cfg.retrieval.kind, cfg.retrieval.index_dir = "in_process", str(world["dir"] / "idx")
    cfg.retrieval.topk = 1
    # One device: the sharded paths are covered by test_sharding / test_sampler /
    # test_update_step; 8-way programs on fake CPU devices compile several times slower.
    cfg.mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    cfg.mesh.num_devices = 1
    s = cfg.sampler
    # The scanned decode path compiles ~3x faster than "auto"'s CPU path; the CPU path is the
    # subject of test_sampler_waves / test_sampler / test_model, not of these launcher runs.
    s.decode_path = "accelerator"
    s.max_turns, s.max_new_tokens_per_turn, s.max_new_tokens = 1, 6, 12
    s.max_obs_length, s.max_prompt_length, s.cache_len, s.ingest_chunk = 32, 40, 96, 16
    cfg.data.batch_size = cfg.train.mini_batch_size = 4
    cfg.train.micro_batch_size = 2
    cfg.train.steps, cfg.train.save_every, cfg.train.eval_every = steps, 1, 0
    cfg.eval.at_end, cfg.logging.progress, cfg.logging.tensorboard = False, False, False
    cfg.optim.actor_warmup_ratio = cfg.optim.critic_warmup_ratio = 0.0
    cfg.optim.actor_lr = 1e-3
    cfg.objective.preset = preset
    if preset == "grpo":
        cfg.data.rollouts_per_prompt = 2
    if preset in ("dgpo", "grpo"):
        # two PPO mini-batches: the loop's whole-batch pass (UpdateStep.prepare_rollout) runs
        cfg.train.mini_batch_size = 2
    if preset == "tropd":
        cfg.curriculum.teacher_prefix_share = 0.5
        cfg.curriculum.teacher_prefix_tokens = 4
    if preset == "guided_opd":
        cfg.curriculum.guided_p0 = 0.5
    if preset in ("kd", "seqkd", "gkd", "distillm", "taid"):
        # A random teacher is never correct; student data keeps the step busy.
        cfg.curriculum.student_data_fraction = 1.0
    return cfg


# One run per distinct launcher path: dgpo (critic, teacher token reward; the kill -9 test's
# uninterrupted run), ppo (critic, ref scorer; the export test's run), distillm (adaptive share,
# replay; its resume test), grpo (groups, ref scorer), exopd (teacher and ref scorers: opd's path
# plus the ref scorer), tropd (teacher prefixes), guided_opd (teacher turns), kd (teacher-generated
# data), taid (its t schedule). opd, seqkd and gkd share those paths (opd is exopd without the
# ref scorer; seqkd and gkd are kd with another divergence); every preset's objective is covered
# at the update-step level by test_update_step::test_each_preset_moves_its_objective_down.
SMOKE_PRESETS = ["exopd", "grpo", "guided_opd", "kd", "taid", "tropd"]
RUN_BY_OTHER_TESTS = {"dgpo", "ppo", "distillm"}
SHARED_PATH_PRESETS = {"opd", "seqkd", "gkd"}


def test_smoke_runs_cover_every_training_preset():
    groups = (set(SMOKE_PRESETS), RUN_BY_OTHER_TESTS, SHARED_PATH_PRESETS)
    assert set.union(*groups) == set(OBJECTIVE_PRESETS) - {"dgpo_coldstart"}
    assert sum(map(len, groups)) == len(set.union(*groups))  # disjoint


def assert_smoke_run(workdir, steps, first_update=1):
    """A finished run: one metrics record per step, every number finite, the reward logged (but
    on a step trained on replayed rows only, which samples nothing) and the loss from step
    ``first_update`` on, the last steps' checkpoints saved (save_every 1, max_to_keep 3)."""
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        numbers = [v for k, v in r.items() if isinstance(v, (int, float))]
        assert all(np.isfinite(numbers)), r
        assert "reward" in r or r.get("replay_data") == 1.0, r
        assert "loss" in r or r["step"] < first_update, r
    assert Checkpointer(str(workdir / "checkpoints")).all_steps() == list(range(1, steps + 1))[-3:]


@pytest.mark.parametrize("preset", SMOKE_PRESETS)
def test_preset_smoke(world, tmp_path, preset):
    run_train(tiny_config(world, tmp_path, preset))
    assert_smoke_run(tmp_path, 1)


def _policy(workdir, step):
    state, meta = Checkpointer(os.path.join(workdir, "checkpoints")).restore(step)
    return state["train"]["params"]["policy"], meta


def test_kill9_and_resume_matches_uninterrupted(world, tmp_path):
    steps = 3
    run_train(tiny_config(world, tmp_path / "straight", steps=steps))
    assert_smoke_run(tmp_path / "straight", steps)  # dgpo's smoke run
    # The same run in a subprocess, killed with SIGKILL once step 1 is committed.
    cfg = tiny_config(world, tmp_path / "killed", steps=50)
    script = tmp_path / "run.py"
    script.write_text(
        "import ml_collections, sys\n"
        "from dgpo_jax.launch.train import run_train\n"
        f"cfg = ml_collections.ConfigDict({cfg.to_dict()!r})\n"
        "run_train(cfg)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckdir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (ckdir / "1" / "commit_success.txt").exists() or (ckdir / "2").exists():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = tiny_config(world, tmp_path / "killed", steps=steps)
    resumed.resume = True
    run_train(resumed)
    a, _ = _policy(tmp_path / "straight", steps)
    b, meta = _policy(tmp_path / "killed", steps)
    assert meta["step"] == steps
    # One optimizer step moves parameters by ~lr = 1e-3 (Adam), so a lost or repeated step, or
    # another data order, is far outside atol; atol 5e-5 leaves room for float noise that
    # Adam's normalisation amplifies on near-zero gradients (docs/design.md, 2026-12-02).
    prev, _ = _policy(tmp_path / "straight", steps - 1)
    step_size = max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(prev))
    )
    assert step_size > 2e-4, step_size
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=5e-5)


def _distillm_config(world, workdir, steps):
    cfg = tiny_config(world, workdir, preset="distillm", steps=steps)
    o = cfg.curriculum
    o.student_data_fraction = 0.0  # the preset's start: teacher data only
    # Every validation loss counts as a rise (the first comparison point is a validation before
    # training), so the share climbs 0 -> 0.5 -> 1 after steps 1 and 2.
    o.distillm_loss_rise, o.distillm_share_step = -1e9, 0.5
    cfg.train.val_every = 1
    o.replay_buffer_size = 6  # smaller than two batches of 4: the buffer drops old rows
    return cfg


def test_distillm_adaptive_share_and_replay_resume_exactly(world, tmp_path):
    """DistiLLM in the loop: a validation before training sets the comparison point, a
    validation loss every val_every steps drives the student-data share (0 -> 0.5 -> 1 here),
    fresh student rollouts go through the replay buffer (and are trained on), and a run stopped
    after step 4 and resumed ends with the same parameters as an uninterrupted one (the buffer,
    the share and the per-step random draws all come back)."""

    steps = 5
    run_train(_distillm_config(world, tmp_path / "straight", steps))
    # Steps 1-2 draw teacher data (share 0, 0.5), and a random teacher is never correct: the
    # updates start at step 3, on student data (share 1).
    assert_smoke_run(tmp_path / "straight", steps, first_update=3)
    with open(tmp_path / "straight" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["student_share"] for r in rows] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert all(np.isfinite(r["val_loss"]) for r in rows)
    # share 0: teacher data; share 1: fresh student samples or the buffer, never the teacher
    assert rows[0]["student_data"] == 0.0
    assert [r["student_data"] for r in rows[2:]] == [1.0, 1.0, 1.0]
    assert all(r["replay_data"] <= r["student_data"] for r in rows)
    replay = tmp_path / "straight" / "replay"
    assert len(ReplayBuffer.load(str(replay / "replay_4.npz"))) in (4, 6)
    assert len(ReplayBuffer.load(str(replay / "replay_5.npz"))) == 6  # capacity, not 8 or 12

    run_train(_distillm_config(world, tmp_path / "resumed", 4))
    resumed = _distillm_config(world, tmp_path / "resumed", steps)
    resumed.resume = True
    run_train(resumed)
    a, _ = _policy(tmp_path / "straight", steps)
    b, meta = _policy(tmp_path / "resumed", steps)
    assert meta["extra"]["student_share"] == 1.0
    prev, _ = _policy(tmp_path / "straight", steps - 1)
    assert (
        max(
            float(np.abs(np.asarray(x) - np.asarray(y)).max())
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(prev))
        )
        > 2e-4
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=5e-5)
    # a checkpoint whose buffer is gone is an error, not a silently emptied buffer
    os.remove(tmp_path / "resumed" / "replay" / "replay_5.npz")
    again = _distillm_config(world, tmp_path / "resumed", steps + 1)
    again.resume = True
    with pytest.raises(FileNotFoundError, match="has no replay buffer"):
        run_train(again)


def test_export_reloads_in_transformers(world, tmp_path):
    import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)
    import transformers  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    cfg = tiny_config(world, tmp_path, "ppo", steps=1)
    run_train(cfg)
    assert_smoke_run(tmp_path, 1)  # ppo's smoke run
    out = run_export(cfg)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    policy, meta = _policy(tmp_path, 1)

    config = Qwen2Config.from_hf_dict(meta["model_config"])
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 9))
    ours = np.asarray(forward(config, policy, ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() < 1e-4
    # The RL checkpoint also serves as a model source (--config.model.student=.../checkpoints).

    _, loaded = load_model(str(tmp_path / "checkpoints"), "float32", config.vocab_size)
    for x, y in zip(jax.tree.leaves(policy), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # ... and mode=eval in the run's workdir evaluates that checkpoint.

    cfg.eval.max_examples = 2
    assert run_eval(cfg)["step"] == 1
    assert os.path.isfile(tmp_path / "eval" / "eval_step_1.json")


def test_eval_writes_one_prediction_per_question(world, tmp_path):
    """mode=eval writes NAME.predictions.jsonl: one row per (decoding, question, draw) in the
    test file's order, with that question's golds; its EM column agrees with the summary and
    with exact_match on its own answer column; the summary JSON does not repeat the rows. Two
    sampled draws per question use different keys, and the greedy-against-sampled summary
    agrees with a NumPy count over the rows."""

    cfg = tiny_config(world, tmp_path)
    cfg.eval.max_examples, cfg.eval.batch_size, cfg.eval.sampled = 3, 4, True
    cfg.eval.sampled_repeats = 2
    results = run_eval(cfg)["final_eval"]
    with open(tmp_path / "eval" / "eval.predictions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    kept, seen = [], {}
    for r in read_question_files([world["test.parquet"]]):
        if seen.get(r.data_source, 0) < 3:
            seen[r.data_source] = seen.get(r.data_source, 0) + 1
            kept.append(r)
    assert sorted(results) == sorted({r["decoding"] for r in rows}) and len(results) == 2
    for decoding in results:
        mine = [r for r in rows if r["decoding"] == decoding]
        draws = 1 if decoding == "greedy" else 2
        assert [r["index"] for r in mine] == list(range(len(kept))) * draws
        assert [r["sample"] for r in mine] == [d for d in range(draws) for _ in kept]
        for row, rec in zip(mine, kept * draws):
            assert (row["data_source"], row["golds"], row["row_index"]) == (
                rec.data_source,
                list(rec.golds),
                rec.index,
            )
            # the question alone: what follows the template's "Question: ", not its instruction
            assert rec.user_content.rstrip().endswith(" " + row["question"])
            assert row["question"].endswith("?") and "Question" not in row["question"]
            assert TEMPLATE.split("Question")[0].strip() not in row["question"]
            assert row["em"] == exact_match(row["answer"], rec.golds)
        for source, summary in results[decoding].items():
            if not source.startswith("_"):
                ems = [r["em"] for r in mine if source in ("all", r["data_source"])]
                assert summary["count"] == len(ems) and summary["em"] == pytest.approx(np.mean(ems))
    sampled = next(d for d in results if d != "greedy")
    shown = results[sampled]["_samples"]  # the first 8 per source: both draws of 3 questions
    assert len(shown) == 2 * len(kept)
    first, second = shown[: len(kept)], shown[len(kept) :]
    assert [s["golds"] for s in first] == [s["golds"] for s in second]
    assert any(a["response"] != b["response"] for a, b in zip(first, second))
    greedy_em = np.array([r["em"] for r in rows if r["decoding"] == "greedy"])
    draws_em = np.array([r["em"] for r in rows if r["decoding"] == sampled]).reshape(2, -1)
    vs = results[sampled]["_vs_greedy"]["all"]
    right = greedy_em > 0
    assert vs["k"] == 2 and vs["n_greedy_right"] == right.sum()
    assert vs["pass_at_k"] == pytest.approx(draws_em.max(0).mean())
    assert vs["sampled_em"] == pytest.approx(draws_em.mean())
    if (~right).any():
        assert vs["sampled_em_greedy_wrong"] == pytest.approx(draws_em[:, ~right].mean())
    with open(tmp_path / "eval" / "eval.json") as f:
        saved = json.load(f)
        assert "_predictions" not in json.dumps(saved)
        assert saved["results"][sampled]["_vs_greedy"]["all"]["k"] == 2
    with open(tmp_path / "eval" / "eval.md") as f:
        assert f"{sampled} against greedy, 2 draw(s) per question" in f.read()
