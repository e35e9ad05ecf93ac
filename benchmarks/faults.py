"""Faults during training: kill -9 at random points and resume; the checkpoint disk fills up.

    python benchmarks/faults.py --quick     # 1 kill (during a checkpoint save) + disk-full checks
    python benchmarks/faults.py             # 10 kills + disk-full checks + a run on a full disk

Times on 2 CPU cores (Intel Xeon, warm compilation cache): --quick about 1.5 minutes, the
default about 10 (15 on a busy machine); the disk-full checks take about 10 s of that, the run
on a full disk 75 s. Most of it is the training processes' start-up: importing JAX and
compiling. The persistent compilation cache (``DGPO_JAX_COMPILATION_CACHE``, here
``--cache-dir``) keeps most programs across processes, but not the sampler's rollout program:
it calls the retriever on the host, and JAX does not persist programs with host callbacks, so
every process compiles it again (15-20 s here, at step 1 and again at step 2).

Kills. The tiny synthetic world and config of tests/test_pipeline.py (``tiny_config``, dgpo,
one CPU device), ``--steps`` steps with a checkpoint after every step and ``max_to_keep=2``
(so saves also prune). One uninterrupted run is the reference. Then, ``--kills`` times, the
same run starts from scratch as a subprocess of the launcher (``dgpo_jax.launch.cli``) and is
killed with SIGKILL at a seeded random point of a random step. The targets cycle through: a
save while orbax writes the step (within 0.1 s of its ``<step>.orbax-checkpoint-tmp``
directory appearing), the rollout, a save after the step is committed (finalizing, pruning the
oldest step), the update; a rollout or update is hit at a random fraction of the shortest time
it took so far, and when the phase ends first, the same phase of the next step is the target.
The child reports the phases it enters and leaves on stdout, so the phase it died in is known
exactly (for a save also how far it got, from the directory). After each kill: every
listed step (``Checkpointer.all_steps``) must restore and no step directory without its commit
marker may exist; the run is then resumed (``--config.resume=True``) to the end in a new
process, the listing is checked again (no temporary or trash directories left), and the final
parameters must equal the reference run's within rtol=1e-4, atol=5e-5 (tests/test_pipeline.py's
tolerance: one optimizer step moves them by ~1e-3; the reported step change shows it). Lost
work: the steps redone after the resume and the bytes of the temporary directories the
resume's first save discarded.

Disk full. In a private mount namespace (``unshare -m``; skipped where that or ``mount`` is not
allowed) small tmpfs file systems fill up during a save: by bytes (sync and ``async_save``) and
by inodes, saving the reference run's real train state until a save fails. Each failure must
be a one-line ``CheckpointSaveError`` (errno ENOSPC) naming the directory and the step, leave
the committed steps listed and restorable, list no half-written step, give the failed save's
space back, and a save after the file system is enlarged (``mount -o remount``) must work. The
default mode also runs the training launcher with its workdir on a tmpfs with room for one and
a half checkpoints: the save of step 2 must stop it with status 2 and one ``error:`` line, and a
resume after the tmpfs is enlarged must finish with the reference run's parameters.

The last stdout line is one JSON object naming the machine.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device and the test suite's cheap compiles (tests/conftest.py), for every process.
CHILD_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)
os.environ.setdefault("XLA_FLAGS", CHILD_XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import errno  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import machine  # noqa: E402 (benchmarks/attention.py, beside this file)

import dgpo_jax.launch.train as train_module  # noqa: E402
from dgpo_jax.checkpoint.checkpointer import Checkpointer, CheckpointSaveError  # noqa: E402
from dgpo_jax.data.synthetic import build_word_tokenizer, generate_world, write_world  # noqa: E402
from dgpo_jax.launch import cli  # noqa: E402
from dgpo_jax.sampler.rollout import Sampler  # noqa: E402
from retrieval_service.index import build_index  # noqa: E402
from tests.test_pipeline import TEMPLATE  # noqa: E402

RTOL, ATOL = 1e-4, 5e-5  # tests/test_pipeline.py::test_kill9_and_resume_matches_uninterrupted
TMP_MARKER = ".orbax-checkpoint-tmp"
TRASH = ".deleted"
COMMIT_FILE = "commit_success.txt"
# the kill targets, in turn: in a save while orbax writes the step, in a rollout, in a save after
# the commit (finalizing, pruning the oldest step), in an update
KILL_PHASES = ("save-write", "rollout", "save-commit", "update")
CHILD_TIMEOUT_S = 900


# ----- the synthetic world and its config (tests/test_pipeline.py) -----


def build_world(directory: Path) -> dict:
    """The `world` fixture of tests/test_pipeline.py: questions, corpus, tokenizer, BM25 index."""
    w = generate_world(seed=0, num_entities=40, prompt_template=TEMPLATE)
    paths = write_world(w, directory / "world")
    build_word_tokenizer(w, directory / "tok")
    build_index(paths["corpus.jsonl"], directory / "idx", "bm25")
    return {"dir": str(directory), **{k: str(v) for k, v in paths.items()}}


CONFIG_FILE = '''"""tests/test_pipeline.py's tiny_config on the world in {world_dir} (benchmarks/faults.py)."""

