"""The scale-out shell scripts in launch/: syntax, DRY_RUN command lines, missing-variable errors,
and real runs against fake gcloud / srun / python that record what they were asked to do.

Printed commands are parsed back with shlex (POSIX shell quoting), so the assertions also check
that what the scripts print is valid, correctly quoted shell.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "gpu_node.sh", "slurm_multinode.sbatch", "serve_retrieval.sh"]
CONFIG = "configs/dgpo_nq.py"
GS = "gs://my-bucket/runs/dgpo 1"  # a space too, to exercise the quoting
TRICKY = "--config.data.train_files=/data/it's here/train.parquet"
OVERRIDES = ["--config.train.steps=7", "--config.mesh.shape.data=4", TRICKY]


def bash(script: str, *args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    """Run launch/SCRIPT with a minimal environment plus ``env`` (nothing inherited from the
    test process, so stray DGPO_* or SLURM_* variables cannot leak in)."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C"}
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


words = shlex.split  # expected command lines are written as shell text
OFFLINE = ["env", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"]


def commands(proc: subprocess.CompletedProcess) -> list[list[str]]:
    """The '+ ' lines of a dry run, each split back into its words."""
    assert proc.returncode == 0, proc.stderr
    lines = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert lines and len(lines) == len(proc.stdout.splitlines()), proc.stdout
    return [shlex.split(line) for line in lines]


def remote(cmd: list[str]) -> str:
    """The --command of a `gcloud compute tpus tpu-vm ssh ... --worker=all` line."""
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], cmd
    assert "--worker=all" in cmd
    return cmd[cmd.index("--command") + 1]


def launcher(workdir: str, urls: str | None, python: str = ".venv/bin/python") -> list[str]:
    line = [python, "-m", "dgpo_jax.launch", f"--config={CONFIG}", f"--config.workdir={workdir}"]
    if urls:
        line += ["--config.retrieval.kind=http", f"--config.retrieval.urls={urls}"]
    return line + OVERRIDES


@pytest.mark.parametrize("script", SCRIPTS + ["common.sh"])
def test_syntax(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS[:3])
def test_header_documents_every_variable_read(script):
    """Every upper-case variable the code reads ($NAME or ${NAME...}) is named in the header
    comment, and the header shows a usage example."""
    text = (LAUNCH / script).read_text().splitlines()
    header = "\n".join(line for line in text if line.startswith("#"))
    if any("launch/common.sh" in line for line in text):  # what it sources reads for it too
        text += (LAUNCH / "common.sh").read_text().splitlines()
    code = "\n".join(line for line in text if not line.lstrip().startswith("#"))
    read = set(re.findall(r"\$\{!?([A-Z][A-Z0-9_]*)", code))
    read |= set(re.findall(r"\$([A-Z][A-Z0-9_]*)", code))
    read -= {"PWD", "PATH", "BASH_SOURCE"}  # bash's own
    assert {"WORKDIR", "RETRIEVAL", "DRY_RUN"} <= read
    missing = sorted(name for name in read if not re.search(rf"\b{name}\b", header))
    assert not missing, f"{script}: reads {missing} without documenting them in its header"
    assert re.search(r"^#\s+.*(bash|sbatch) launch/" + re.escape(script), header, re.M)


# ----------------------------------------------------------------------------------- gpu_node ---
def test_gpu_node_per_host_dry_run():
    proc = bash(
        "gpu_node.sh",
        CONFIG,
        *OVERRIDES,
        DRY_RUN="1",
        WORKDIR=GS,
        INDEX_DIR="/data/wiki index",
        RETRIEVAL_PORT="8123",
    )
    server, health, launch, stop = commands(proc)
    assert server == words(
        "env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m retrieval_service.serve"
        " --index '/data/wiki index' --host 127.0.0.1 --port 8123"
        " > /tmp/dgpo_retrieval_8123.log 2>&1 &"
    )
    assert health == words(
        "until curl -sf -o /dev/null --max-time 5 http://127.0.0.1:8123/health; do sleep 0.5; done"
    )
    assert launch == OFFLINE + launcher(GS, "http://127.0.0.1:8123")
    assert stop == ["kill", "$server_pid"]


