"""Saving and restoring training state with orbax, atomically and across meshes.

One `Checkpointer` manages one directory of numbered steps:

    DIR/
      7/                      one committed step (the name is the step number)
        state/                the array pytree (orbax OCDBT + tensorstore files)
        metadata/metadata     the JSON metadata dict (config, data-iterator state, ...)
        commit_success.txt    written just before the step was renamed into place
        _CHECKPOINT_METADATA  orbax's own per-step bookkeeping
      8.orbax-checkpoint-tmp  a save in progress (or one killed mid-way): never read
      .deleted/               old steps being pruned (renamed here, then removed)

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp`, writes
`commit_success.txt` and then renames the directory to `<step>`; a rename
is atomic on a POSIX file system, so a process killed at any moment leaves
either no `<step>` directory or a complete one. Steps are listed from disk and
only directories named by an integer that contain `commit_success.txt` count.
Pruning (`max_to_keep`) first renames the old step into `.deleted/` (orbax's
`todelete_subdir`), so a kill during deletion never leaves a half-deleted
step under its own name. The first `save` of a `Checkpointer` removes the
leftovers of killed saves (temporary directories and `.deleted/`); this
assumes one writer per directory. Readers never delete anything.

A save that fails part-way (the disk fills up, a quota, an I/O error) raises
`CheckpointSaveError` naming the directory, the step and the OS error (with
`async_save`, from `wait_until_finished` or the next `save`); the temporary
directory of that step is removed to give its space back, the committed steps
stay listed and restorable, and a later save works once there is space again.

Restoring onto another mesh: pass a `target` whose leaves carry the shardings
you want now (see `abstract_like`); orbax reads each shard's slice from the
stored global arrays, so the mesh used to save does not matter.

Typed PRNG keys (`jax.random.key`) are stored by orbax as their uint32 key
data plus the key implementation name, and come back as typed keys.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Sharding, SingleDeviceSharding

from dgpo_jax.errors import UserError
from dgpo_jax.learner.train_state import path_to_names

PyTree = Any

logger = logging.getLogger(__name__)

_STATE_ITEM = "state"
_METADATA_ITEM = "metadata"
_TRASH_SUBDIR = ".deleted"
# Names orbax gives to in-progress saves and to committed steps' marker file
# (orbax.checkpoint._src.path.atomicity_types); checked by tests/test_checkpoint.py.
_TMP_DIR_MARKER = ".orbax-checkpoint-tmp"
_COMMIT_FILE = "commit_success.txt"
_MAX_LISTED_MISMATCHES = 10
# After a failed save: how long to wait for orbax's writer threads of that save to end, and
# for the files of its temporary directory to stop changing before it is removed.
_FAILED_SAVE_JOIN_S = 60.0
_FAILED_SAVE_QUIET_S = 0.25
_FAILED_SAVE_SETTLE_S = 10.0


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """No committed checkpoint (or not the requested step) in the directory."""


class CheckpointMismatchError(UserError, ValueError):
    """The restore target's tree structure, shapes or dtypes differ from the checkpoint."""


class CheckpointSaveError(UserError, OSError):
    """Writing a checkpoint step failed part-way (disk full, quota, permissions, I/O error).

    ``errno`` is the OS error number when one is known (``errno.ENOSPC`` for a full disk);
    ``directory`` and ``step`` say which save failed. The committed steps are untouched.
    """

    hint = "free space on (or fix) the file system that holds the checkpoint directory"

    def __init__(self, message: str, *, directory: str, step: int, os_errno: int | None = None):
        super().__init__(message)
        self.errno = os_errno  # the message stays the text (strerror and filename are unset)
        self.directory = directory
        self.step = step


# How tensorstore (which writes the arrays, in C++) reports a failed file write, e.g.
#   ValueError: RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at ...: Failed
#   writing: "/ckpt/2.orbax-checkpoint-tmp/state.../d/63fd...": Failed to write 1857373 bytes
#   to file 14: No space left on device [os_error_code='28']
_TS_OS_ERROR = re.compile(r"os_error_code='?(\d+)")
_TS_FAILED_PATH = re.compile(r'Failed (?:writing|to write|to open|to create)[^"]*"([^"]+)"')


