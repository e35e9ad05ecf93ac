"""Configs and the launcher reject bad input before anything heavy starts."""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from dgpo_jax.config import ConfigError, base_config, nq_config, parse_rules, validate
from dgpo_jax.data.synthetic import build_word_tokenizer, generate_world
from dgpo_jax.launch import cli
from dgpo_jax.launch.context import RunContext, batch_shards
from dgpo_jax.parallel.sharding import plan_from_config
from dgpo_jax.sampler.host import RolloutRetrievalError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize(
    "name",
    sorted(
        f
        for f in os.listdir(os.path.join(ROOT, "configs"))
        if f.endswith(".py") and not f.startswith("_")
    ),
)
def test_every_config_loads(name):
    cfg = _load(name)
    assert cfg.mode in ("train", "coldstart", "eval", "quickstart", "compare")


def test_dgpo_nq_has_reference_hyperparameters(monkeypatch):
    cfg = _load("dgpo_nq.py")
    assert (cfg.optim.actor_lr, cfg.optim.critic_lr) == (1e-6, 1e-5)
    assert (cfg.optim.actor_warmup_ratio, cfg.optim.critic_warmup_ratio) == (0.285, 0.015)
    # The cold start (docs/algorithms.md): AdamW lr 1e-4, cosine, no warmup, 5 epochs.
    assert (cfg.coldstart.lr, cfg.coldstart.warmup_ratio, cfg.coldstart.epochs) == (1e-4, 0.0, 5)
    assert (cfg.data.batch_size, cfg.train.mini_batch_size, cfg.train.ppo_epochs) == (512, 256, 1)
    assert (cfg.sampler.max_turns, cfg.retrieval.topk, cfg.sampler.temperature) == (4, 3, 1.0)
    assert cfg.sampler.max_new_tokens_per_turn == cfg.sampler.max_obs_length == 500
    monkeypatch.setenv("DGPO_STUDENT", "/models/s")
    assert nq_config("x", "dgpo").model.student == "/models/s"


def _valid(tmp_path):
    cfg = base_config()
    (tmp_path / "student").mkdir()
    (tmp_path / "index").mkdir()
    (tmp_path / "train.parquet").write_bytes(b"")
    cfg.model.student = str(tmp_path / "student")
    cfg.data.train_files = str(tmp_path / "train.parquet")
    cfg.retrieval.kind = "in_process"
    cfg.retrieval.index_dir = str(tmp_path / "index")
    return cfg


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mode", "fly", "config.mode: 'fly' is not one of"),
        ("model.student", "", "config.model.student: is empty"),
        (
            "model.student",
            "/nonexistent/student",
            "config.model.student: '/nonexistent/student' does not exist",
        ),
        ("model.dtype", "int8", "config.model.dtype: 'int8'"),
        ("data.train_files", "", "config.data.train_files: is empty"),
        ("data.train_files", "a.parquet,/none/b.parquet", "config.data.train_files: 'a.parquet'"),
        ("retrieval.index_dir", "/none", "config.retrieval.index_dir"),
        ("train.steps", 0, "config.train.steps: must be an int >= 1"),
        ("eval.sampled_repeats", 0, "config.eval.sampled_repeats: must be an int >= 1, got 0"),
        ("train.mini_batch_size", 100, "config.train.mini_batch_size: 100 must divide"),
        ("optim.schedule", "linear", "config.optim.schedule"),
        ("coldstart.warmup_ratio", 1.0, "config.coldstart.warmup_ratio: must be in"),
        ("mesh.rules", "embed", "mesh.rules: 'embed' is not"),
        ("model.param_dtype", "float16", "config.model.param_dtype: 'float16': expected float32"),
        ("model.attention", "flash", "config.model.attention: 'flash' is not one of"),
        (
            "model.attention",
            "cudnn",
            "config.model.attention: attention='cudnn' needs a GPU backend; this process runs "
            "on cpu",
        ),
        ("model.attention", "splash", "attention='splash' needs a TPU backend; this process"),
        ("train.score_micro_batch_size", -1, "config.train.score_micro_batch_size: must be an int"),
        ("train.pack_width", 8, "config.train.pack_width: 8 is shorter than sampler.cache_len"),
        ("train.width_buckets", -1, "config.train.width_buckets: must be an int >= 0, got -1"),
        ("train.length_groups", 0, "config.train.length_groups: must be an int >= 1, got 0"),
        ("train.length_groups", 2, "config.train.length_groups: 2 groups need train.pack=False"),
        ("model.attention_block", 0, "config.model.attention_block: must be an int >= 1, got 0"),
    ],
)
def test_validate_names_the_field(tmp_path, field, value, message):
    cfg = _valid(tmp_path)
    validate(cfg)
    section, _, key = field.rpartition(".")
    (cfg[section] if section else cfg)[key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)