import sys
from pathlib import Path

sys.path.insert(0, {repo!r})

from tests.test_pipeline import tiny_config  # noqa: E402


def get_config():
    world = dict({world!r})
    world["dir"] = Path(world["dir"])
    return tiny_config(world, "unset", steps={steps})
'''


def config_args(config_file: Path, workdir: Path, steps: int, max_to_keep: int, resume: bool):
    return [
        f"--config={config_file}",
        f"--config.workdir={workdir}",
        f"--config.train.steps={steps}",
        f"--config.train.max_to_keep={max_to_keep}",
        f"--config.resume={resume}",
    ]


# ----- the child: the launcher, reporting the phases it enters and leaves -----


def child_main(ckdir: str, launcher_args: list[str]) -> None:
    """Runs `python -m dgpo_jax.launch LAUNCHER_ARGS`, printing ``PHASE begin|end NAME STEP``
    lines on stdout around the rollouts, the updates and the checkpoint saves."""

    def mark(kind: str, phase: str, step: int) -> None:
        print(f"PHASE {kind} {phase} {step}", flush=True)

    mark("begin", "startup", 0)
    done = {"step": Checkpointer(ckdir).latest_step() or 0}  # the last saved step

    def wrap(owner, name, phase, step_of):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            step = step_of(args)
            mark("begin", phase, step)
            result = original(*args, **kwargs)
            mark("end", phase, step)
            if phase == "save":
                done["step"] = step
            return result

        setattr(owner, name, wrapper)

    next_step = lambda args: done["step"] + 1  # noqa: E731
    wrap(Sampler, "generate", "rollout", next_step)
    wrap(train_module, "_packed_updates", "update", next_step)
    wrap(train_module, "_padded_updates", "update", next_step)
    wrap(Checkpointer, "save", "save", lambda args: int(args[1]))

    enable = cli.enable_compilation_cache

    def enable_all():  # cache the many small programs too (the launcher keeps >= 2 s ones)
        enable()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    cli.enable_compilation_cache = enable_all
    try:
        cli.run_main(["dgpo_jax.launch", *launcher_args])
    except SystemExit as e:
        mark("end", "run", done["step"])
        raise SystemExit(e.code) from None


class Child:
    """A child process and the phase events it reported, timestamped on arrival."""

    def __init__(self, name: str, ckdir: Path, launcher_args: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        self.events: list[tuple[float, str, str, int]] = []
        self.cond = threading.Condition()
        self.eof = False
        self.t0 = time.monotonic()
        with open(log, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--child", str(ckdir), *launcher_args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=REPO,
                env=env,
            )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 4 and parts[0] == "PHASE":
                with self.cond:
                    now = time.monotonic() - self.t0
                    self.events.append((now, parts[1], parts[2], int(parts[3])))
                    self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def has(self, kind: str, phase: str, step: int) -> bool:
        with self.cond:
            return any(e[1:] == (kind, phase, step) for e in self.events)

    def wait_for(self, kind: str, phase: str, step: int, timeout_s: float) -> bool:
        """Waits until the child reports (kind, phase, step); False if it ends first."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                if any(e[1:] == (kind, phase, step) for e in self.events):
                    return True
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    return False
                self.cond.wait(left)

    def finish(self, timeout_s: float = CHILD_TIMEOUT_S) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.reader.join()
        return rc

    def kill(self) -> tuple[int, float]:
        """SIGKILL; returns (exit status, seconds since start at the kill)."""
        at = time.monotonic() - self.t0
        self.proc.send_signal(signal.SIGKILL)
        return self.finish(60), at

    def phase_at(self, t: float | None = None) -> str:
        """What the child was doing at time t (default: when it died), from its reports."""
        events = [e for e in self.events if t is None or e[0] <= t]
        if not events:
            return "startup"
        _, kind, phase, step = events[-1]
        if kind == "begin":
            return f"{phase} {step}" if phase != "startup" else "startup"
        return f"between ({phase} {step} done)"

    def durations(self) -> dict[tuple[str, int], float]:
        begins, out = {}, {}
        for t, kind, phase, step in self.events:
            if kind == "begin":
                begins[(phase, step)] = t
            elif (phase, step) in begins:
                out[(phase, step)] = t - begins[(phase, step)]
        return out

    def startup_seconds(self) -> float:
        """From the start to the first rollout (imports, model set-up, compiles before it)."""
        return next((e[0] for e in self.events if e[2] != "startup"), float("nan"))

    def stderr_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


# ----- what is on disk -----


def tree_bytes(path: Path) -> int:
    """Bytes a directory tree takes on disk (allocated blocks)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def inspect(ckdir: Path) -> dict:
    """Committed steps (as `all_steps` lists them), step directories without a commit marker,
    and the temporary / trash directories with their sizes."""

    names = sorted(os.listdir(ckdir)) if ckdir.is_dir() else []
    tmp = [n for n in names if TMP_MARKER in n]
    return {
        "steps": Checkpointer(str(ckdir)).all_steps(),
        "half_written": [
            n for n in names if n.isdigit() and not (ckdir / n / COMMIT_FILE).exists()
        ],
        "tmp_dirs": tmp,
        "tmp_bytes": sum(tree_bytes(ckdir / n) for n in tmp),
        "trash": TRASH in names,
        "trash_bytes": tree_bytes(ckdir / TRASH) if TRASH in names else 0,
    }


RESTORE_LOCK = threading.Lock()  # one restore at a time in this process


def restore_all(ckdir: Path) -> dict[int, str]:
    """Restores every listed step; {step: problem} for those that fail or look wrong."""

    problems = {}
    with RESTORE_LOCK:
        ckpt = Checkpointer(str(ckdir))
        for step in ckpt.all_steps():
            try:
                state, meta = ckpt.restore(step)
                leaves = [np.asarray(x) for x in jax.tree.leaves(state["train"]["params"])]
                if meta["step"] != step:
                    problems[step] = f"metadata step {meta['step']}"
                elif not all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f"):
                    problems[step] = "non-finite parameters"
            except Exception as e:  # noqa: BLE001 (reported)
                problems[step] = f"{type(e).__name__}: {e}"[:300]
    return problems


def policy(ckdir: Path, step: int) -> list[np.ndarray]:

    with RESTORE_LOCK:
        state, _ = Checkpointer(str(ckdir)).restore(step)
    return [np.asarray(x) for x in jax.tree.leaves(state["train"]["params"]["policy"])]


def to_numpy(x) -> np.ndarray:
    """A leaf as a NumPy array (typed PRNG keys as their key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a, b))


def allclose(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.allclose(y, x, rtol=RTOL, atol=ATOL) for x, y in zip(a, b))


# ----- kills -----


class Bench:
    def __init__(self, args, root: Path, world: dict, env: dict):
        self.args, self.root, self.env = args, root, env
        self.config_file = root / "tiny_config.py"
        self.config_file.write_text(
            CONFIG_FILE.format(world_dir=world["dir"], repo=REPO, world=world, steps=args.steps)
        )
        self.baseline_done = threading.Event()
        self.lock = threading.RLock()
        self.durations: dict[tuple[str, int], float] = {}
        self.reference: list[np.ndarray] | None = None

    def child(self, name: str, workdir: Path, resume: bool, max_to_keep: int = 2) -> Child:
        launcher = config_args(self.config_file, workdir, self.args.steps, max_to_keep, resume)
        log = self.root / f"{name}.log"
        return Child(name, workdir / "checkpoints", launcher, self.env, log)

    def baseline(self) -> dict:
        workdir = self.root / "reference"
        start = time.monotonic()
        try:
            child = self.child("reference", workdir, resume=False)
            rc = child.finish()
            if rc != 0:
                raise RuntimeError(f"the reference run failed ({rc}):\n{child.stderr_tail()}")
            self.learn(child)
            ckdir = workdir / "checkpoints"
            self.reference = policy(ckdir, self.args.steps)
        finally:
            self.baseline_done.set()  # the trials waiting for it go on (and fail without it)
        step_change = max_abs_diff(self.reference, policy(ckdir, self.args.steps - 1))
        return {
            "seconds": round(time.monotonic() - start, 1),
            "startup_seconds": round(child.startup_seconds(), 1),
            "phase_seconds": {f"{p} {s}": round(d, 3) for (p, s), d in child.durations().items()},
            "one_step_param_change": step_change,
            "checkpoint_bytes": tree_bytes(ckdir / str(self.args.steps)),
            "ckdir": str(ckdir),
        }

    def estimate(self, phase: str, step: int) -> float:
        """The shortest time (phase, step) took in any run so far (compiles get cached)."""
        with self.lock:
            return self.durations.get((phase, step), 1.0)

    def learn(self, child: Child) -> None:
        with self.lock:
            for key, seconds in child.durations().items():
                self.durations[key] = min(self.durations.get(key, seconds), seconds)

    def aim(self, child: Child, ckdir: Path, phase: str, step: int, fraction: float) -> list:
        """Waits for the moment to kill: `fraction` into the rollout or update of `step` (of
        the time it took before), or in its save once orbax's temporary directory exists
        ("save-write": within 0.1 s of it) or once the step is committed and the save still
        runs ("save-commit": finalizing, pruning). If the phase ends first, the same phase of
        the next step is the target. Returns the targets missed."""
        missed = []
        name = phase.split("-")[0]
        while True:
            if not child.wait_for("begin", name, step, CHILD_TIMEOUT_S):
                return missed
            began = time.monotonic()
            if phase == "save-write":
                when = lambda: (ckdir / f"{step}{TMP_MARKER}").exists()  # noqa: E731
                delay = fraction * 0.1
            elif phase == "save-commit":
                when = lambda: (ckdir / str(step) / COMMIT_FILE).exists()  # noqa: E731
                delay = 0.0
            else:
                when = lambda: time.monotonic() - began >= fraction * length  # noqa: E731
                length, delay = self.estimate(name, step), 0.0
            while not when() and not child.has("end", name, step):
                time.sleep(0.0005)
            if delay and not child.has("end", name, step):
                time.sleep(delay)
            if not child.has("end", name, step) or step == self.args.steps:
                return missed
            missed.append(f"{name} {step}")
            with self.lock:  # this run's phases are quicker than the estimate: learn from it
                took = child.durations().get((name, step))
                if took is not None:
                    self.durations[(name, step + 1)] = min(self.estimate(name, step + 1), took)
            step += 1

    def trial(self, index: int, phase: str, step: int, fraction: float) -> dict:
        workdir = self.root / f"kill{index}"
        ckdir = workdir / "checkpoints"
        out = {"kill": index, "target": f"{phase} {step} at {fraction:.2f}"}
        start = time.monotonic()
        if not phase.startswith("save"):
            self.baseline_done.wait()  # the delay is a fraction of the phase's time before
        child = self.child(f"kill{index}", workdir, resume=False)
        if not child.wait_for("begin", phase.split("-")[0], step, CHILD_TIMEOUT_S):
            child.finish()
            return {
                **out,
                "survived": False,
                "why": "target never reached:\n" + child.stderr_tail(),
            }
        out["missed_targets"] = self.aim(child, ckdir, phase, step, fraction)
        rc, killed_at = child.kill()
        if rc != -signal.SIGKILL:
            return {**out, "survived": False, "why": f"the run ended (status {rc}) before the kill"}
        at_death = inspect(ckdir)
        broken_at_death = restore_all(ckdir)
        started = sum(1 for e in child.events if e[1:3] == ("begin", "rollout"))
        latest = at_death["steps"][-1] if at_death["steps"] else 0
        phase_at_death = child.phase_at()
        if phase_at_death.startswith("save "):  # how far the save got
            saving = int(phase_at_death.split()[1])
            if f"{saving}{TMP_MARKER}" in at_death["tmp_dirs"]:
                phase_at_death += " (writing)"
            elif saving in at_death["steps"] and at_death["trash"]:
                phase_at_death += " (committed, pruning)"
            elif saving in at_death["steps"]:
                phase_at_death += " (committed)"
            else:
                phase_at_death += " (not started writing)"
        out.update(
            phase=phase_at_death,
            killed_at_s=round(killed_at, 2),
            steps_at_death=at_death["steps"],
            half_written_at_death=at_death["half_written"],
            tmp_dirs_at_death=at_death["tmp_dirs"],
            tmp_bytes_discarded=at_death["tmp_bytes"],
            trash_bytes_at_death=at_death["trash_bytes"],
            steps_redone=max(0, started - latest),
            restore_failures_at_death=broken_at_death,
        )
        resumed = self.child(f"resume{index}", workdir, resume=True)
        rc = resumed.finish()
        self.learn(resumed)
        after = inspect(ckdir)
        broken_after = restore_all(ckdir) if rc == 0 else {}
        out.update(resume_status=rc, steps_after=after["steps"])
        problems = []
        if rc != 0:
            problems.append(f"resume failed (status {rc}): {resumed.stderr_tail(1500)}")
        if at_death["half_written"] or after["half_written"]:
            problems.append("a step directory without its commit marker")
        if broken_at_death or broken_after:
            problems.append(f"listed steps that do not restore: {broken_at_death or broken_after}")
        if after["tmp_dirs"] or after["trash"]:
            problems.append(f"leftovers after the resume: {after}")
        if rc == 0:
            self.baseline_done.wait()
            if self.args.steps not in after["steps"] or self.reference is None:
                problems.append(f"final step (or the reference) missing: {after['steps']}")
            else:
                final = policy(ckdir, self.args.steps)
                out["max_abs_param_diff"] = max_abs_diff(self.reference, final)
                if not allclose(self.reference, final):
                    problems.append("final parameters differ from the reference run")
        out.update(survived=not problems, seconds=round(time.monotonic() - start, 1))
        if problems:
            out["why"] = problems
        return out

    def targets(self) -> list[tuple[str, int, float]]:
        rng = np.random.default_rng(self.args.seed)
        out = []
        for i in range(self.args.kills):
            phase = KILL_PHASES[i % len(KILL_PHASES)]
            # --quick: during the last save, so the resume restores the step before it
            step = self.args.steps if self.args.quick else int(rng.integers(1, self.args.steps + 1))
            out.append((phase, step, float(rng.uniform(0.0, 1.0))))
        return out


# ----- disk full -----


def unshare_prefix() -> list[str] | None:
    """The command prefix that gives a private mount namespace where tmpfs can be mounted."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = tempfile.mkdtemp(prefix="dgpo_faults_probe_")
        try:
            ok = (
                subprocess.run(
                    [*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                    capture_output=True,
                    timeout=30,
                ).returncode
                == 0
            )
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        finally:
            os.rmdir(probe)
        if ok:
            return prefix
    return None


def mount_tmpfs(path: Path, options: str, remount: bool = False) -> None:
    opts = f"remount,{options}" if remount else options
    cmd = ["mount", "-o", opts, str(path)] if remount else ["mount", "-t", "tmpfs", "-o", opts]
    if not remount:
        cmd += ["tmpfs", str(path)]
    subprocess.run(cmd, check=True, capture_output=True)


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def used_inodes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_files - st.f_ffree


def disk_full_case(root: Path, name: str, state, expected, limit: str, async_save: bool) -> dict:
    """Saves `state` as steps 1, 2, ... on a tmpfs mounted with `limit` until a save fails;
    checks the failure and what is left, enlarges the tmpfs and saves the failed step again."""

    mnt = root / name
    mnt.mkdir()
    mount_tmpfs(mnt, limit)
    ckdir = mnt / "checkpoints"
    ckpt = Checkpointer(str(ckdir), max_to_keep=None, async_save=async_save)
    out = {"limit": limit, "async_save": async_save}
    error, surfaced, step = None, None, 0
    before = (0, 0)
    for step in range(1, 20):
        before = (used_bytes(mnt), used_inodes(mnt))
        try:
            surfaced = "save"
            ckpt.save(step, state, {"step": step})
            surfaced = "wait_until_finished"
            ckpt.wait_until_finished()
        except CheckpointSaveError as e:
            error = e
            break
    problems = []
    if error is None:
        problems.append("no save failed")
    else:
        out.update(
            failed_step=step,
            surfaced_in=surfaced,
            errno=errno.errorcode.get(error.errno, error.errno),
            error=str(error),
            one_line="\n" not in str(error),
            names_directory_and_step=str(ckdir) in str(error) and f"step {step}" in str(error),
        )
        if error.errno != errno.ENOSPC:
            problems.append(f"errno {error.errno}, not ENOSPC")
        if not (out["one_line"] and out["names_directory_and_step"]):
            problems.append("the message is not one line naming the directory and the step")
    seen = inspect(ckdir)
    out.update(
        steps_listed=seen["steps"],
        half_written=seen["half_written"],
        leftover_dirs=seen["tmp_dirs"],
        bytes_left_by_failed_save=used_bytes(mnt) - before[0],
        inodes_left_by_failed_save=used_inodes(mnt) - before[1],
    )
    if seen["steps"] != list(range(1, step)):
        problems.append(f"listed {seen['steps']}, expected 1..{step - 1}")
    if seen["half_written"] or seen["tmp_dirs"]:
        problems.append("a half-written step or a temporary directory is left")
    # enlarge the file system ("space freed") and save the failed step again
    mount_tmpfs(mnt, "size=256m,nr_inodes=100000", remount=True)
    try:
        ckpt.save(step, state, {"step": step})
        ckpt.wait_until_finished()
        out["save_after_space_freed"] = True
    except Exception as e:  # noqa: BLE001 (reported)
        out["save_after_space_freed"] = f"{type(e).__name__}: {e}"[:300]
        problems.append("the save after the space was freed failed")
    ckpt.close()
    reader = Checkpointer(str(ckdir))
    for s in reader.all_steps():
        restored, meta = reader.restore(s)
        leaves = [to_numpy(x) for x in jax.tree.leaves(restored)]
        if meta != {"step": s} or not all(np.array_equal(x, y) for x, y in zip(leaves, expected)):
            problems.append(f"step {s} does not restore bit-exactly")
    out["steps_after"] = reader.all_steps()
    subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
    out["ok"] = not problems
    if problems:
        out["why"] = problems
    return out


def disk_full_child(root: str, source: str) -> None:
    """(In a private mount namespace.) The checkpointer-level disk-full cases on tmpfs, with
    the reference run's last train state; prints one JSON line."""

    src = Checkpointer(source)
    state, _ = src.restore()
    expected = [to_numpy(x) for x in jax.tree.leaves(state)]
    step_dir = Path(source) / str(src.latest_step())
    size = tree_bytes(step_dir)
    inodes = sum(len(d) + len(f) for _, d, f in os.walk(step_dir)) + 1
    limit = f"size={(size * 5 // 2) // 4096 * 4096}"
    cases = {}
    for name, opts, async_save in (
        ("bytes_sync", limit, False),
        ("bytes_async", limit, True),
        ("inodes_sync", f"size=256m,nr_inodes={inodes * 5 // 2 + 2}", False),
    ):
        start = time.monotonic()
        cases[name] = disk_full_case(Path(root), name, state, expected, opts, async_save)
        cases[name]["seconds"] = round(time.monotonic() - start, 2)
    print(json.dumps({"checkpoint_bytes": size, "checkpoint_inodes": inodes, "cases": cases}))


def disk_full_train_child(root: str, bench_args: list[str]) -> None:
    """(In a private mount namespace.) The launcher with its workdir on a tmpfs with room for
    one and a half checkpoints; then the tmpfs is enlarged and the run resumed. Prints one JSON
    line."""
    config_file, steps, checkpoint_bytes, reference_dir, cache_dir = bench_args
    steps, checkpoint_bytes = int(steps), int(checkpoint_bytes)
    mnt = Path(root) / "train"
    mnt.mkdir()
    # room for one checkpoint and half of the next (plus the metrics): the save of step 2 fails
    mount_tmpfs(mnt, f"size={(checkpoint_bytes * 3 // 2 + 2**19) // 4096 * 4096}")
    workdir = mnt / "run"
    env = child_env(Path(cache_dir))
    out = {}

    def launch(resume: bool, name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                str(workdir / "checkpoints"),
                *config_args(Path(config_file), workdir, steps, 3, resume),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=CHILD_TIMEOUT_S,
        )

    start = time.monotonic()
    full = launch(False, "full")
    lines = full.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    out.update(
        status=full.returncode,
        error_lines=errors,
        hint_lines=[line for line in lines if line.startswith("hint:")],
        # orbax logs each failed writer thread with its traceback (absl, level ERROR)
        traceback_lines_in_stderr=sum(1 for line in lines if line.startswith("Traceback")),
        stderr_last_lines=lines[-2:],
        seconds_to_failure=round(time.monotonic() - start, 1),
    )
    seen = inspect(workdir / "checkpoints")
    out.update(steps_listed=seen["steps"], leftovers=seen["tmp_dirs"] + seen["half_written"])
    out["restore_failures"] = restore_all(workdir / "checkpoints")
    problems = []
    if full.returncode != 2 or len(errors) != 1 or "No space left on device" not in errors[0]:
        problems.append(f"expected status 2 and one ENOSPC error line: {full.stderr[-1500:]}")
    if not seen["steps"] or seen["half_written"] or seen["tmp_dirs"] or out["restore_failures"]:
        problems.append("the checkpoints left are not all committed and restorable")
    mount_tmpfs(mnt, "size=256m", remount=True)
    resumed = launch(True, "resume")
    out["resume_status"] = resumed.returncode
    if resumed.returncode != 0:
        problems.append(f"resume failed: {resumed.stderr[-1500:]}")
    else:
        final = policy(workdir / "checkpoints", steps)
        reference = policy(Path(reference_dir), steps)
        out["max_abs_param_diff"] = max_abs_diff(reference, final)
        if not allclose(reference, final):
            problems.append("final parameters differ from the reference run")
    out.update(seconds=round(time.monotonic() - start, 1), ok=not problems)
    if problems:
        out["why"] = problems
    subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
    print(json.dumps(out))


def run_in_namespace(prefix: list[str], args: list[str], env: dict, timeout_s: float) -> dict:
    proc = subprocess.run(
        [*prefix, sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout_s,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"ok": False, "why": f"status {proc.returncode}: {proc.stderr[-2000:]}"}
    return json.loads(lines[-1])


# ----- main -----


def child_env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=CHILD_XLA_FLAGS,
        JAX_PLATFORMS="cpu",
        DGPO_JAX_COMPILATION_CACHE=str(cache_dir),
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 kill during a save, 2 steps")
    parser.add_argument("--kills", type=int, default=None, help="default 10 (--quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="default 4 (--quick: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="trials run side by side")
    parser.add_argument(
        "--cache-dir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "dgpo_jax", "xla-faults"),
        help="persistent compilation cache shared by the training processes",
    )
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    args = parser.parse_args(argv)
    args.kills = args.kills if args.kills is not None else (1 if args.quick else 10)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 4)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the reference's last step change is reported)")

    started = time.monotonic()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dgpo_faults_"))
    root.mkdir(parents=True, exist_ok=True)
    env = child_env(Path(args.cache_dir))
    try:
        world = build_world(root / "world")
        bench = Bench(args, root, world, env)
        targets = bench.targets()
        print(f"workdir {root}; kill targets (phase, step, fraction): {targets}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            reference = pool.submit(bench.baseline)
            trials = [pool.submit(bench.trial, i, *t) for i, t in enumerate(targets)]
            reference = reference.result()
            print(f"reference: {json.dumps(reference)}", flush=True)
            results = []
            for index, future in enumerate(trials):
                try:
                    results.append(future.result())
                except Exception as e:  # noqa: BLE001 (a broken trial is reported, not fatal)
                    results.append({"kill": index, "survived": False, "why": repr(e)[-2000:]})
                print(json.dumps(results[-1]), flush=True)

        prefix = unshare_prefix()
        if prefix is None:
            disk_full = {"skipped": "no private mount namespace with tmpfs (unshare -m) here"}
        else:
            ns_root = root / "tmpfs"
            ns_root.mkdir()
            disk_full = run_in_namespace(
                prefix, ["--disk-full-child", str(ns_root), reference["ckdir"]], env, 600
            )
            if not args.quick:
                train_args = [
                    str(bench.config_file),
                    str(args.steps),
                    str(reference["checkpoint_bytes"]),
                    reference["ckdir"],
                    args.cache_dir,
                ]
                disk_full["training_run"] = run_in_namespace(
                    prefix, ["--disk-full-train-child", str(ns_root), *train_args], env, 1800
                )
        print(f"disk full: {json.dumps(disk_full)}", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    killed = [r for r in results if "phase" in r]
    diffs = [r["max_abs_param_diff"] for r in results if "max_abs_param_diff" in r]
    phase_names = [r.get("phase", "not killed") for r in results]
    counts = {}
    for name in phase_names:
        key = name.split()[0] if not name.startswith("between") else "between phases"
        counts[key] = counts.get(key, 0) + 1
    cases = disk_full.get("cases", {})
    summary = {
        "benchmark": "faults",
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "steps": args.steps,
        "kills": args.kills,
        "kills_survived": sum(1 for r in results if r.get("survived")),
        "kill_phases": phase_names,
        "phase_counts": counts,
        "kills_during_save": sum(1 for r in killed if r["phase"].startswith("save")),
        "kills_during_save_with_tmp_dir": sum(
            1 for r in killed if r["phase"].startswith("save") and r["tmp_dirs_at_death"]
        ),
        "steps_redone": [r.get("steps_redone") for r in killed],
        "tmp_bytes_discarded": [r.get("tmp_bytes_discarded") for r in killed],
        "max_abs_param_diff": max(diffs) if diffs else None,
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "one_step_param_change": reference["one_step_param_change"],
        "checkpoint_bytes": reference["checkpoint_bytes"],
        "process_startup_seconds": reference["startup_seconds"],
        "reference_run_seconds": reference["seconds"],
        "disk_full": {
            **{name: case.get("ok") for name, case in cases.items()},
            **(
                {"training_run": disk_full["training_run"].get("ok")}
                if "training_run" in disk_full
                else {}
            ),
            **({"skipped": disk_full["skipped"]} if "skipped" in disk_full else {}),
            **({"why": str(disk_full["why"])[-500:]} if "why" in disk_full else {}),
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))
    ok = summary["kills_survived"] == args.kills and all(
        v is True for k, v in summary["disk_full"].items() if k not in ("skipped",)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 4 and sys.argv[1] == "--disk-full-child":
        disk_full_child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 8 and sys.argv[1] == "--disk-full-train-child":
        disk_full_train_child(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(main())
