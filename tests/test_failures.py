"""Failures a user can act on: every entry point reports the project's own errors as one
``error:`` line (+ ``hint:``) and exit status 2 without a traceback (``--debug`` shows it);
over-long prompts, empty steps and micro-batches are never handled silently; a retrieval
server that dies mid-run stops the run cleanly with its last checkpoint intact, and
``resume`` continues once the server is back."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dgpo_jax.checkpoint.checkpointer import Checkpointer
from dgpo_jax.checkpoint.params import model_source_kind, save_params_checkpoint
from dgpo_jax.data.pipeline import PromptBatches
from dgpo_jax.data.prompts import encode_prompt, fit_prompts
from dgpo_jax.data.search_r1 import DataError, QARecord, read_question_files
from dgpo_jax.errors import (
    MissingFileError,
    ModelFormatError,
    NothingToTrainError,
    UserError,
    run_cli,
)
from dgpo_jax.launch import train as train_module
from dgpo_jax.launch.metrics_log import read_metrics
from dgpo_jax.launch.train import run_train
from dgpo_jax.learner.batches import ScoredRollouts, micro_batches
from dgpo_jax.models import get_preset
from dgpo_jax.models.tokenizer import load_tokenizer
from dgpo_jax.retrieval.errors import RetrievalError
from tests.test_pipeline import tiny_config, world  # noqa: F401 (the module-scoped fixture)
from tests.test_retrieval_server import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, **(env or {})),
    )


def _bad_inputs(tmp, tiny_world=None):
    """A HF directory without config.json, a file that is not parquet, a corpus with a bad
    line, an index directory with a broken manifest; with ``world``, a launcher config file
    of a tiny run on it (``cfg.py``)."""
    if tiny_world is not None:
        cfg = tiny_config(tiny_world, tmp / "run")
        (tmp / "cfg.py").write_text(
            "import ml_collections\n\n\ndef get_config():\n"
            f"    return ml_collections.ConfigDict({cfg.to_dict()!r})\n"
        )
    (tmp / "nocfg").mkdir()
    (tmp / "nocfg" / "model.safetensors").write_bytes(b"\0" * 16)
    (tmp / "bad.parquet").write_text("not parquet")
    (tmp / "corpus.jsonl").write_text('{"id": "1", "contents": "a"}\nnot json\n')
    (tmp / "idx").mkdir()
    (tmp / "idx" / "manifest.json").write_text("{")
    return tmp


ENTRY_POINT_CASES = {
    # name: (module, arguments, text the message must contain)
    "launcher_data_file": (
        "dgpo_jax.launch",
        ["--config=TMP/cfg.py", "--config.data.train_files=TMP/bad.parquet"],
        "bad.parquet: not a readable parquet file",
    ),
    "launcher_model_without_config_json": (
        "dgpo_jax.launch",
        ["--config=TMP/cfg.py", "--config.model.student=TMP/nocfg"],
        "model.student",
    ),
    "convert_hf_without_config": (
        "dgpo_jax.checkpoint.convert",
        ["hf-to-ckpt", "--hf", "TMP/nocfg", "--out", "TMP/out"],
        "config.json",
    ),
    "build_index_bad_line": (
        "retrieval_service.build_index",
        ["--corpus", "TMP/corpus.jsonl", "--out", "TMP/i", "--kind", "bm25", "--no-progress"],
        "line 2",
    ),
    "serve_broken_index": (
        "retrieval_service.serve",
        ["--index", "TMP/idx", "--port", "1"],
        "manifest.json",
    ),
    "synthetic_world_too_small": (
        "dgpo_jax.data.synthetic",
        ["--out", "TMP/w", "--num-entities", "3"],
        "num_entities must be at least 20",
    ),
}


@pytest.mark.parametrize("case", sorted(ENTRY_POINT_CASES))
def test_entry_points_print_one_line_errors(case, world, tmp_path):  # noqa: F811
    module, args, culprit = ENTRY_POINT_CASES[case]
    _bad_inputs(tmp_path, world)
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    out = _run(module, *args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and culprit in errors[0], out.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "i").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_debug_shows_the_traceback(tmp_path):
    _bad_inputs(tmp_path)
    out = _run(
        "dgpo_jax.checkpoint.convert",
        "hf-to-ckpt",
        "--hf",
        str(tmp_path / "nocfg"),
        "--out",
        str(tmp_path / "out"),
        env={"DGPO_DEBUG": "1"},
    )
    assert out.returncode == 1 and "Traceback" in out.stderr and "config.json" in out.stderr


def test_run_cli_reports_user_errors_and_keeps_bugs(capsys):
    def fails(args):
        raise DataError("train.parquet: row 3: field 'prompt': expected a list", hint="fix it")

    with pytest.raises(SystemExit) as info:
        run_cli(fails, ["--x"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: train.parquet: row 3: field 'prompt': expected a list",
        "hint: fix it",
    ]
    with pytest.raises(DataError):  # --debug: the traceback
        run_cli(fails, ["--debug"])

    def bug(args):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # not a user error: its traceback is kept
        run_cli(bug, [])


def test_model_directory_without_config_json_is_named(tmp_path):
    _bad_inputs(tmp_path)
    with pytest.raises(ModelFormatError, match="without its config.json.*model.safetensors"):
        model_source_kind(str(tmp_path / "nocfg"), "model.student")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="neither a Hugging Face model directory"):
        model_source_kind(str(tmp_path / "empty"), "model.student")
    with pytest.raises(MissingFileError, match="model.teacher .*no such directory"):
        model_source_kind(str(tmp_path / "nothere"), "model.teacher")


def test_micro_batches_are_never_larger_than_asked():
    # (rows, at most per micro-batch) -> micro-batches: the largest divisor <= the limit
    cases = {(4, 3): 2, (4, 2): 2, (4, 4): 1, (4, 32): 1, (7, 3): 7, (12, 5): 3, (512, 48): 16}
    for (rows, limit), expected in cases.items():
        m = micro_batches(rows, limit)
        assert m == expected and rows % m == 0 and rows // m <= limit, (rows, limit, m)


def _record(i):
    return QARecord("nq", (("user", "q"),), ("a",), "train", i, f"train.parquet: row {i}")


def test_fit_prompts_error_left_and_drop():
    prompts = [[1, 2, 3], [1, 2, 3, 4, 5, 6], [7, 8]]
    records = [_record(i) for i in range(3)]
    with pytest.raises(DataError, match="train.parquet: row 1: the prompt has 6 tokens.*=4"):
        fit_prompts(prompts, records, 4, "error")
    assert fit_prompts(prompts, records, 4, "left") == (
        [[1, 2, 3], [3, 4, 5, 6], [7, 8]],
        [0, 1, 2],
    )
    assert fit_prompts(prompts, records, 4, "drop") == ([[1, 2, 3], [7, 8]], [0, 2])


def _prompt_lengths(cfg, steps):
    """Each step's prompt lengths, in the data order the run draws."""
    tok = load_tokenizer(cfg.model.tokenizer)
    records = read_question_files([cfg.data.train_files])
    batches = PromptBatches(records, cfg.data.batch_size, seed=cfg.seed, shuffle=True)
    return [
        [len(encode_prompt(r, tok, cfg.data.use_chat_template)) for r in next(batches)]
        for _ in range(steps)
    ]


