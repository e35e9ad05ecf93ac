"""Training logs a person can read and plot: a progress line, JSON lines, TensorBoard, W&B.

    log = MetricsLogger(workdir, total_steps=1000, tensorboard=True, wandb_project=None)
    log.write(step, {"reward": 0.4, "em": 0.3}, tokens=12345)   # every step
    log.close()                                                  # flushes; plots the curves

* ``WORKDIR/metrics.jsonl``: one JSON object per write (``step``, ``time``, the metrics).
  Appended, so a resumed run continues the same file; steps re-run after a resume appear
  twice, and ``read_metrics`` keeps the last record of each step.
* ``WORKDIR/tensorboard/``: event files (tensorboardX), when installed and enabled.
* Weights & Biases when ``wandb_project`` is set and ``wandb`` is installed (else a warning).
* A progress line on stderr with the step, tokens/s and the ETA (tqdm).
* ``plot_curves``: a PNG of the reward, EM and KL curves (matplotlib, headless).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)


def _scalar(v: Any) -> float | None:
    try:
        f = float(np.asarray(v))
    except (TypeError, ValueError):
        return None
    return f


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
    ):
        if primary is None:  # several processes: only process 0 writes (the metrics agree)
            primary = jax.process_index() == 0
        self.primary = primary
        self.workdir = workdir
        self.path = os.path.join(workdir, f"{prefix}metrics.jsonl")
        if primary:
            os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path if primary else os.devnull, "a", buffering=1)
        self._tb = None
        if not primary:
            tensorboard, wandb_project, progress = False, None, False
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional logging dependency, loaded on use)

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", prefix.strip("_")))
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard event files")
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
        self._file.write(json.dumps(record) + "\n")
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

    def close(self, plot: bool = True) -> str | None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()
        if plot and self.primary:
            return plot_curves(
                self.path, os.path.join(self.workdir, os.path.basename(self.path) + ".png")
            )
        return None


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl, one per step (the last one written wins), sorted by step."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        lines = f.read().splitlines()
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
    """Plot every metric whose name contains a group's keyword; returns the PNG path."""
    if not os.path.exists(metrics_path):
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
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