@pytest.mark.parametrize("placement", ["shared", "none"])
def test_gpu_node_shared_and_none_dry_run(placement):
    urls = "http://a:8000,http://b:8000"
    proc = bash(
        "gpu_node.sh",
        CONFIG,
        *OVERRIDES,
        DRY_RUN="1",
        WORKDIR=GS,
        RETRIEVAL=placement,
        RETRIEVAL_URLS=urls,
        PYTHON="/opt/py/bin/python",
    )
    (launch,) = commands(proc)
    expected = launcher(GS, urls if placement == "shared" else None, "/opt/py/bin/python")
    assert launch == OFFLINE + expected


@pytest.mark.parametrize(
    "env, named",
    [
        ({}, "WORKDIR"),
        ({"WORKDIR": "w"}, "INDEX_DIR"),
        ({"WORKDIR": "w", "RETRIEVAL": "shared"}, "RETRIEVAL_URLS"),
        ({"WORKDIR": "w", "RETRIEVAL": "elsewhere"}, "RETRIEVAL=elsewhere"),
    ],
)
def test_gpu_node_missing_variable(env, named):
    proc = bash("gpu_node.sh", CONFIG, DRY_RUN="1", **env)
    assert proc.returncode != 0 and named in proc.stderr and not proc.stdout


def test_gpu_node_missing_or_absent_config():
    proc = bash("gpu_node.sh", DRY_RUN="1", WORKDIR="w", RETRIEVAL="none")
    assert proc.returncode != 0 and "CONFIG" in proc.stderr
    proc = bash("gpu_node.sh", "configs/no_such.py", DRY_RUN="1", WORKDIR="w", RETRIEVAL="none")
    assert proc.returncode != 0 and "configs/no_such.py" in proc.stderr


# ------------------------------------------------------------------------------------ tpu_pod ---
TPU = {"TPU_NAME": "pod-1", "ZONE": "us-central2-b", "WORKDIR": GS}


def test_tpu_pod_per_host_with_setup_dry_run():
    proc = bash(
        "tpu_pod.sh",
        CONFIG,
        *OVERRIDES,
        DRY_RUN="1",
        SETUP="1",
        PROJECT="proj",
        INDEX_DIR="/mnt/data/wiki index",
        NUM_WORKERS="4",
        DGPO_STUDENT="/m/student",
        DGPO_RETRIEVAL_TOKEN="s3cret",
        DGPO_PROCESS_ID="3",
        PASS_ENV="XLA_FLAGS",
        XLA_FLAGS="--xla_a=1 --xla_b=2",
        TMPDIR="/tmp",
        **TPU,
    )
    assert "s3cret" not in proc.stdout
    archive, scp, setup, start, health, launch, stop = commands(proc)
    assert archive == ["git", "-C", str(REPO)] + words(
        "archive --format=tar.gz -o /tmp/dgpo_jax_src.tar.gz HEAD"
    )
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == ["/tmp/dgpo_jax_src.tar.gz", "pod-1:dgpo_jax_src.tar.gz"]
    for cmd in (scp, setup, launch):
        assert cmd[cmd.index("--zone") + 1] == "us-central2-b"
        assert cmd[cmd.index("--project") + 1] == "proj" and "--worker=all" in cmd
    assert remote(setup).endswith("cd dgpo_jax && EXTRAS=tpu,retrieval bash launch/setup_env.sh")
    start_words = shlex.split(remote(start))
    assert start_words[:6] == ["cd", "dgpo_jax", "&&", "{", "nohup", "env"]
    i = start_words.index("retrieval_service.serve")
    assert start_words[i + 1 : i + 7] == words(
        "--index '/mnt/data/wiki index' --host 127.0.0.1 --port 8000"
    )
    assert "http://127.0.0.1:8000/health" in shlex.split(remote(health).split("||")[0])
    launch_words = shlex.split(remote(launch))
    assert launch_words[:4] == ["cd", "dgpo_jax", "&&", "env"]
    env_words = launch_words[4 : launch_words.index(".venv/bin/python")]
    assert env_words == OFFLINE[1:] + words(
        "DGPO_NUM_PROCESSES=4 DGPO_STUDENT=/m/student 'XLA_FLAGS=--xla_a=1 --xla_b=2'"
    )
    assert launch_words[4 + len(env_words) :] == launcher(GS, "http://127.0.0.1:8000")
    assert remote(stop) == "kill $(cat /tmp/dgpo_retrieval_8000.pid) 2>/dev/null || true"