def test_overlong_prompts_stop_before_training(world, tmp_path):  # noqa: F811
    cfg = tiny_config(world, tmp_path / "error")
    cfg.sampler.max_prompt_length = 8  # every prompt is longer
    with pytest.raises(DataError, match=r"train.parquet: row \d+: the prompt has \d+ tokens"):
        run_train(cfg)
    cfg = tiny_config(world, tmp_path / "drop")
    cfg.sampler.max_prompt_length, cfg.data.truncation = 8, "drop"
    with pytest.raises(NothingToTrainError, match="all 4 prompts are longer"):
        run_train(cfg)
    for run in ("error", "drop"):  # nothing trained, nothing saved, nothing logged
        assert Checkpointer(str(tmp_path / run / "checkpoints")).all_steps() == []
        assert not read_metrics(str(tmp_path / run / "metrics.jsonl"))


def test_a_step_without_student_tokens_is_an_error(world, tmp_path, monkeypatch):  # noqa: F811
    """Rollouts that all finished without a student token (here made so by the scorer) stop
    the run before the update."""

    class NoTokens:
        def generate(self, params, prompts, **kw):
            return len(prompts)

    def score(rows, records, tokenizer, groups):
        batch = {
            "input_ids": np.ones((rows, 8), np.int32),
            "attention_mask": np.ones((rows, 8), np.int32),
            "loss_mask": np.zeros((rows, 8), np.float32),
        }
        reasons = ["context_full"] * rows
        return ScoredRollouts(batch, [""] * rows, [None] * rows, np.zeros(rows), np.zeros(rows),
                              reasons, 0)  # fmt: skip

    monkeypatch.setattr(train_module.RunContext, "sampler", lambda self, *a, **k: NoTokens())
    monkeypatch.setattr(train_module, "score_rollout", score)
    with pytest.raises(NothingToTrainError, match="step 1: none of the 8 rollouts.*context_full"):
        run_train(tiny_config(world, tmp_path, preset="grpo"))
    assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == []


