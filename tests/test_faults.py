"""The checkpoint disk fills up during a save.

A fault-injecting wrapper replaces the local-file layer through which orbax writes its
Python-side files (``etils.epath``'s os backend: the step's and the items' metadata, the JSON
metadata, the commit markers; nine files per save): the chosen file (or, for a global byte
budget, whichever file crosses it) gets the bytes that fit written and then raises
``OSError(ENOSPC)``, as a full disk does. The arrays are written by tensorstore in C++, which no
Python wrapper reaches; its disk-full error (a ValueError carrying ``os_error_code='28'``) is
covered by the message-parsing test below with tensorstore's own wording, and for real by
``benchmarks/faults.py`` on small tmpfs file systems (bytes and inodes, sync and async).

Every failure must raise one-line `CheckpointSaveError` (errno ENOSPC, naming the directory and
the step) from ``save`` or, with ``async_save``, at the latest from ``wait_until_finished``;
the committed steps stay listed and restore bit-exactly, no half-written step is listed, the
failed save's temporary directory is gone, and the next save works once the disk has room.

Kills: ``tests/test_checkpoint.py`` SIGKILLs a checkpoint writer while it writes, commits and
prunes, and ``tests/test_pipeline.py`` kills a training run and resumes it. A training-level
kill *during a save* needs a training process (its start-up alone, compiling the sampler's
rollout program, which the persistent cache cannot keep, is ~45 s on 2 CPU cores), so it lives
in ``benchmarks/faults.py`` (10 seeded kills over rollouts, updates and saves) instead.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import backend as epath_backend

from dgpo_jax.checkpoint import checkpointer as checkpointer_module
from dgpo_jax.checkpoint.checkpointer import Checkpointer, CheckpointSaveError
from dgpo_jax.errors import UserError, report

TMP = ".orbax-checkpoint-tmp"
# When one write fails, orbax abandons the array writes it had not started: Python warns that
# those coroutines were never awaited (orbax's doing, harmless).
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")


def state(step):
    return {
        "w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) + step,
        "ids": jnp.arange(100, dtype=jnp.int32) * step,
        "rng": jax.random.key(step),
    }


def assert_restores(ckpt, steps):
    """Each step restores bit-exactly with its metadata."""
    for step in steps:
        restored, metadata = ckpt.restore(step)
        assert metadata == {"step": step}
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state(step)["w"]))
        np.testing.assert_array_equal(np.asarray(restored["ids"]), np.asarray(state(step)["ids"]))


class DiskFull:
    """Makes files orbax writes under `root` fail with ENOSPC.

    `pattern` (a regex on the path below `root`) and `occurrence` pick the n-th file opened for
    writing that matches; it takes `after_bytes` bytes and then fails. With `budget` instead,
    the disk has that many bytes free for all files together. `armed=False` lets every write
    through (space freed).
    """

    def __init__(self, root, pattern=None, occurrence=1, after_bytes=0, budget=None):
        self.root = os.fspath(root)
        self.pattern, self.occurrence, self.after_bytes = pattern, occurrence, after_bytes
        self.budget = budget
        self.armed = True
        self.seen = 0
        self.failed: list[str] = []
        self.lock = threading.Lock()

    def install(self, monkeypatch):
        original = epath_backend._OsPathBackend.open
        disk = self

        def open_(backend, path, mode):
            handle = original(backend, path, mode)
            path = os.fspath(path)
            if not disk.armed or not any(c in mode for c in "wax"):
                return handle
            if not path.startswith(disk.root):
                return handle
            relative = os.path.relpath(path, disk.root)
            if disk.budget is not None:
                return _LimitedFile(handle, disk, path, None)
            if disk.pattern and re.search(disk.pattern, relative):
                with disk.lock:
                    disk.seen += 1
                    if disk.seen == disk.occurrence:
                        return _LimitedFile(handle, disk, path, disk.after_bytes)
            return handle

        monkeypatch.setattr(epath_backend._OsPathBackend, "open", open_)


class _LimitedFile:
    """A file that accepts `room` bytes (None: the DiskFull's shared budget), then ENOSPC."""

    def __init__(self, handle, disk, path, room):
        self._handle, self._disk, self._path, self._room = handle, disk, path, room

    def write(self, data):
        size = len(data.encode() if isinstance(data, str) else data)
        with self._disk.lock:
            room = self._disk.budget if self._room is None else self._room
            fits = min(size, room)
            if self._room is None:
                self._disk.budget -= fits
            else:
                self._room -= fits
        if fits < size:
            if fits:
                self._handle.write(data[:fits])
            self._disk.failed.append(self._path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()


def save_and_wait(ckpt, step):
    """Saves `step`; returns where a CheckpointSaveError surfaced ('save', 'wait') or None."""
    try:
        ckpt.save(step, state(step), {"step": step})
    except CheckpointSaveError as e:
        return "save", e
    try:
        ckpt.wait_until_finished()
    except CheckpointSaveError as e:
        return "wait", e
    return None, None


def check_error(error, directory, step):
    message = str(error)
    assert isinstance(error, UserError) and isinstance(error, OSError)
    assert error.errno == errno.ENOSPC and error.step == step
    assert "\n" not in message
    assert f"checkpoint step {step} in {directory}" in message, message
    assert "No space left on device (errno 28 ENOSPC)" in message, message
    assert error.hint
    printed = io.StringIO()
    report(error, stream=printed)
    lines = printed.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: could not save checkpoint step")
    assert lines[1].startswith("hint: ")


def check_directory(directory, committed):
    """Listed = committed; no step directory without its marker; no temporary directory."""
    names = sorted(os.listdir(directory))
    assert not [n for n in names if TMP in n or n == ".deleted"], names
    assert sorted(names, key=int) == [str(s) for s in committed], names
    reader = Checkpointer(directory)
    assert reader.all_steps() == committed
    assert_restores(reader, committed)


# Where the disk fills up: (file below the checkpoint directory, which time it is opened in the
# save, bytes written before ENOSPC). Together they cover every Python-side write of a save,
# from the first (the step's metadata) to the last (the step's commit marker, just before the
# rename that commits the step).
SYNC_FAULTS = [
    (r"^\d+\.orbax-checkpoint-tmp/_CHECKPOINT_METADATA$", 1, 0),
    (r"metadata\.orbax-checkpoint-tmp/metadata$", 1, 10),
    (r"array_metadatas/process_0$", 1, 0),
    (r"state\.orbax-checkpoint-tmp/_METADATA$", 1, 20),
    (r"state\.orbax-checkpoint-tmp/commit_success\.txt$", 1, 0),
    (r"^\d+\.orbax-checkpoint-tmp/_CHECKPOINT_METADATA$", 3, 5),
    (r"^\d+\.orbax-checkpoint-tmp/commit_success\.txt$", 1, 0),
]


def test_disk_full_during_a_sync_save(tmp_path, monkeypatch, caplog):
    """Each write of a save in turn hits a full disk; then one shared byte budget runs out.
    orbax's own error logs of the failed writer threads (tracebacks) are not shown: the
    CheckpointSaveError line reports the failure."""
    caplog.set_level(logging.ERROR)
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, max_to_keep=2)
    assert ckpt.save(1, state(1), {"step": 1})
    disk = DiskFull(directory)
    disk.install(monkeypatch)
    for pattern, occurrence, after_bytes in SYNC_FAULTS:
        disk.pattern, disk.occurrence, disk.after_bytes, disk.seen = (
            pattern,
            occurrence,
            after_bytes,
            0,
        )
        where, error = save_and_wait(ckpt, 2)
        assert where == "save", (pattern, occurrence)
        assert re.search(pattern, os.path.relpath(disk.failed[-1], directory))
        check_error(error, directory, 2)
        assert f"while writing {disk.failed[-1]}" in str(error)
        assert "the last committed step, 1, is intact" in str(error)
        check_directory(directory, [1])
    # the disk fills up across files: 300 bytes left for a save that writes about 3 KB
    disk.pattern, disk.budget = None, 300
    where, error = save_and_wait(ckpt, 2)
    assert where == "save"
    check_error(error, directory, 2)
    check_directory(directory, [1])
    # space freed: the same Checkpointer saves again, pruning included (max_to_keep=2)
    disk.armed = False
    for step in (2, 3):
        assert save_and_wait(ckpt, step) == (None, None)
    check_directory(directory, [2, 3])
    ckpt.close()
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    "pattern, occurrence, after_bytes",
    [
        (r"^\d+\.orbax-checkpoint-tmp/_CHECKPOINT_METADATA$", 1, 0),  # in save(), main thread
        (r"metadata\.orbax-checkpoint-tmp/metadata$", 1, 10),
        (r"^\d+\.orbax-checkpoint-tmp/commit_success\.txt$", 1, 0),  # in the background commit
    ],
)
def test_disk_full_during_an_async_save(tmp_path, monkeypatch, pattern, occurrence, after_bytes):
    """The error is not lost in orbax's background thread: it surfaces from save() or from
    wait_until_finished(). (A failure of the very first write may still end with the step
    committed, when orbax's later rewrites of that file succeed: the error then says so.)"""
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, max_to_keep=2, async_save=True)
    assert save_and_wait(ckpt, 1) == (None, None)
    disk = DiskFull(directory, pattern, occurrence, after_bytes)
    disk.install(monkeypatch)
    where, error = save_and_wait(ckpt, 2)
    assert where in ("save", "wait")
    assert str(error).startswith("could not save checkpoint step 2 in "), str(error)
    assert error.errno == errno.ENOSPC and "\n" not in str(error)
    committed = Checkpointer(directory).all_steps()
    if committed == [1, 2]:
        assert "step 2 was committed all the same" in str(error)
    else:
        assert "nothing of step 2 is kept" in str(error)
    check_directory(directory, committed)
    disk.armed = False
    assert save_and_wait(ckpt, 3) == (None, None)
    check_directory(directory, committed[-1:] + [3])
    ckpt.close()