def test_tpu_pod_shared_dry_run():
    urls = "http://10.0.0.5:8000,http://10.0.0.6:8000"
    proc = bash(
        "tpu_pod.sh",
        CONFIG,
        *OVERRIDES,
        DRY_RUN="1",
        RETRIEVAL="shared",
        RETRIEVAL_URLS=urls,
        REPO_DIR="/opt/dgpo jax",
        **TPU,
    )
    (launch,) = commands(proc)
    assert "--project" not in launch and launch[5] == "pod-1"
    remote_words = shlex.split(remote(launch))
    assert remote_words[:3] == ["cd", "/opt/dgpo jax", "&&"]
    assert remote_words[3:] == OFFLINE + launcher(GS, urls)


@pytest.mark.parametrize("drop", ["TPU_NAME", "ZONE", "WORKDIR"])
def test_tpu_pod_missing_variable(drop):
    env = {k: v for k, v in TPU.items() if k != drop}
    proc = bash("tpu_pod.sh", CONFIG, DRY_RUN="1", RETRIEVAL="none", **env)
    assert proc.returncode != 0 and drop in proc.stderr and not proc.stdout


def test_tpu_pod_missing_retrieval_settings():
    proc = bash("tpu_pod.sh", CONFIG, DRY_RUN="1", **TPU)
    assert proc.returncode != 0 and "INDEX_DIR" in proc.stderr
    proc = bash("tpu_pod.sh", CONFIG, DRY_RUN="1", RETRIEVAL="shared", **TPU)
    assert proc.returncode != 0 and "RETRIEVAL_URLS" in proc.stderr
    proc = bash("tpu_pod.sh", CONFIG, DRY_RUN="1", RETRIEVAL="none", PASS_ENV="NOT_SET_X", **TPU)
    assert proc.returncode != 0 and "NOT_SET_X" in proc.stderr


# ---------------------------------------------------------------------------- slurm_multinode ---
def test_slurm_per_host_dry_run_outside_slurm():
    proc = bash(
        "slurm_multinode.sbatch",
        CONFIG,
        *OVERRIDES,
        DRY_RUN="1",
        NODES="4",
        GPUS_PER_NODE="4",
        WORKDIR=GS,
        INDEX_DIR="/shared/wiki index",
    )
    export, server, health, launch, stop = commands(proc)
    assert export == words(
        "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 JAX_LOCAL_DEVICE_IDS=0,1,2,3"
    )
    per_node = ["--ntasks=4", "--ntasks-per-node=1"]
    assert server == ["srun", "--overlap", *per_node] + words(
        "--output=retrieval-%j-%N.log .venv/bin/python -m retrieval_service.serve"
        " --index '/shared/wiki index' --host 127.0.0.1 --port 8000 &"
    )
    assert health[:5] == ["srun", "--overlap", *per_node, "curl"]
    assert health[-1] == "http://127.0.0.1:8000/health"
    assert launch == ["srun", *per_node, "--kill-on-bad-exit=1"] + launcher(
        GS, "http://127.0.0.1:8000"
    )
    assert stop == ["kill", "$server_step"]


def test_slurm_shared_dry_run_reads_the_allocation():
    urls = "http://a:8000,http://b:8000"
    proc = bash(
        "slurm_multinode.sbatch",
        CONFIG,
        *OVERRIDES,
        cwd=Path("/"),
        DRY_RUN="1",
        SLURM_JOB_NUM_NODES="3",
        SLURM_GPUS_ON_NODE="2",
        SLURM_CPUS_PER_TASK="16",
        SLURM_SUBMIT_DIR=str(REPO),
        WORKDIR="/shared/runs/x",
        RETRIEVAL="shared",
        RETRIEVAL_URLS=urls,
    )
    export, launch = commands(proc)
    assert export[-1] == "JAX_LOCAL_DEVICE_IDS=0,1"
    assert launch == [
        "srun",
        "--ntasks=3",
        "--ntasks-per-node=1",
        "--cpus-per-task=16",
        "--kill-on-bad-exit=1",
        *launcher("/shared/runs/x", urls),
    ]


