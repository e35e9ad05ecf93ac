"""Training logs a person can read and plot: a progress line, JSON lines, TensorBoard, W&B.

    log = MetricsLogger(workdir, total_steps=1000, tensorboard=True, wandb_project=None)
    log.write(step, {"reward": 0.4, "em": 0.3}, tokens=12345)   # every step
    log.close()                                                  # flushes; plots the curves

* ``WORKDIR/metrics.jsonl``: one JSON object per write (``step``, ``time``, the metrics).
  A resumed run continues the same file; steps re-run after a resume appear twice, and
  ``read_metrics`` keeps the last record of each step.
* ``WORKDIR/tensorboard/``: event files (tensorboardX), when installed and enabled.
* Weights & Biases when ``wandb_project`` is set and ``wandb`` is installed (else a warning).
* A progress line on stderr with the step, tokens/s and the ETA (tqdm).
* ``plot_curves``: a PNG of the reward, EM and KL curves (matplotlib, headless); ``close``
  writes ``WORKDIR/metrics.jsonl.png``.

Every file goes through ``etils.epath``, so ``WORKDIR`` can be local or on an object store
(``gs://``, ``s3://``, ``az://``), like the orbax checkpoints:

* Local: metrics.jsonl is appended to and flushed after every line; a line cut short by a
  killed run is dropped when the next logger opens the file. tensorboardX writes its event files
  itself (append, flushed every ``flush_secs``).
* Object store (no appends there): the whole metrics.jsonl is kept in memory (what an earlier
  run left included) and rewritten as one object at most every ``flush_secs`` seconds, on
  ``flush()`` and on ``close()``; each rewrite is atomic, and a killed run loses at most the
  last ``flush_secs`` of records (call ``flush()`` after a checkpoint so that none of its steps
  are lost). Each rewrite costs the file's size, which is small for scalar metrics. The event
  files take the same route: tensorboardX's writers for ``gs://``/``s3://`` (google-cloud-storage,
  boto3) are replaced by one that keeps the event file in memory and rewrites it whole through
  epath on each flush, as tensorboardX's own gs:// writer does.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from dgpo_jax.checkpoint.fileio import is_remote, write_bytes_atomically, write_text_atomically

log = logging.getLogger(__name__)


def _scalar(v: Any) -> float | None:
    try:
        f = float(np.asarray(v))
    except (TypeError, ValueError):
        return None
    return f


def _drop_cut_line(text: str) -> str:
    """``text`` without a last line that has no newline (cut short by a killed run)."""
    return text if not text or text.endswith("\n") else text[: text.rfind("\n") + 1]


def _last_byte(path: epath.Path) -> bytes:
    with path.open("rb") as handle:
        size = handle.seek(0, io.SEEK_END)
        if not size:
            return b""
        handle.seek(size - 1)
        return handle.read(1)


class _AppendSink:
    """Local metrics.jsonl: appended to, flushed after every line."""

    def __init__(self, path: epath.Path):
        if path.exists() and _last_byte(path) not in (b"", b"\n"):
            # a killed run's last line, cut short: the step is re-run, so the record goes
            log.warning("%s: dropping the last line, cut short by a killed run", path)
            write_text_atomically(path, _drop_cut_line(path.read_text()))
        self._file = path.open("a")

    def write(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _RewriteSink:
    """metrics.jsonl on an object store, which cannot append: the whole file is kept in memory
    and written as one object at most every ``flush_secs`` seconds, on `flush` and on
    `close`."""

    def __init__(self, path: epath.Path, flush_secs: float):
        self._path = path
        self._flush_secs = flush_secs
        self._text = io.StringIO()
        if path.exists():
            self._text.write(_drop_cut_line(path.read_text()))
        self._dirty = False
        self._last_flush = -math.inf  # the first record goes up at once: the file shows early

    def write(self, line: str) -> None:
        self._text.write(line)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self._flush_secs:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            write_text_atomically(self._path, self._text.getvalue())
            self._dirty = False
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()


class _EpathEventFile:
    """A tensorboardX record writer for object stores: the event file stays in memory and is
    rewritten whole through epath on each flush (tensorboardX flushes every ``flush_secs``)."""

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._buffer = io.BytesIO()
        self._written = -1

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if self._buffer.tell() != self._written:
            write_bytes_atomically(self._path, self._buffer.getvalue())
            self._written = self._buffer.tell()

    def close(self) -> None:
        self.flush()


class _EpathEventFileFactory:
    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _route_tensorboard_through_epath() -> None:
    """tensorboardX opens event files whose path starts with a registered ``scheme:`` through
    that scheme's writer factory; ours writes through epath, replacing tensorboardX's own gs://
    (google-cloud-storage) and s3:// (boto3) writers for the whole process."""
    from tensorboardX.record_writer import register_writer_factory  # noqa: PLC0415 (optional)

    for scheme in ("gs", "s3", "az"):
        register_writer_factory(scheme, _EpathEventFileFactory())


