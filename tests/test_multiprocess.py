"""A real multi-process run on one machine: 2 JAX processes on loopback (CPU collectives over
gloo) train DGPO for a few steps on a mesh spanning both processes; the result equals the same
run in one process with the same number of devices. Likewise a sampler rollout with one
retrieval server per process (tests/mp_rollout_driver.py)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from dgpo_jax.checkpoint.checkpointer import Checkpointer
from dgpo_jax.data.synthetic import build_word_tokenizer, generate_world, write_world
from dgpo_jax.models import get_preset, init_params
from dgpo_jax.parallel.distributed import initialize_from_env, wants_distributed
from retrieval_service.index import build_index
from tests.test_retrieval_server import ServerProcess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp_world")
    world = generate_world(seed=0, num_entities=60)
    paths = write_world(world, str(root / "world"))
    build_word_tokenizer(world, str(root / "tok"))
    build_index(paths["corpus.jsonl"], str(root / "index"), "bm25")
    return {"root": root, **paths}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(world, workdir) -> list[str]:
    overrides = {
        "mode": "train",
        "model.student": "preset:tiny",
        "model.teacher": "preset:tiny-teacher",
        "model.tokenizer": world["root"] / "tok",
        "model.dtype": "float32",
        "data.train_files": world["train.parquet"],
        "data.test_files": world["test.parquet"],
        "data.use_chat_template": False,
        "data.batch_size": 4,
        "retrieval.kind": "in_process",
        "retrieval.index_dir": world["root"] / "index",
        "retrieval.topk": 1,
        "sampler.max_turns": 2,
        "sampler.max_new_tokens_per_turn": 12,
        "sampler.max_new_tokens": 32,
        "sampler.max_obs_length": 32,
        "sampler.max_prompt_length": 160,
        "sampler.cache_len": 256,
        "sampler.ingest_chunk": 16,
        # The scanned decode path compiles ~3x faster than "auto"'s CPU path, which is not
        # this test's subject (test_sampler_waves / test_sampler cover it).
        "sampler.decode_path": "accelerator",
        "train.mini_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.steps": STEPS,
        "train.save_every": STEPS,
        "eval.at_end": False,
        "logging.progress": False,
        "logging.tensorboard": False,
        "optim.actor_lr": 1e-3,
        "optim.critic_lr": 1e-3,
        "optim.actor_warmup_ratio": 0.0,
        "optim.critic_warmup_ratio": 0.0,
        "mesh.shape.data": 2,
        "mesh.shape.fsdp": 2,
        "workdir": workdir,
    }
    return [sys.executable, "-m", "dgpo_jax.launch", "--config=configs/dgpo_nq.py"] + [
        f"--config.{k}={v}" for k, v in overrides.items()
    ]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", DGPO_JAX_COMPILATION_CACHE="", **extra)
    # Cheaper CPU compiles (the same flags on both sides, so the programs stay comparable).
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    return env


def _final_params(workdir) -> dict:
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        assert ckpt.latest_step() == STEPS
        state, meta = ckpt.restore(STEPS)
    params = state["train"]["params"] if isinstance(state, dict) else state.train.params
    return jax.tree.map(np.asarray, params), meta


def test_two_processes_equal_one(world, tmp_path):
    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    port = _free_port()
    procs = [
        subprocess.Popen(
            _command(world, single_dir),
            cwd=REPO,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    ]
    for pid in range(2):
        env = _env(
            2,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            DGPO_NUM_PROCESSES="2",
            DGPO_PROCESS_ID=str(pid),
        )
        procs.append(
            subprocess.Popen(
                _command(world, multi_dir),
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=900)
            logs.append(out)
    finally:
        for p in procs:
            p.kill()
    for name, p, out in zip(("single", "process 0", "process 1"), procs, logs):
        assert p.returncode == 0, f"{name} failed:\n{out[-4000:]}"
    assert "process 1 of 2: 2 local / 4 global devices" in logs[2]

    single, single_meta = _final_params(single_dir)
    multi, multi_meta = _final_params(multi_dir)
    assert single_meta["data_state"] == multi_meta["data_state"]
    flat_s, flat_m = jax.tree.leaves(single), jax.tree.leaves(multi)
    assert jax.tree.structure(single) == jax.tree.structure(multi)
    assert len(flat_s) > 10
    for a, b in zip(flat_s, flat_m):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    # The run did train: the policy moved away from its (seeded, identical) initialisation.

    config = get_preset("tiny", vocab_size=single["policy"]["embed_tokens"].shape[0])
    init = init_params(config, jax.random.key(0))
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(single["policy"]))
    )
    assert moved > 1e-4

    # Only process 0 wrote the metrics, one record per step, equal to the single run's.
    rows_s = [json.loads(x) for x in open(os.path.join(single_dir, "metrics.jsonl"))]
    rows_m = [json.loads(x) for x in open(os.path.join(multi_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows_m] == list(range(1, STEPS + 1))
    for rs, rm in zip(rows_s, rows_m):
        for key in ("reward", "response_tokens", "loss", "entropy", "kl_k3"):
            assert rm[key] == pytest.approx(rs[key], rel=1e-4, abs=1e-6), key


def test_distributed_environment_detection_and_errors(monkeypatch):
    assert not wants_distributed({})
    assert not wants_distributed({"SLURM_NTASKS": "1", "DGPO_NUM_PROCESSES": "1"})
    assert wants_distributed({"SLURM_NTASKS": "4"})
    assert wants_distributed({"DGPO_NUM_PROCESSES": "8"})  # plain Cloud TPU VMs
    assert wants_distributed({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert wants_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "DGPO_NUM_PROCESSES",
        "DGPO_PROCESS_ID",
        "SLURM_NTASKS",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(name, raising=False)
    assert initialize_from_env() is False  # a single process: nothing to start
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("DGPO_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"\['DGPO_PROCESS_ID'\]"):
        initialize_from_env()


def test_rollout_two_processes_one_server_each(world, tmp_path):
    """2 processes with one retrieval server each: both servers receive queries (each process's
    batch shards search through its own server), every process's `Rollout` holds all rows'
    queries, and the rollout equals the 1-process one (same 4 devices, one server)."""
    questions = pq.read_table(world["test.parquet"]).column("question").to_pylist()[:8]
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "tokenizer": str(world["root"] / "tok"),
                "prompts": questions,
                # Every row's first turn starts with a search (the untrained model then samples).
                "prefixes": [f"<search> {q} </search>" for q in questions],
            }
        )
    )
    servers = [
        ServerProcess(
            world["root"] / "index",
            tmp_path / f"server{i}.log",
            ["--access-log", "--log-level", "info"],  # one log line per request
        )
        for i in range(3)  # the single run's, then one per process
    ]
    procs = []
    try:
        for server in servers:
            server.wait_ready(timeout_s=60)
        port = _free_port()
        runs = [("single", 4, {})] + [
            (
                f"process {pid}",
                2,
                dict(
                    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    DGPO_NUM_PROCESSES="2",
                    DGPO_PROCESS_ID=str(pid),
                ),
            )
            for pid in range(2)
        ]
        for server, (name, devices, extra) in zip(servers, runs):
            out_dir = tmp_path / ("single" if name == "single" else "multi")
            out_dir.mkdir(exist_ok=True)
            command = ["-m", "tests.mp_rollout_driver", str(job), server.url, str(out_dir)]
            process = subprocess.Popen(
                [sys.executable, *command],
                cwd=REPO,
                env=_env(devices, **extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            procs.append((name, process))
        logs = [p.communicate(timeout=240)[0] for _, p in procs]
        for (name, p), out in zip(procs, logs):
            assert p.returncode == 0, f"{name} failed:\n{out[-4000:]}"
    finally:
        for _, p in procs:
            p.kill()
        for server in servers:
            server.stop()
    requests = [
        server.log_path.read_text().count('"POST /retrieve HTTP/1.1" 200') for server in servers
    ]

    def load(path):
        with open(path) as handle:
            return json.load(handle)

    single = load(tmp_path / "single" / "process_0.json")
    multi = [load(tmp_path / "multi" / f"process_{i}.json") for i in range(2)]
    assert single["processes"] == 1 and [m["processes"] for m in multi] == [2, 2]
    assert all(requests), f"retrieval requests per server (single, process 0, 1): {requests}"
    assert all(len(q) >= 1 for q in single["queries"])  # every row searched
    for m in multi:
        np.testing.assert_array_equal(np.array(m["tokens"]), np.array(single["tokens"]))
        np.testing.assert_allclose(np.array(m["logprobs"]), np.array(single["logprobs"]), atol=1e-6)
        assert m["finish_reasons"] == single["finish_reasons"]
        assert m["queries"] == single["queries"]  # all rows, on both processes
        assert m["turn_texts"] == single["turn_texts"]
        # Host calls per batch shard: both processes made them; the counts are merged.
        calls = m["stats"]["host_calls_per_process"]
        assert len(calls) == 2 and min(calls) > 0 and m["stats"]["host_calls"] == sum(calls)
    assert multi[0]["stats"] == {**multi[1]["stats"], "seconds": multi[0]["stats"]["seconds"]}
