"""Writing result files so that a reader (or a killed run) never leaves half a file behind.

Paths go through ``etils.epath`` (as the orbax checkpoints do), so a work directory can be local
or on an object store (``gs://``, ``s3://``, ...; epath uses ``tf.io.gfile`` when TensorFlow is
installed, else fsspec with ``gcsfs``/``s3fs``):

* local file system: the content goes to ``PATH.partial-PID`` next to ``PATH``, is fsynced and
  renamed over ``PATH`` (atomic on POSIX), then the directory is fsynced;
* object store (a ``scheme://`` path): one object write is atomic already (the object appears,
  whole, when its upload is finalised), so the bytes go straight to ``PATH`` in a single write
  once they are complete in memory: an exception while they are produced uploads nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """Whether ``path`` names an object store (``gs://``, ``s3://``, ...), not a local file."""
    return "://" in os.fspath(path)


def write_atomically(path: PathLike, write: Callable[[str], object]) -> None:
    """Calls ``write(local_path)``, then puts that file's content at ``path``.

    Local ``path``: ``local_path`` is a partial file next to ``path``, fsynced and renamed over
    it. Remote ``path``: ``local_path`` is in a local temporary directory and its bytes are
    uploaded in one object write. On an exception (KeyboardInterrupt included) the partial file
    is removed; ``path`` keeps its previous content or stays absent, also when the process is
    killed outright.
    """
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="dgpo-upload-") as scratch:
            local = os.path.join(scratch, epath.Path(path).name)
            write(local)
            with open(local, "rb") as handle:
                data = handle.read()
        epath.Path(path).write_bytes(data)
        return
    path = os.fspath(path)
    partial = f"{path}.partial-{os.getpid()}"
    try:
        write(partial)
        _fsync(partial)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    _fsync(os.path.dirname(os.path.abspath(path)), best_effort=True)


def write_bytes_atomically(path: PathLike, data: bytes) -> None:
    """``data`` to ``path``: one object write on an object store, else `write_atomically`."""
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return

    def write(partial: str) -> None:
        with open(partial, "wb") as handle:
            handle.write(data)

    write_atomically(path, write)


def write_text_atomically(path: PathLike, text: str) -> None:
    """``text`` to ``path`` (UTF-8) through `write_bytes_atomically`."""
    write_bytes_atomically(path, text.encode("utf-8"))


def _fsync(path: str, best_effort: bool = False) -> None:
    """Flushes the file (or directory) ``path`` to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if best_effort:  # e.g. a directory cannot be opened on some platforms
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)