class MetricsLogger:
    """Writes scalar metrics to JSON lines, TensorBoard and (optionally) W&B, with progress."""

    def __init__(
        self,
        workdir: str,
        total_steps: int | None = None,
        start_step: int = 0,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        run_name: str | None = None,
        config: Mapping | None = None,
        progress: bool = True,
        prefix: str = "",
        primary: bool | None = None,
        flush_secs: float = 60.0,
    ):
        """``flush_secs``: on an object store, how often metrics.jsonl and the event files are
        rewritten (see the module docstring); locally, how often the event files are flushed."""
        if primary is None:  # several processes: only process 0 writes (the metrics agree)
            primary = jax.process_index() == 0
        self.primary = primary
        self.workdir = workdir
        self.remote = is_remote(workdir)
        self.path = str(epath.Path(workdir) / f"{prefix}metrics.jsonl")
        self._sink: _AppendSink | _RewriteSink | None = None
        if primary:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            path = epath.Path(self.path)
            self._sink = _RewriteSink(path, flush_secs) if self.remote else _AppendSink(path)
        self._tb = None
        if not primary:
            tensorboard, wandb_project, progress = False, None, False
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional logging dependency, loaded on use)
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard event files")
            else:
                if self.remote:
                    _route_tensorboard_through_epath()
                tb_dir = epath.Path(workdir) / "tensorboard" / prefix.strip("_")
                self._tb = SummaryWriter(str(tb_dir), flush_secs=flush_secs)
        self._wandb = None
        if wandb_project:
            try:
                import wandb  # noqa: PLC0415 (optional logging dependency, loaded on use)

                self._wandb = wandb.init(
                    project=wandb_project, name=run_name, config=dict(config or {}), resume="allow"
                )
            except ImportError:
                log.warning(
                    "wandb_project=%r but wandb is not installed: not logging to W&B", wandb_project
                )
        self._bar = None
        if progress and total_steps:
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=prefix.strip("_") or "train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )
        self._t0 = time.time()
        self._tokens = 0

    def write(self, step: int, metrics: Mapping[str, Any], tokens: int | None = None) -> None:
        """Record ``metrics`` at ``step``; ``tokens`` processed since the last write."""
        clean = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
        if tokens:
            self._tokens += tokens
            elapsed = max(time.time() - self._t0, 1e-9)
            clean.setdefault("tokens_per_s", self._tokens / elapsed)
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
        if self._sink is not None:
            self._sink.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._bar is not None:
            shown = {
                k: clean[k] for k in ("reward", "em", "loss", "kl", "tokens_per_s") if k in clean
            }
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self._bar.n = int(step)
            self._bar.refresh()

    def flush(self) -> None:
        """Everything written so far to metrics.jsonl and the event files (on an object store:
        uploaded now, whatever ``flush_secs`` says)."""
        if self._sink is not None:
            self._sink.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self, plot: bool = True) -> str | None:
        if self._sink is not None:
            self._sink.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()
        if plot and self.primary:
            return plot_curves(self.path, self.path + ".png")
        return None


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl, one per step (the last one written wins), sorted by step."""
    by_step: dict[int, dict] = {}
    lines = epath.Path(path).read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the last line of a killed run can be cut short
                continue
            raise ValueError(f"{path}: line {n} is not valid JSON") from None
        by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


PLOT_GROUPS = (
    ("reward", ("reward", "reward_mean", "train/reward")),
    ("exact match", ("em", "eval/em", "train/em")),
    ("KL", ("kl", "kl_k1", "kl_k3", "teacher_kl", "train/kl")),
)


def plot_curves(
    metrics_path: str, out_png: str, groups: Iterable[tuple[str, Iterable[str]]] = PLOT_GROUPS
) -> str | None:
    """Plot every metric whose name contains a group's keyword; returns the PNG path (local or
    an object store, written atomically)."""
    if not epath.Path(metrics_path).exists():
        return None
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib  # noqa: PLC0415 (optional logging dependency, loaded on use)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (optional logging dependency, loaded on use)

    groups = list(groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.6 * len(groups)), sharex=True)
    keys = sorted({k for r in records for k in r if k not in ("step", "time")})
    for ax, (title, names) in zip(np.atleast_1d(axes), groups):
        wanted = [
            k
            for k in keys
            if any(
                k == n or k.endswith("/" + n) or k.startswith(n + "_") or k.startswith(n)
                for n in names
            )
        ]
        for k in wanted:
            pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=k)
        ax.set_ylabel(title)
        if wanted:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[-1].set_xlabel("step")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomically(out_png, png.getvalue())
    return out_png