def test_mixed_precision_and_attention_defaults(tmp_path, caplog):
    cfg = _valid(tmp_path)
    assert (cfg.model.param_dtype, cfg.model.dtype, cfg.model.attention) == (
        "float32",
        "bfloat16",
        "auto",
    )
    assert (cfg.train.pack, cfg.train.pack_width, cfg.train.score_micro_batch_size) == (True, 0, 0)
    with caplog.at_level("WARNING"):
        validate(cfg)
    assert "param_dtype" not in caplog.text
    # bfloat16 masters are allowed, with a warning saying why they are a bad idea
    cfg.model.param_dtype = "bfloat16"
    with caplog.at_level("WARNING"):
        validate(cfg)
    assert "model.param_dtype='bfloat16'" in caplog.text and "rounds away" in caplog.text


def test_plan_target_is_the_backend_an_attention_kernel_needs(tmp_path):
    cfg = _valid(tmp_path)
    cfg.mode = "plan"
    cfg.model.attention = "splash"
    with pytest.raises(ConfigError, match="needs a TPU backend; this process runs on cpu"):
        validate(cfg)
    cfg.plan.target = "tpu:v5e-16"  # compiled for a TPU slice on this CPU host
    validate(cfg)
    cfg.model.attention = "cudnn"
    with pytest.raises(ConfigError, match="needs a GPU backend; plan.target compiles for tpu"):
        validate(cfg)


def test_run_context_keeps_masters_in_param_dtype_and_computes_in_dtype(tmp_path):
    """The student a mode trains is loaded in model.param_dtype, the teacher (never trained)
    and an evaluated student in model.dtype; both models get model.attention (and its block)."""
    build_word_tokenizer(generate_world(seed=0, num_entities=20), tmp_path / "tok")
    cfg = _valid(tmp_path)
    cfg.workdir = str(tmp_path / "run")
    cfg.model.student, cfg.model.teacher = "preset:tiny", "preset:tiny-teacher"
    cfg.model.tokenizer = str(tmp_path / "tok")
    cfg.model.attention, cfg.model.attention_block = "chunked", 64
    cfg.mesh.num_devices = 1
    cfg.retrieval.kind = "http"  # a client only; nothing is retrieved here
    run = RunContext(cfg, need_teacher=True)
    dtypes = lambda p: {x.dtype.name for x in jax.tree.leaves(p)}
    assert dtypes(run.student_params) == {"float32"}
    assert dtypes(run.teacher_params) == {"bfloat16"}
    assert dtypes(run.compute(run.student_params)) == {"bfloat16"}
    assert run.student_config.attention == run.teacher_config.attention == "chunked"
    assert run.student_config.attention_block == run.teacher_config.attention_block == 64
    assert run.batch_shards == 1
    # rows of a batch split over the data and fsdp axes (packed rows are a multiple of this)
    assert batch_shards(plan_from_config({"data": 2, "fsdp": 2, "tensor": 2})) == 4
    run = RunContext(cfg, need_teacher=False, train_student=False)
    assert dtypes(run.student_params) == {"bfloat16"}


def test_parse_rules():
    assert parse_rules("embed=fsdp, mlp=tensor+fsdp,vocab=") == [
        ("embed", ("fsdp",)),
        ("mlp", ("tensor", "fsdp")),
        ("vocab", ()),
    ]


def _launch(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dgpo_jax.launch", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
    )


def test_launcher_rejects_unknown_key_wrong_type_and_missing_paths():
    out = _launch("--config=configs/dgpo_nq.py", "--config.train.stepz=3")
    assert out.returncode == 2 and "did you mean --config.train.steps?" in out.stderr
    out = _launch("--config=configs/dgpo_nq.py", "--config.train.steps=many")
    assert out.returncode == 2 and "many" in out.stderr
    out = _launch("--config=configs/dgpo_nq.py", env={"DGPO_STUDENT": ""})
    assert out.returncode == 2 and "config.model.student: is empty" in out.stderr
    for o in (out,):
        assert "Traceback" not in o.stderr and o.stderr.startswith("error: ")


def test_a_failing_retriever_mid_run_is_one_line_and_exit_2(monkeypatch, capsys):
    message = (
        "retrieval failed after 2 attempt(s) at http://10.0.0.7:8000/retrieve for 2 waiting "
        "row(s) [0, 3]: RetrievalUnavailableError: no server answered"
    )

    def failing_run(argv):
        raise RolloutRetrievalError(message)

    monkeypatch.setattr(cli, "main", failing_run)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(["dgpo_jax.launch", "--config=configs/dgpo_nq.py"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"error: {message}"
    assert "Traceback" not in err
