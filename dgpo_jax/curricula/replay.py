"""DistiLLM's replay buffer of student-generated sequences.

Rows are stored trimmed of their right padding; a sampled batch is padded back (right, with
zeros: attention and loss masks 0) to its longest row. Per-token fields are the batch's 2-D
arrays, per-row fields its 1-D arrays; scalars are not stored. The buffer is saved next to each
checkpoint as an ``.npz`` (no pickles) so that a resumed run draws what an uninterrupted one
would. Files go through ``etils.epath`` (`dgpo_jax.checkpoint.fileio`), so the replay directory
can be local or on an object store (``gs://...``).
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterable

import numpy as np
from etils import epath

from dgpo_jax.checkpoint.fileio import write_bytes_atomically


class ReplayBuffer:
    """First in, first out, at most ``capacity`` rows; `sample` draws rows uniformly without
    replacement."""

    def __init__(self, capacity: int):
        if not (isinstance(capacity, int) and capacity >= 1):
            raise ValueError(f"replay buffer capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self.rows: deque[dict[str, np.ndarray]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, batch: dict) -> None:
        """Adds every row of ``batch`` (dropping the oldest rows beyond capacity)."""
        ids = np.asarray(batch["input_ids"])
        b, t = ids.shape
        am = np.asarray(batch["attention_mask"])
        for i in range(b):
            attended = np.flatnonzero(am[i])
            width = int(attended[-1]) + 1 if attended.size else 0
            row = {}
            for k, v in batch.items():
                v = np.asarray(v)
                if v.ndim == 2 and v.shape == (b, t):
                    row[k] = v[i, :width].copy()
                elif v.ndim == 1 and v.shape[0] == b:
                    row[k] = v[i].copy()
            self.rows.append(row)

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``min(n, len(self))`` rows, uniformly without replacement, as one right-padded batch."""
        if not self.rows:
            raise ValueError("sample from an empty replay buffer")
        idx = rng.choice(len(self.rows), size=min(n, len(self.rows)), replace=False)
        return _stack([self.rows[int(i)] for i in idx])

    # --- persistence ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Writes the rows, oldest first, to ``path`` (``.npz``, local or ``gs://...``)
        atomically."""
        arrays = {"capacity": np.int64(self.capacity), "count": np.int64(len(self.rows))}
        if self.rows:
            arrays.update({f"row_{k}": v for k, v in _stack(list(self.rows)).items()})
            arrays["widths"] = np.array([len(r["input_ids"]) for r in self.rows], np.int64)
        data = io.BytesIO()
        np.savez(data, **arrays)
        write_bytes_atomically(path, data.getvalue())

    @classmethod
    def load(cls, path: str) -> ReplayBuffer:
        data = io.BytesIO(epath.Path(path).read_bytes())
        with np.load(data, allow_pickle=False) as z:
            buf = cls(int(z["capacity"]))
            if int(z["count"]):
                widths = z["widths"]
                fields = {k[len("row_") :]: z[k] for k in z.files if k.startswith("row_")}
                for i, w in enumerate(widths):
                    buf.rows.append(
                        {
                            k: (v[i, :w].copy() if v.ndim == 2 else v[i].copy())
                            for k, v in fields.items()
                        }
                    )
        return buf


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for k, v0 in rows[0].items():
        if v0.ndim == 1:
            arr = np.zeros((len(rows), width), v0.dtype)
            for i, r in enumerate(rows):
                arr[i, : len(r[k])] = r[k]
        else:
            arr = np.stack([r[k] for r in rows])
        out[k] = arr
    return out


def _replay_name(step: int) -> str:
    return f"replay_{step}.npz"


def replay_path(replay_dir: str, step: int) -> str:
    """The buffer file that goes with checkpoint ``step``."""
    return str(epath.Path(replay_dir) / _replay_name(step))


def save_with_checkpoint(
    replay: ReplayBuffer, replay_dir: str, step: int, kept_steps: Iterable[int]
) -> None:
    """The buffer as of checkpoint ``step``; the files of checkpoints no longer kept go. Call it
    before the checkpoint is saved, so that a committed checkpoint always has its buffer."""
    directory = epath.Path(replay_dir)
    directory.mkdir(parents=True, exist_ok=True)
    replay.save(replay_path(replay_dir, step))
    keep = {_replay_name(s) for s in kept_steps} | {_replay_name(step)}
    for path in directory.iterdir():
        if path.name.startswith("replay_") and path.name.endswith(".npz") and path.name not in keep:
            path.unlink(missing_ok=True)


def load_for_checkpoint(replay_dir: str, step: int) -> ReplayBuffer:
    """The buffer saved with checkpoint ``step``; a missing file is an error (the run cannot
    continue with the data it had)."""
    path = replay_path(replay_dir, step)
    if not epath.Path(path).is_file():
        raise FileNotFoundError(
            f"resume: checkpoint {step} has no replay buffer {path!r}; the DistiLLM run cannot "
            "continue with the data it had"
        )
    return ReplayBuffer.load(path)