def test_a_failure_that_is_not_an_os_error_keeps_its_type(tmp_path, monkeypatch):
    """Only failed file operations become CheckpointSaveError; a bug keeps its exception (and
    the failed save's temporary directory is removed all the same)."""
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory)
    ckpt.save(1, state(1), {"step": 1})
    original = epath_backend._OsPathBackend.open

    def broken(backend, path, mode):
        if "metadata.orbax-checkpoint-tmp/metadata" in os.fspath(path) and "w" in mode:
            raise RuntimeError("a bug, not a full disk")
        return original(backend, path, mode)

    monkeypatch.setattr(epath_backend._OsPathBackend, "open", broken)
    with pytest.raises(RuntimeError, match="a bug, not a full disk"):
        ckpt.save(2, state(2), {"step": 2})
    check_directory(directory, [1])


def test_tensorstore_disk_full_message_is_parsed():
    """tensorstore (the array writer) reports a failed write as a ValueError whose text carries
    the OS error code; its wording, as seen on a full tmpfs, gives errno and file."""
    path = "/ck/2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/63fd1d21"
    message = (
        'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file '
        '"/ck/2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed '
        f'writing: "{path}": Failed to write 1857373 bytes to file 14: No space left on device '
        "[os_error_code='28']"
    )
    assert checkpointer_module._os_error_of(ValueError(message)) == (
        errno.ENOSPC,
        os.strerror(errno.ENOSPC),
        path,
    )
    try:  # an OSError further down the chain counts too
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/ck/x")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert checkpointer_module._os_error_of(outer) == (
            errno.EDQUOT,
            "Disk quota exceeded",
            "/ck/x",
        )
    assert checkpointer_module._os_error_of(ValueError("shape mismatch")) is None