def _os_error_of(error: BaseException) -> tuple[int | None, str, str | None] | None:
    """(errno, description, file) if `error` (or what caused it) is a failed file operation:
    an OSError from Python-side writes, or a tensorstore error that carries an OS error code.
    None for anything else (a bug keeps its own exception)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            code = error.errno
            text = error.strerror or str(error)
            name = error.filename
            return code, text, None if name is None else os.fsdecode(name)
        message = str(error)
        match = _TS_OS_ERROR.search(message)
        if match:
            code = int(match.group(1))
            path = _TS_FAILED_PATH.search(message)
            return code, os.strerror(code), path.group(1) if path else None
        error = error.__cause__ or error.__context__
    return None


def abstract_like(tree: PyTree, shardings: PyTree | Sharding | None = None) -> PyTree:
    """A restore target: `jax.ShapeDtypeStruct` leaves with shardings.

    Args:
        tree: pytree of jax.Arrays or `jax.ShapeDtypeStruct` (e.g. a live
            TrainState, or `jax.eval_shape(init_fn)`).
        shardings: None to keep each leaf's own `.sharding`; one `Sharding`
            for every leaf; or a pytree of shardings with the structure of
            `tree`.

    Returns:
        The pytree with each leaf replaced by ShapeDtypeStruct(shape, dtype,
        sharding=...).
    """

    def to_abstract(path, leaf, sharding):
        sharding = sharding if sharding is not None else getattr(leaf, "sharding", None)
        if not isinstance(sharding, Sharding):
            raise ValueError(
                f"restore target leaf '{'/'.join(path_to_names(path))}' has no sharding "
                f"(got {type(leaf).__name__}); pass jax.Arrays, ShapeDtypeStructs with "
                "sharding=..., or shardings= to abstract_like"
            )
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    if shardings is None or isinstance(shardings, Sharding):
        return jax.tree_util.tree_map_with_path(lambda p, x: to_abstract(p, x, shardings), tree)
    return jax.tree_util.tree_map_with_path(to_abstract, tree, shardings)


def _check_json_roundtrip(value: Any, where: str = "metadata") -> None:
    """Raises ValueError unless `value` comes back from JSON exactly as it is.

    Allowed: dict with str keys, list, str, int, float (nan/inf included),
    bool, None. Tuples, non-str keys and NumPy scalars would change type or
    fail in JSON, so they are rejected with the path of the offending value.
    """
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"{where} has a non-str dict key {key!r} ({type(key).__name__}); JSON keys must be str"
                )
            _check_json_roundtrip(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_roundtrip(item, f"{where}[{index}]")
        return
    hint = " (use a list)" if isinstance(value, tuple) else ""
    hint = (
        " (convert with .item() or .tolist())"
        if isinstance(value, (np.generic, np.ndarray))
        else hint
    )
    raise ValueError(
        f"{where} is a {type(value).__name__}, which does not round-trip through JSON{hint}"
    )


def _physical_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype as stored: typed PRNG keys are stored as their uint32 key data."""
    if leaf.shape is None or leaf.dtype is None:  # orbax metadata of a non-array leaf
        return leaf.shape, leaf.dtype
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _array_nbytes(leaf: Any) -> int:
    """Bytes of one array leaf as stored (0 for leaves without a dtype)."""
    if getattr(leaf, "dtype", None) is None:
        return 0
    shape, dtype = _physical_shape_dtype(leaf)
    return math.prod(shape) * dtype.itemsize


def _is_array_metadata(node: Any) -> bool:
    return (
        hasattr(node, "shape")
        and hasattr(node, "dtype")
        and not isinstance(node, (dict, list, tuple))
    )