def _agent_like_student(tokenizer_dir, directory):
    """A tiny student that searches (benchmarks/rollout.py's edited weights) as a checkpoint."""
    path = os.path.join(ROOT, "benchmarks", "rollout.py")
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok = load_tokenizer(str(tokenizer_dir))
    config = get_preset(
        "tiny",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    save_params_checkpoint(config, bench.agent_like_params(config, tok), str(directory))


def test_retrieval_server_killed_mid_run(world, tmp_path, monkeypatch):  # noqa: F811
    """The server dies after step 1's checkpoint: step 2's rollout stops the run within the
    retrieval deadline, with an error naming the server and a hint naming the checkpoint;
    nothing of step 2 is written; with the server back, resume finishes the run. The run
    drops over-long prompts (data.truncation=drop) and counts them."""
    _agent_like_student(world["dir"] / "tok", tmp_path / "student")
    server = ServerProcess(world["dir"] / "idx", tmp_path / "server.log").wait_ready()
    cfg = tiny_config(world, tmp_path / "run", preset="grpo", steps=2)
    cfg.model.student = str(tmp_path / "student")
    cfg.data.batch_size = cfg.train.mini_batch_size = 8  # one update per step, 16 rollouts
    s = cfg.sampler
    s.max_turns, s.max_new_tokens_per_turn, s.max_new_tokens, s.cache_len = 2, 96, 160, 256
    r = cfg.retrieval
    r.kind, r.urls, r.timeout_s, r.max_retries, r.deadline_s = "http", server.url, 2.0, 1, 4.0
    # A data seed and a limit that drop step 1's longest prompts and keep most of each step's.
    for cfg.seed in range(20):
        lengths = _prompt_lengths(cfg, 2)
        limit = max(lengths[0]) - 1
        if all(sum(x <= limit for x in b) >= len(b) // 2 for b in lengths):
            break
    s.max_prompt_length, cfg.data.truncation = limit, "drop"
    n = cfg.data.rollouts_per_prompt
    expected_dropped = [sum(x > limit for x in b) * n for b in lengths]
    assert expected_dropped[0] > 0, lengths

    killed = {}
    save = Checkpointer.save

    def save_then_kill(self, step, *args, **kw):
        out = save(self, step, *args, **kw)
        if step == 1 and "at" not in killed:
            server.process.send_signal(signal.SIGKILL)
            server.process.wait()
            killed["at"] = time.monotonic()
        return out

    monkeypatch.setattr(Checkpointer, "save", save_then_kill)
    try:
        with pytest.raises(RetrievalError) as info:
            run_train(cfg)
        waited = time.monotonic() - killed["at"]
        # 2 wave attempts, each at most deadline_s (+ the step's host work)
        assert waited < 2 * r.deadline_s + 20, waited
        assert server.url in str(info.value)
        assert isinstance(info.value, UserError)
        assert "the last checkpoint is step 1" in info.value.hint
        assert "--config.resume=True" in info.value.hint
        ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
        assert ckpt.all_steps() == [1]
        ckpt.restore(1)
        records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
        assert [m["step"] for m in records] == [1]
        assert records[0]["searches"] > 0  # the student did search while the server was up
        assert records[0]["dropped_prompts"] == expected_dropped[0]

        server = ServerProcess(
            world["dir"] / "idx", tmp_path / "server2.log", port=server.port
        ).wait_ready()
        cfg.resume = True
        run_train(cfg)
        assert Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == [1, 2]
        records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
        assert [m["step"] for m in records] == [1, 2]
        assert [m["dropped_prompts"] for m in records] == expected_dropped
    finally:
        server.stop()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert all(json.loads(line) for line in f)