@pytest.mark.parametrize(
    "env, named",
    [
        ({"WORKDIR": "w", "RETRIEVAL": "none"}, "SLURM_JOB_ID"),  # not DRY_RUN, not in SLURM
        ({"DRY_RUN": "1"}, "WORKDIR"),
        ({"DRY_RUN": "1", "WORKDIR": "w"}, "INDEX_DIR"),
        ({"DRY_RUN": "1", "WORKDIR": "w", "RETRIEVAL": "shared"}, "RETRIEVAL_URLS"),
        (
            {"DRY_RUN": "1", "WORKDIR": "w", "RETRIEVAL": "none", "GPUS_PER_NODE": "x"},
            "GPUS_PER_NODE",
        ),
    ],
)
def test_slurm_missing_variable(env, named):
    proc = bash("slurm_multinode.sbatch", CONFIG, **env)
    assert proc.returncode != 0 and named in proc.stderr and not proc.stdout


# ------------------------------------------------ real runs: fake python, gcloud and srun ---
FAKE_PYTHON = f"""#!/usr/bin/env bash
# Stands in for .venv/bin/python: a static HTTP server for retrieval_service.serve, a recorder
# for dgpo_jax.launch (which also checks that the retrieval server answers while it runs).
set -euo pipefail
if [[ $2 == retrieval_service.serve ]]; then
  printf '%s\\n' "${{@:3}}" > "$FAKE_OUT/server_args"
  if [[ -n ${{FAKE_SERVER_FAILS:-}} ]]; then echo "index not found" >&2; exit 1; fi
  echo $$ > "$FAKE_OUT/server_pid"  # exec keeps the pid: the test's teardown kills strays
  while [[ $1 != --port ]]; do shift; done
  exec {sys.executable} -m http.server --bind 127.0.0.1 --directory "$FAKE_OUT/www" "$2"
fi
printf '%s\\n' "${{@:3}}" > "$FAKE_OUT/launch_args"
env | grep -E '^(HF_HUB_OFFLINE|TRANSFORMERS_OFFLINE|JAX_LOCAL_DEVICE_IDS|DGPO_)' | sort \\
  > "$FAKE_OUT/launch_env"
if [[ -n ${{FAKE_HEALTH:-}} ]]; then curl -sf "$FAKE_HEALTH" > "$FAKE_OUT/health_seen"; fi
exit "${{FAKE_RC:-0}}"
"""
FAKE_GCLOUD = """#!/usr/bin/env bash
# Stands in for gcloud: runs the --command of `tpu-vm ssh` with bash in $FAKE_HOME (one worker).
printf '%s\\n' "$*" >> "$FAKE_OUT/gcloud_calls"
while (($#)); do
  if [[ $1 == --command ]]; then cd "$FAKE_HOME" && exec bash -c "$2"; fi
  shift
done
"""
FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for srun on a one-node allocation: drops the options, runs the command.
printf '%s\\n' "$*" >> "$FAKE_OUT/srun_calls"
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_closed(port: int, wait_s: float = 5.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return True
        time.sleep(0.05)
    return False


@pytest.fixture
def fakes(tmp_path):
    out = tmp_path / "out"
    (out / "www").mkdir(parents=True)
    (out / "www" / "health").write_text('{"status": "ok"}')
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "gcloud", FAKE_GCLOUD)
    executable(bin_dir / "srun", FAKE_SRUN)
    port = free_port()
    env = {
        "FAKE_OUT": str(out),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RETRIEVAL_PORT": str(port),
        "RETRIEVAL_WAIT_S": "20",
        "FAKE_HEALTH": f"http://127.0.0.1:{port}/health",
        "INDEX_DIR": "/idx dir",
    }
    yield out, port, env
    if (out / "server_pid").exists():  # a server the script failed to stop must not linger
        try:
            os.kill(int((out / "server_pid").read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    for suffix in ("pid", "log"):
        Path(f"/tmp/dgpo_retrieval_{port}.{suffix}").unlink(missing_ok=True)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.parametrize("launch_rc", [0, 3])
def test_gpu_node_real_run_starts_waits_and_stops_the_server(fakes, tmp_path, launch_rc):
    out, port, env = fakes
    python = executable(tmp_path / "py" / "python", FAKE_PYTHON)
    proc = bash(
        "gpu_node.sh",
        CONFIG,
        TRICKY,
        WORKDIR=GS,
        PYTHON=str(python),
        RETRIEVAL_LOG=str(out / "server.log"),
        FAKE_RC=str(launch_rc),
        **env,
    )
    assert proc.returncode == launch_rc, proc.stderr
    assert lines(out / "server_args") == [
        "--index",
        "/idx dir",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    assert (out / "health_seen").read_text() == '{"status": "ok"}'
    assert lines(out / "launch_args") == [
        f"--config={CONFIG}",
        f"--config.workdir={GS}",
        "--config.retrieval.kind=http",
        f"--config.retrieval.urls=http://127.0.0.1:{port}",
        TRICKY,
    ]
    assert "HF_HUB_OFFLINE=1" in lines(out / "launch_env")
    assert port_closed(port), "the retrieval server outlived the script"


def test_gpu_node_real_run_fails_fast_when_the_server_dies(fakes, tmp_path):
    out, port, env = fakes
    python = executable(tmp_path / "py" / "python", FAKE_PYTHON)
    log = out / "server.log"
    start = time.monotonic()
    proc = bash(
        "gpu_node.sh",
        CONFIG,
        WORKDIR="w",
        PYTHON=str(python),
        RETRIEVAL_LOG=str(log),
        FAKE_SERVER_FAILS="1",
        **{**env, "RETRIEVAL_WAIT_S": "60"},
    )
    assert proc.returncode != 0 and "retrieval server exited" in proc.stderr
    assert str(log) in proc.stderr and "index not found" in log.read_text()
    assert time.monotonic() - start < 30, "waited out RETRIEVAL_WAIT_S instead of failing fast"
    assert not (out / "launch_args").exists()


def test_tpu_pod_real_run_through_fake_gcloud(fakes, tmp_path):
    out, port, env = fakes
    home = tmp_path / "home"
    executable(home / "my repo" / ".venv" / "bin" / "python", FAKE_PYTHON)
    proc = bash(
        "tpu_pod.sh",
        CONFIG,
        TRICKY,
        REPO_DIR="my repo",
        FAKE_HOME=str(home),
        NUM_WORKERS="2",
        DGPO_TEACHER="/m/teacher x",
        **TPU,
        **env,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(lines(out / "gcloud_calls")) == 4  # start, health, launch, stop
    assert lines(out / "server_args")[:2] == ["--index", "/idx dir"]
    assert (out / "health_seen").exists()
    assert lines(out / "launch_args") == [
        f"--config={CONFIG}",
        f"--config.workdir={GS}",
        "--config.retrieval.kind=http",
        f"--config.retrieval.urls=http://127.0.0.1:{port}",
        TRICKY,
    ]
    assert {"DGPO_NUM_PROCESSES=2", "DGPO_TEACHER=/m/teacher x", "HF_HUB_OFFLINE=1"} <= set(
        lines(out / "launch_env")
    )
    assert port_closed(port), "the retrieval server outlived the script"


def test_slurm_real_run_through_fake_srun(fakes, tmp_path):
    out, port, env = fakes
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "configs" / "dgpo_nq.py").write_text("")
    (repo / "launch").mkdir()
    shutil.copy(LAUNCH / "common.sh", repo / "launch" / "common.sh")
    executable(repo / ".venv" / "bin" / "python", FAKE_PYTHON)
    proc = bash(
        "slurm_multinode.sbatch",
        CONFIG,
        TRICKY,
        cwd=tmp_path,
        SLURM_JOB_ID="77",
        SLURM_JOB_NUM_NODES="1",
        SLURM_GPUS_ON_NODE="3",
        SLURM_SUBMIT_DIR=str(repo),
        WORKDIR=GS,
        **env,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(lines(out / "srun_calls")) == 3  # server, health, launch
    assert (out / "health_seen").exists()
    assert lines(out / "launch_args")[-1] == TRICKY
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2" in lines(out / "launch_env")
    assert port_closed(port), "the retrieval server outlived the script"