def _flat_shapes_dtypes(tree: PyTree, is_leaf=None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """'a/b/c' -> (stored shape, stored dtype) for every array leaf."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {"/".join(path_to_names(path)): _physical_shape_dtype(leaf) for path, leaf in flat}


def _check_target_matches(stored_tree: PyTree, abstract_target: PyTree, where: str) -> None:
    """Raises CheckpointMismatchError naming each key whose presence, shape or dtype differs."""
    stored = _flat_shapes_dtypes(stored_tree, is_leaf=_is_array_metadata)
    wanted = _flat_shapes_dtypes(abstract_target)
    problems = []
    for name in sorted(set(wanted) - set(stored)):
        problems.append(f"key '{name}' is in the target but not in the checkpoint")
    for name in sorted(set(stored) - set(wanted)):
        problems.append(f"key '{name}' is in the checkpoint but not in the target")
    for name in sorted(set(stored) & set(wanted)):
        (stored_shape, stored_dtype), (wanted_shape, wanted_dtype) = stored[name], wanted[name]
        if stored_shape != wanted_shape:
            problems.append(
                f"key '{name}' has shape {stored_shape} in the checkpoint but {wanted_shape} in the target"
            )
        elif stored_dtype != wanted_dtype:
            problems.append(
                f"key '{name}' has dtype {stored_dtype} in the checkpoint but {wanted_dtype} in the target"
            )
    if problems:
        more = len(problems) - _MAX_LISTED_MISMATCHES
        listed = problems[:_MAX_LISTED_MISMATCHES] + ([f"... and {more} more"] if more > 0 else [])
        raise CheckpointMismatchError(
            f"restore target does not match {where}:\n  " + "\n  ".join(listed)
        )


def _raised_in_orbax(error: BaseException) -> bool:
    """Whether `error` was raised in orbax's code (its traceback passes through orbax)."""
    traceback = error.__traceback__
    while traceback is not None:
        if f"{os.sep}orbax{os.sep}" in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


class _DropReportedWriteFailures(logging.Filter):
    """Drops the log records of a checkpoint write that failed on a file operation.

    When a save fails (a full disk), orbax logs each of its failed writer threads with the
    traceback (logger ``absl``) and asyncio logs the write tasks nobody awaited any more
    (``asyncio``: "Task exception was never retrieved"), dozens of tracebacks for a train state.
    `Checkpointer` reports that failure as one `CheckpointSaveError` line chained to the
    original exception (the traceback ``--debug`` shows), so these records only bury it.
    Records of other failures (bugs) are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info or record.exc_info[1] is None:
            return True
        error = record.exc_info[1]
        return not (_os_error_of(error) is not None and _raised_in_orbax(error))


for _name in ("absl", "asyncio"):
    logging.getLogger(_name).addFilter(_DropReportedWriteFailures())


def _is_closed_loop_error(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


@contextlib.contextmanager
def _closed_loop_reports_ignored():
    """When a save fails, tensorstore's writes still in flight complete and their callbacks find
    orbax's event loop closed: Python prints each "RuntimeError: Event loop is closed" with its
    traceback as an ignored exception (dozens for a train state). During orbax's save calls
    those, and only those, are dropped."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_closed_loop_error(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


def _join_orbax_threads(timeout_s: float) -> None:
    """Waits (up to `timeout_s` in all) for the threads orbax started to end.

    When one item of a save fails, orbax raises at once while the threads writing the other
    items (tensorstore array writes, metadata) run on; they would write into the temporary
    directory after it is removed, or into the next save's. Their own errors are already
    logged by orbax, so `threading.Thread.join` (which does not re-raise them) is used.
    Threads of another checkpointer's save in flight are waited for too (a delay, no harm).
    """
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is threading.current_thread() or not thread.is_alive():
            continue
        if type(thread).__module__.startswith("orbax."):
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("orbax thread %s still running after a failed save", thread.name)


def _tree_signature(path: str) -> tuple[int, int, int]:
    """(entries, bytes, newest mtime in ns) of a local directory tree; (0, 0, 0) if absent."""
    entries = size = newest = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:  # removed while walking
                continue
            entries += 1
            size += info.st_size
            newest = max(newest, info.st_mtime_ns)
    return entries, size, newest


def _remove_when_quiet(path: epath.Path) -> None:
    """Removes the temporary directory of a failed save once nothing writes into it.

    A failed item makes orbax give up on the writes of the others, but tensorstore finishes
    the writes it has in flight (in its own threads) and recreates the directories it
    needs: removed too early, the directory comes back, and tensorstore's cache would then
    hold files that are gone when the same step is saved again. So: remove it once its files
    have not changed for `_FAILED_SAVE_QUIET_S` (at most `_FAILED_SAVE_SETTLE_S`), and again
    if it reappears within that quiet time. Cloud paths are removed at once.
    """
    if "://" in str(path):
        _remove_tree(path)
        return
    deadline = time.monotonic() + _FAILED_SAVE_SETTLE_S
    for _ in range(2):  # before removing, and to catch a write landing just after
        last, quiet_since = _tree_signature(str(path)), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = _tree_signature(str(path))
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= _FAILED_SAVE_QUIET_S:
                break
        _remove_tree(path)


def _remove_tree(path: epath.Path) -> None:
    """Best-effort recursive delete of a local or cloud directory."""
    if not path.exists():
        return
    if "://" not in str(path):
        shutil.rmtree(str(path), ignore_errors=True)
        return
    try:
        path.rmtree()
    except OSError as e:  # a concurrent delete, or a permission problem: report, go on
        logger.warning("could not remove %s: %s", path, e)


class Checkpointer:
    """Numbered, atomic checkpoints of a state pytree plus a JSON metadata dict.

    Args:
        directory: where the steps live (created on the first save).
        max_to_keep: how many most recent steps to keep; None keeps all.
        save_interval_steps: `save` writes only when step % interval == 0
            (unless force=True).
        async_save: if True, `save` returns once the arrays are copied off
            the devices and the files are written in a background thread;
            call `wait_until_finished()` before relying on the step on disk.
            Donating the saved arrays after `save` returns is safe.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        directory = os.fspath(directory)
        # Local paths are made absolute; cloud paths orbax supports (gs://...) are kept as given.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._path = epath.Path(self.directory)
        self.max_to_keep = max_to_keep
        self.save_interval_steps = save_interval_steps
        self.async_save = async_save
        self._manager: ocp.CheckpointManager | None = None
        self._leftovers_removed = False
        self._pending_step: int | None = None  # a save started and not known to be committed

    # ----- orbax manager -----

    def _get_manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            policies = ocp.checkpoint_managers
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policies.LatestN(n=self.max_to_keep),  # None: keep all
                enable_async_checkpointing=self.async_save,
                todelete_subdir=_TRASH_SUBDIR,
                cleanup_tmp_directories=False,  # done by _remove_leftovers, by writers only
                create=True,
            )
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_names=(_STATE_ITEM, _METADATA_ITEM),
                item_handlers={
                    _STATE_ITEM: ocp.StandardCheckpointHandler(),
                    _METADATA_ITEM: ocp.JsonCheckpointHandler(),
                },
            )
        return self._manager

    def _remove_leftovers(self) -> None:
        """Deletes temporary dirs of interrupted saves and the pruning trash."""
        if jax.process_index() != 0 or not self._path.is_dir():
            return  # with several processes, process 0 cleans up
        for path in self._path.iterdir():
            if _TMP_DIR_MARKER in path.name or path.name == _TRASH_SUBDIR:
                logger.info("removing leftover of an interrupted save or prune: %s", path)
                _remove_tree(path)

    def _empty_trash(self) -> None:
        if jax.process_index() == 0:
            _remove_tree(self._path / _TRASH_SUBDIR)

    def _save_failed(self, error: Exception) -> None:
        """Cleans up after a save of `self._pending_step` that raised `error`, then raises:
        `CheckpointSaveError` for a failed file operation, `error` itself for anything else.

        The step's temporary directory is removed (its partial files would keep a full disk
        full) and the orbax manager is dropped, so the next save starts from what is on disk.
        """
        step, self._pending_step = self._pending_step, None
        manager, self._manager = self._manager, None
        with _closed_loop_reports_ignored():
            if manager is not None:
                try:
                    manager.close()
                except Exception as e:  # it may report the same failure again
                    logger.debug("closing the checkpoint manager after a failed save: %s", e)
            _join_orbax_threads(_FAILED_SAVE_JOIN_S)
            if step is not None and jax.process_index() == 0:
                _remove_when_quiet(self._path / f"{step}{_TMP_DIR_MARKER}")
        os_error = _os_error_of(error)
        if os_error is None:
            raise error
        code, text, name = os_error
        text = " ".join(text.split())  # one line
        symbol = f" {errno.errorcode[code]}" if code in errno.errorcode else ""
        cause = f"{text} (errno {code}{symbol})" if code is not None else text
        where = f" while writing {name}" if name else ""
        committed = self.all_steps()
        what = f"step {step}" if step is not None else "a step"
        if step is not None and step in committed:
            kept = f"step {step} was committed all the same"
        elif committed:
            kept = f"nothing of {what} is kept; the last committed step, {committed[-1]}, is intact"
        else:
            kept = f"nothing of {what} is kept (no step is committed yet)"
        raise CheckpointSaveError(
            f"could not save checkpoint {what} in {self.directory}: {cause}{where}; {kept}",
            directory=self.directory,
            step=step,
            os_errno=code,
        ) from error

    def _wait_for_pending_save(self) -> None:
        """Waits for the manager's save in flight; a failure raises as in `_save_failed`."""
        if self._manager is None:
            return
        try:
            with _closed_loop_reports_ignored():
                self._manager.wait_until_finished()
        except Exception as e:
            self._save_failed(e)
        self._pending_step = None

    # ----- listing -----

    def _step_dirs_on_disk(self) -> tuple[list[int], list[int]]:
        """(committed steps, incomplete steps), each sorted, read from disk."""
        committed, incomplete = [], []
        if not self._path.is_dir():
            return committed, incomplete
        for path in self._path.iterdir():
            if path.name.isdigit() and path.is_dir():
                is_committed = (path / _COMMIT_FILE).exists()
                (committed if is_committed else incomplete).append(int(path.name))
        return sorted(committed), sorted(incomplete)

    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending (a save still in flight is not listed)."""
        return self._step_dirs_on_disk()[0]

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _resolve_step(self, step: int | None) -> int:
        committed, incomplete = self._step_dirs_on_disk()
        if not committed:
            extra = f" (incomplete step directories ignored: {incomplete})" if incomplete else ""
            raise CheckpointNotFoundError(f"no checkpoint found in {self.directory}{extra}")
        if step is None:
            return committed[-1]
        if step not in committed:
            state = "is incomplete (an interrupted save)" if step in incomplete else "not found"
            raise CheckpointNotFoundError(
                f"checkpoint step {step} {state} in {self.directory}; available steps: {committed}"
            )
        return step

    # ----- save -----

    def save(
        self, step: int, state: PyTree, metadata: dict | None = None, force: bool = False
    ) -> bool:
        """Writes `state` and `metadata` as checkpoint `step`.

        Args:
            step: non-negative step number (the directory name).
            state: TrainState or any pytree of jax.Arrays / NumPy arrays.
            metadata: JSON-able dict (config, data-iterator state, ...);
                checked to round-trip exactly, else ValueError naming the
                offending entry.
            force: save even if `step` is not a multiple of save_interval_steps.

        Returns:
            True if a checkpoint was written (or, with async_save, started).

        Raises:
            CheckpointSaveError: writing the files failed (a full disk: errno ENOSPC); with
                async_save this can also be the previous save's failure. The committed steps
                are untouched and nothing of the failed step is kept (unless it was committed
                all the same, which the message then says).
            ValueError: a bad step or metadata, or a step not after the latest one.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
        _check_json_roundtrip(metadata)  # on every call, so bad metadata fails early
        if not force and step % self.save_interval_steps != 0:
            return False
        # orbax would wait too; the previous save may still be writing (async) or pruning
        self._wait_for_pending_save()
        manager = self._get_manager()
        latest = self.latest_step()
        if latest is not None and step <= latest:
            what = (
                "already exists"
                if step in self.all_steps()
                else f"is not after the latest step {latest}"
            )
            raise ValueError(
                f"checkpoint step {step} {what} in {self.directory}; steps must increase "
                "(to go back, delete the newer step directories or save to another directory)"
            )
        if not self._leftovers_removed:
            self._remove_leftovers()
            self._leftovers_removed = True
        else:
            self._empty_trash()
        start = time.perf_counter()
        self._pending_step = step
        try:
            with _closed_loop_reports_ignored():
                saved = manager.save(
                    step,
                    args=ocp.args.Composite(
                        **{
                            _STATE_ITEM: ocp.args.StandardSave(state),
                            _METADATA_ITEM: ocp.args.JsonSave(metadata),
                        }
                    ),
                    force=True,  # the interval was checked above; orbax skips step <= latest
                )
        except Exception as e:
            self._save_failed(e)  # raises
        if not self.async_save:
            self._pending_step = None
        if saved:
            num_bytes = sum(_array_nbytes(leaf) for leaf in jax.tree.leaves(state))
            verb = "started saving" if self.async_save else "saved"
            logger.info(
                "%s checkpoint step %d (%.1f MB) to %s in %.2f s",
                verb,
                step,
                num_bytes / 1e6,
                self.directory,
                time.perf_counter() - start,
            )
            if not self.async_save:
                self._empty_trash()
        return bool(saved)

    # ----- restore -----

    def _stored_tree(self, step: int) -> PyTree:
        """The stored state's structure, with orbax ArrayMetadata leaves (shape, dtype)."""
        item_metadata = self._get_manager().item_metadata(step)[_STATE_ITEM]
        return getattr(item_metadata, "tree", item_metadata)

    def _default_target(self, stored_tree: PyTree, step: int) -> PyTree:
        """The stored structure with every array placed on the default device."""
        device = SingleDeviceSharding(jax.devices()[0])

        def to_abstract(path, leaf):
            if leaf.shape is None or leaf.dtype is None:
                raise CheckpointMismatchError(
                    f"checkpoint step {step} in {self.directory}: leaf '{'/'.join(path_to_names(path))}' "
                    "has no shape/dtype metadata; pass a target to restore it"
                )
            return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=device)

        return jax.tree_util.tree_map_with_path(
            to_abstract, stored_tree, is_leaf=_is_array_metadata
        )

    def restore(self, step: int | None = None, target: PyTree | None = None) -> tuple[PyTree, dict]:
        """Reads checkpoint `step` (default: the latest committed one).

        Args:
            step: which step; None for the latest.
            target: the structure and placement wanted, as a pytree of
                `jax.ShapeDtypeStruct` with `.sharding` (see `abstract_like`)
                or of jax.Arrays whose shardings are used. Its mesh need not
                be the one the checkpoint was saved from. None restores every
                array onto `jax.devices()[0]` as nested dicts (optax
                namedtuples become lists, empty states become None).

        Returns:
            (state, metadata): state with the structure of `target`, every
            leaf with the target leaf's sharding; metadata as saved.

        Raises:
            CheckpointNotFoundError: empty/missing directory, or no such step.
            CheckpointMismatchError: tree keys, shapes or dtypes of `target`
                differ from the checkpoint (each mismatched key is named).
        """
        step = self._resolve_step(step)
        stored_tree = self._stored_tree(step)
        if target is None:
            abstract_target = self._default_target(stored_tree, step)
        else:
            abstract_target = abstract_like(target)
            _check_target_matches(
                stored_tree, abstract_target, f"checkpoint step {step} in {self.directory}"
            )
        start = time.perf_counter()
        restored = self._get_manager().restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE_ITEM: ocp.args.StandardRestore(abstract_target),
                    _METADATA_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        elapsed = time.perf_counter() - start
        logger.info("restored checkpoint step %d from %s in %.2f s", step, self.directory, elapsed)
        return restored[_STATE_ITEM], restored[_METADATA_ITEM]

    def restore_metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (default: latest) without reading any array."""
        step = self._resolve_step(step)
        restored = self._get_manager().restore(
            step, args=ocp.args.Composite(**{_METADATA_ITEM: ocp.args.JsonRestore()})
        )
        return restored[_METADATA_ITEM]

    # ----- lifecycle -----

    def wait_until_finished(self) -> None:
        """Blocks until an async save (and its pruning) is committed.

        Raises:
            CheckpointSaveError: the async save failed writing its files.
        """
        if self._manager is not None:
            self._wait_for_pending_save()
            if self._leftovers_removed:
                self._empty_trash()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads (also when the wait raises)."""
        if self._manager is not None:
            try:
                self.wait_until_finished()
            finally:
                if self._manager is not None:
                    self._manager.close()
                    self._manager = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
