"""Result files are replaced whole or not at all, on a local disk and on an object store.

`use_fake_gcs` (also used by tests/test_metrics_log.py and tests/test_replay.py) serves epath's
``gs://`` paths from an in-memory fsspec filesystem that, like a real object store, cannot
append; the working directory is an empty folder, so a stray ``os``/``open`` call on a
``gs://`` path (which would make a local ``gs:`` folder) is caught by `assert_no_local_files`.
"""

import os

import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.memory import MemoryFileSystem

from dgpo_jax.checkpoint.fileio import (
    is_remote,
    write_atomically,
    write_bytes_atomically,
    write_text_atomically,
)

FAKE_BUCKET = "gs://fake-bucket"


def use_fake_gcs(monkeypatch, tmp_path) -> str:
    """Routes ``gs://`` through epath's fsspec backend to a fresh in-memory store; returns a run
    directory on it. The current directory becomes the empty ``tmp_path/cwd``."""

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs = [""]
        uploads: list[str] = []  # the objects written, in order

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path).removeprefix("gs://").removeprefix("gcs://")
            return "/" + path.strip("/")

        def _open(self, path, mode="rb", **kwargs):
            if "a" in mode:
                raise NotImplementedError(f"an object store cannot append: {path}")
            if "w" in mode:
                FakeGCS.uploads.append(self._strip_protocol(path))
            return super()._open(path, mode, **kwargs)

    fake = FakeGCS()
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)  # fsspec, not tf.gfile
    monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: fake)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return f"{FAKE_BUCKET}/run"


def fake_uploads() -> list[str]:
    """The objects written to the fake store so far (``gs://``-less paths), in order."""
    return type(epath_backend.fsspec_backend.fs("gs://")).uploads


def assert_no_local_files(tmp_path) -> None:
    assert os.listdir(tmp_path / "cwd") == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    path = str(tmp_path / "results.json")
    write_text_atomically(path, "old")

    def fails_halfway(partial):
        with open(partial, "w") as handle:
            handle.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, fails_halfway)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["results.json"]
    write_text_atomically(path, "new ✓")
    assert open(path, encoding="utf-8").read() == "new ✓"
    assert os.listdir(tmp_path) == ["results.json"]
    write_bytes_atomically(epath.Path(path), b"\x00bytes")  # an epath.Path works as well
    assert open(path, "rb").read() == b"\x00bytes" and os.listdir(tmp_path) == ["results.json"]
    assert not is_remote(path) and is_remote("gs://b/x") and is_remote(epath.Path("s3://b/x"))


def test_object_store_writes_are_single_object_writes(monkeypatch, tmp_path):
    run = use_fake_gcs(monkeypatch, tmp_path)
    path = f"{run}/results.json"
    write_text_atomically(path, "old")
    assert epath.Path(path).read_text() == "old"

    def fails_halfway(local):
        with open(local, "w") as handle:  # a local scratch file, uploaded when complete
            handle.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, fails_halfway)
    assert epath.Path(path).read_text() == "old"

    def writes_a_file(local):
        with open(local, "wb") as handle:
            handle.write(b"from a path-based writer")

    write_atomically(path, writes_a_file)
    assert epath.Path(path).read_bytes() == b"from a path-based writer"
    write_text_atomically(epath.Path(path), "new ✓")
    assert epath.Path(path).read_text() == "new ✓"
    assert [p.name for p in epath.Path(run).iterdir()] == ["results.json"]  # no partial objects
    assert fake_uploads() == ["/fake-bucket/run/results.json"] * 3
    assert_no_local_files(tmp_path)
