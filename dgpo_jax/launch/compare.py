"""``mode=compare``: methods side by side over seeds, with confidence intervals.

    python -m dgpo_jax.launch --config=compare [--config.compare.seeds=0,1,2,3,4]

One synthetic world (``config.seed``'s: the same held-out questions for every row), then per
seed in ``compare.seeds``: a teacher, the student's KD cold start from it, and each method of
``compare.methods`` (objective presets) trained from that cold start, each evaluated greedily
on the held-out questions. These are the quickstart's stages (`dgpo_jax.launch.quickstart`),
sized by its ``quickstart.*`` fields. Writes

- ``WORKDIR/compare.json``: ``methods.<row>.<data_source or "all">`` = ``{"mean", "ci_low",
  "ci_high", "ci_method", "per_seed", "seeds", "questions_ci_low", "questions_ci_high"}``
  and
  ``paired_vs_coldstart.<row>`` = ``{"diff", "ci_low", "ci_high", "p_value", "test", "n",
  "discordant", "seeds"}`` (the statistics: `summarize_comparison`);
- ``WORKDIR/compare.md``: the same as a table; ``WORKDIR/compare.png``: bars with intervals.

They are written after every finished stage, over what is finished so far (``complete``
false, ``missing`` lists the stages still to run; each row over the seeds it has), so a run
stopped early leaves its partial table; ``python -m dgpo_jax.launch.compare WORKDIR`` writes
them from the records alone (`main`: records brought back from several machines, say).

Every finished stage writes its per-question results to ``WORKDIR/stages/``; with
``--config.resume=True`` a killed run continues at the first unfinished stage, and seeds or
methods added to the config are run on top of the finished ones (the other settings must not
change: the run checks them against ``WORKDIR/compare_config.json``).

The records travel without the checkpoints (``stages/`` and ``compare_config.json`` are small;
a seed's teacher and cold start are not), so a run can continue on another machine: a seed
with stages left whose teacher or cold start is missing there gets it trained again, and each
must have its record's fingerprint (the sha256 of its weights, `checkpoint_fingerprint`) before
anything is built on it; otherwise `NotReproducedError` (the two machines' numerics differ:
finish that seed where it started).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import time

import numpy as np

from dgpo_jax.checkpoint.fileio import write_bytes_atomically, write_text_atomically
from dgpo_jax.checkpoint.params import checkpoint_fingerprint
from dgpo_jax.config import ConfigError, base_config, split_list
from dgpo_jax.errors import NotReproducedError, OutputExistsError
from dgpo_jax.evaluation.stats import bootstrap_mean_ci, paired_difference, t_interval
from dgpo_jax.launch.evaluate import run_eval
from dgpo_jax.launch.quickstart import (
    coldstart_stage,
    prepare_world,
    question_scores,
    rl_stage,
    stage_config,
    teacher_stage,
)

log = logging.getLogger(__name__)

TEACHER, COLDSTART = "teacher", "coldstart"
# Settings that may change between a run and its resume: where things go, what is added on top,
# how the intervals are computed from the stored results.
_RESUMABLE_CHANGES = (
    "resume",
    "workdir",
    "compare.seeds",
    "compare.methods",
    "compare.level",
    "compare.resamples",
    "logging",
)


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fingerprint(cfg) -> dict[str, object]:
    flat = _flatten(cfg.to_dict())
    return {
        k: v
        for k, v in flat.items()
        if not any(k == r or k.startswith(r + ".") for r in _RESUMABLE_CHANGES)
    }


class StageStore:
    """The finished stages of a compare run: one JSON file per (seed, stage) in
    ``WORKDIR/stages/``, written atomically after the stage's evaluation."""

    def __init__(self, workdir: str, cfg):
        self.dir = os.path.join(workdir, "stages")
        settings = os.path.join(workdir, "compare_config.json")
        now = _fingerprint(cfg)
        if os.path.isdir(self.dir) and os.listdir(self.dir):
            if not cfg.resume:
                raise OutputExistsError(
                    f"{workdir} holds the finished stages of an earlier compare run",
                    hint="--config.resume=True continues it (and adds new seeds or methods); "
                    "another --config.workdir starts afresh",
                )
            if os.path.isfile(settings):
                with open(settings) as f:
                    before = json.load(f)
                # A setting added to the schema since that run, at its default, is no change.
                default = _flatten(base_config().to_dict())
                changed = sorted(
                    k for k in set(before) | set(now) if before.get(k, default.get(k)) != now.get(k)
                )
                if changed:
                    shown = ", ".join(
                        f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5]
                    )
                    raise ConfigError(
                        f"config.resume: the settings differ from the run in {workdir} "
                        f"({shown}{', ...' if len(changed) > 5 else ''}); only "
                        "compare.seeds, compare.methods, compare.level and compare.resamples "
                        "may change on a resume"
                    )
        os.makedirs(self.dir, exist_ok=True)
        write_text_atomically(settings, json.dumps(now, indent=1, sort_keys=True, default=str))

    @classmethod
    def reader(cls, workdir: str) -> StageStore:
        """The records in ``workdir`` as they are, to read: no settings checked or written."""
        store = cls.__new__(cls)
        store.dir = os.path.join(workdir, "stages")
        return store

    def finished(self) -> dict[str, list[int]]:
        """``{stage: [seeds]}`` of the records here."""
        out: dict[str, list[int]] = {}
        for name in sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else ():
            m = re.fullmatch(r"seed(\d+)_(.+)\.json", name)
            if m:
                out.setdefault(m.group(2), []).append(int(m.group(1)))
        return {stage: sorted(seeds) for stage, seeds in out.items()}

    def path(self, seed: int, stage: str) -> str:
        return os.path.join(self.dir, f"seed{seed}_{stage}.json")

    def get(self, seed: int, stage: str) -> dict | None:
        p = self.path(seed, stage)
        if not os.path.isfile(p):
            return None
        with open(p) as f:
            return json.load(f)

    def put(self, seed: int, stage: str, record: dict) -> None:
        write_text_atomically(self.path(seed, stage), json.dumps(record))


def _record(final_eval: dict, seconds: float, **extra) -> dict:
    return {"scores": question_scores(final_eval), "seconds": round(seconds, 1), **extra}


class Progress:
    """``[k/N] seed S stage`` lines with the time so far and an ETA from the stages done
    (per kind of stage: teacher, cold start, each method)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()
        self.seconds: dict[str, list[float]] = {}

    def finished(self, kind: str, seconds: float, skipped: bool = False) -> None:
        self.done += 1
        if not skipped:
            self.seconds.setdefault(kind, []).append(seconds)

    def eta(self, remaining_kinds: list[str]) -> float | None:
        every = [s for v in self.seconds.values() for s in v]
        if not every:
            return None
        fallback = float(np.mean(every))
        return sum(float(np.mean(self.seconds.get(k, [fallback]))) for k in remaining_kinds)

    def announce(self, seed: int, stage: str, remaining_kinds: list[str]) -> None:
        eta = self.eta(remaining_kinds)
        elapsed = time.time() - self.start
        eta_text = f", ETA {eta / 60:.1f} min" if eta is not None else ""
        print(
            f"\n=== compare [{self.done + 1}/{self.total}] seed {seed}: {stage} "
            f"(elapsed {elapsed / 60:.1f} min{eta_text})",
            flush=True,
        )


def run_compare(cfg) -> dict:
    seeds = [int(s) for s in split_list(cfg.compare.seeds)]
    methods = split_list(cfg.compare.methods)
    store = StageStore(cfg.workdir, cfg)
    print(f"\n=== compare: world (seed {cfg.seed}), {len(seeds)} seeds, methods {methods}")
    prep = prepare_world(cfg)
    base = prep.base
    rows = [TEACHER, COLDSTART, *methods]
    plan = [(s, st) for s in seeds for st in rows]
    progress = Progress(len(plan))
    for i, (seed, stage) in enumerate(plan):
        kinds_left = [st for s, st in plan[i:] if store.get(s, st) is None]
        if store.get(seed, stage) is not None:
            progress.finished(stage, 0.0, skipped=True)
            continue
        progress.announce(seed, stage, kinds_left)
        t = time.time()
        sdir = f"seed{seed}"
        teacher_dir = os.path.join(cfg.workdir, sdir, "teacher")
        if stage == TEACHER:
            info = teacher_stage(prep, seed, teacher_dir, os.path.join(cfg.workdir, sdir))
            ev = run_eval(_eval_cfg(base, f"{sdir}/eval_teacher", teacher_dir, seed))
            record = _record(
                ev["final_eval"],
                time.time() - t,
                teacher=info,
                fingerprint=checkpoint_fingerprint(teacher_dir),
            )
        elif stage == COLDSTART:
            seed_teacher(store, prep, cfg.workdir, seed)  # trained again if this machine lacks it
            cs = coldstart_stage(base, f"{sdir}/coldstart", teacher_dir, seed)
            record = _record(
                cs["final_eval"],
                time.time() - t,
                # absolute: a resume may start from another directory than a relative
                # --config.workdir was given from; relative to the workdir: for another machine
                checkpoint=os.path.abspath(cs["checkpoint"]),
                checkpoint_in_workdir=os.path.relpath(cs["checkpoint"], cfg.workdir),
                num_sequences=cs["num_sequences"],
                coldstart=cs["rounds"],
                fingerprint=checkpoint_fingerprint(cs["checkpoint"]),
            )
        else:
            student = seed_checkpoints(store, prep, cfg.workdir, seed)
            rl = rl_stage(base, f"{sdir}/{stage}", stage, student, teacher_dir, seed)
            record = _record(rl["final_eval"], time.time() - t)
        store.put(seed, stage, record)
        progress.finished(stage, record["seconds"])
        em = np.mean(record["scores"]["all"])
        print(f"seed {seed} {stage}: EM {em:.3f} ({record['seconds']:.0f} s)", flush=True)
        if any(store.get(s, st) is None for s, st in plan[i + 1 :]):
            # what is finished so far, for a run stopped before the end (at most 2000
            # resamples: 7 rows x 3 seeds x 1000 questions took 1.2 s on a 2-core AMD EPYC,
            # against 6.4 s at 10000; the end's table uses compare.resamples)
            resamples = min(cfg.compare.resamples, 2000)
            partial = comparison_from_records(
                store, rows, seeds, cfg.compare.level, resamples, cfg.seed
            )
            write_comparison(cfg.workdir, partial)

    result = comparison_from_records(
        store, rows, seeds, cfg.compare.level, cfg.compare.resamples, cfg.seed
    )
    md = write_comparison(cfg.workdir, result)
    print("\n" + md)
    print(f"results: {os.path.join(cfg.workdir, 'compare.json')}, compare.md, compare.png")
    return result


def comparison_from_records(
    store: StageStore,
    rows: list[str],
    seeds: list[int],
    level: float,
    resamples: int,
    world_seed: int,
) -> dict | None:
    """`summarize_comparison` of whatever of ``rows`` x ``seeds`` the records in ``store``
    hold (each row over the seeds it has finished), with ``complete``, ``missing`` (the
    unfinished ``seed<S>_<row>``), each stage's ``seconds`` and the teacher's and cold start's
    rounds; None while nothing is finished."""
    done = {r: {s: store.get(s, r) for s in seeds} for r in rows}
    done = {r: {s: rec for s, rec in v.items() if rec is not None} for r, v in done.items()}
    done = {r: v for r, v in done.items() if v}
    if not done:
        return None
    scores = {r: {s: rec["scores"] for s, rec in v.items()} for r, v in done.items()}
    result = summarize_comparison(scores, COLDSTART, level, resamples, world_seed)
    missing = [f"seed{s}_{r}" for s in seeds for r in rows if s not in done.get(r, {})]
    result["complete"] = not missing
    result["missing"] = missing
    result["seconds"] = {
        r: {str(s): rec["seconds"] for s, rec in v.items()} for r, v in done.items()
    }
    for key, stage in (("teacher_rounds", TEACHER), ("coldstart_rounds", COLDSTART)):
        result[key] = {str(s): rec.get(stage) for s, rec in done.get(stage, {}).items()}
    result["world_seed"] = world_seed
    return result


def write_comparison(workdir: str, result: dict | None) -> str:
    """``compare.json``, ``compare.md`` and ``compare.png`` in ``workdir`` (atomically);
    returns the markdown ("" and nothing written for None)."""
    if result is None:
        return ""
    write_text_atomically(os.path.join(workdir, "compare.json"), json.dumps(result, indent=1))
    md = markdown(result)
    write_text_atomically(os.path.join(workdir, "compare.md"), md)
    plot(result, os.path.join(workdir, "compare.png"))
    return md


def _checked(store: StageStore, seed: int, stage: str, path: str, rebuild) -> str:
    """``path``, the checkpoint of ``seed``'s finished ``stage``, after checking it against the
    fingerprint its record holds; where this machine lacks it, ``rebuild()`` trains it again
    (returning its path) first. Raises `NotReproducedError` on a difference, or when a missing
    checkpoint's record has no fingerprint to check a new one against (a record from before
    fingerprints is used unchecked where its checkpoint is)."""
    record = store.get(seed, stage)
    before = record.get("fingerprint")
    rebuilt = not os.path.isdir(path)
    if rebuilt:
        if before is None:
            raise NotReproducedError(
                f"compare: seed {seed}'s {stage} is not in {path} and its record "
                f"({store.path(seed, stage)}) has no fingerprint to check a new one against",
                hint=f"finish seed {seed} on the machine that started it, or delete its "
                f"records ({os.path.join(store.dir, f'seed{seed}_*.json')}) to start it afresh",
            )
        print(
            f"seed {seed}: the {stage} is not in {path} (the run began on another machine): "
            "training it again, to be checked against its record's fingerprint",
            flush=True,
        )
        path = rebuild()
    now = checkpoint_fingerprint(path) if before else None
    if now != before:
        raise NotReproducedError(
            f"compare: seed {seed}'s {stage} in {path} differs from the recorded one "
            f"(fingerprint {now[:12]} against {before[:12]}, {store.path(seed, stage)}): "
            "what starts from it would not start from the same weights",
            hint=f"finish seed {seed} on the machine that started it (on GPUs, the same XLA "
            "flags, --xla_gpu_deterministic_ops=true, and the same autotuning results make a "
            "rerun repeat bit for bit: docs/gpu.md)",
        )
    if rebuilt:
        print(f"seed {seed}: the {stage} reproduced bit for bit", flush=True)
    return path


def _rounds_done(record: dict, key: str) -> int | None:
    """How many training rounds (cycles) a stage's record says it ran, for a rebuild to replay
    without their checks; None for a record from before rounds were recorded (the rebuild then
    checks again, which gives the same rounds)."""
    info = record.get(key)
    rounds = info.get("rounds") if isinstance(info, dict) else info
    return len(rounds) if rounds else None


def seed_teacher(store: StageStore, prep, workdir: str, seed: int) -> str:
    """``WORKDIR/seed<seed>/teacher``, checked against its record (`_checked`); trained again
    by the teacher stage where this machine lacks it (the recorded number of cycles, without
    their checks: only the weights are wanted, and the fingerprint checks them)."""
    sdir = os.path.join(workdir, f"seed{seed}")
    teacher_dir = os.path.join(sdir, "teacher")

    def rebuild() -> str:
        cycles = _rounds_done(store.get(seed, TEACHER), "teacher")
        teacher_stage(prep, seed, teacher_dir, sdir, cycles_done=cycles)
        return teacher_dir

    return _checked(store, seed, TEACHER, teacher_dir, rebuild)


def seed_checkpoints(store: StageStore, prep, workdir: str, seed: int) -> str:
    """The cold-start checkpoint a method of ``seed`` starts from, and the seed's teacher in
    ``WORKDIR/seed<seed>/teacher``, each checked against its record (`_checked`); where this
    machine lacks them (the run began elsewhere: the records came without them), trained again
    by their stages first (the recorded rounds, without their checks and evaluations)."""
    teacher_dir = seed_teacher(store, prep, workdir, seed)
    cold = store.get(seed, COLDSTART)
    student = (
        os.path.join(workdir, cold["checkpoint_in_workdir"])
        if "checkpoint_in_workdir" in cold
        else cold["checkpoint"]
    )

    def rebuild() -> str:  # the recorded rounds, without their checks and evaluations
        rounds = _rounds_done(cold, "coldstart")
        name = f"seed{seed}/coldstart"
        return coldstart_stage(prep.base, name, teacher_dir, seed, rounds)["checkpoint"]

    return os.path.abspath(_checked(store, seed, COLDSTART, student, rebuild))


def _eval_cfg(base, name: str, model: str, seed: int):
    return stage_config(base, name, **{"model.student": model, "seed": seed})


# ----------------------------------------------------------------------------- statistics ---
def summarize_comparison(
    scores: dict[str, dict[int, dict[str, list[float]]]],
    reference: str,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """The comparison from per-question scores ``scores[row][seed][data_source]``.

    Per row and data source: the mean over seeds of the per-seed EM; its interval is a Student
    t interval across seeds (the seed-to-seed spread: teacher, cold start and RL all differ by
    seed), or with one seed a percentile bootstrap over questions; ``questions_ci_*`` is the
    bootstrap over questions within seeds (the spread from the finite question set alone).
    Per row against ``reference`` (the cold start): the mean paired difference over every
    (seed, question), a percentile bootstrap over questions within seeds, and an exact McNemar
    p-value on the pooled discordant pairs (a sign-flip permutation test for non-binary
    scores). Every interval is at ``level``.

    A row may lack seeds (a comparison still running): it is summarised over the seeds it has
    (``seeds`` in each of its cells; one seed: the question bootstrap), and its paired
    difference over the seeds it shares with ``reference`` (none shared, or no reference yet:
    no paired entry). ``seeds`` of the result: every seed of any row.
    """
    all_seeds = sorted({s for per_seed in scores.values() for s in per_seed})
    sources = list(next(iter(next(iter(scores.values())).values())))
    methods: dict[str, dict] = {}
    for row, per_seed in scores.items():
        methods[row] = {}
        seeds = sorted(per_seed)
        for src in sources:
            vals = [per_seed[s][src] for s in seeds]
            seed_means = [float(np.mean(v)) for v in vals]
            flat = np.concatenate([np.asarray(v, float) for v in vals])
            groups = np.repeat(np.arange(len(vals)), [len(v) for v in vals])
            q = bootstrap_mean_ci(flat, level=level, resamples=resamples, seed=seed, groups=groups)
            if len(seeds) > 1:
                t = t_interval(seed_means, level=level)
                low, high, how = t.low, t.high, f"t interval over {len(seeds)} seeds"
            else:
                low, high, how = q.low, q.high, "bootstrap over questions (one seed)"
            methods[row][src] = {
                "mean": float(np.mean(seed_means)),
                "ci_low": low,
                "ci_high": high,
                "ci_method": how,
                "per_seed": seed_means,
                "seeds": seeds,
                "questions_ci_low": q.low,
                "questions_ci_high": q.high,
            }
    paired = {}
    ref = scores.get(reference, {})
    for row, per_seed in scores.items():
        seeds = sorted(set(per_seed) & set(ref))
        if row == reference or not seeds:
            continue
        a = np.concatenate([np.asarray(per_seed[s]["all"], float) for s in seeds])
        b = np.concatenate([np.asarray(ref[s]["all"], float) for s in seeds])
        groups = np.repeat(np.arange(len(seeds)), [len(ref[s]["all"]) for s in seeds])
        d = paired_difference(a, b, groups=groups, level=level, resamples=resamples, seed=seed)
        paired[row] = {
            "diff": d.diff,
            "ci_low": d.low,
            "ci_high": d.high,
            "p_value": d.p_value,
            "test": d.test,
            "n": d.n,
            "discordant": list(d.discordant) if d.discordant is not None else None,
            "seeds": seeds,
        }
    return {
        "seeds": all_seeds,
        "level": level,
        "resamples": resamples,
        "reference": reference,
        "methods": methods,
        "paired_vs_coldstart": paired,
        "statistics": (
            f"per row: mean over seeds of the per-seed EM; ci: Student t over seeds (one "
            f"seed: percentile bootstrap over questions); questions_ci: percentile bootstrap "
            f"over questions within seeds ({resamples} resamples); paired_vs_coldstart: "
            f"paired percentile bootstrap over (seed, question) pairs within seeds and an "
            f"exact McNemar test on the pooled discordant pairs; level {level}"
        ),
    }


def markdown(result: dict) -> str:
    """compare.json as a table: ``mean [low, high]`` per row and data source, and the paired
    difference to the cold start."""
    methods, paired = result["methods"], result["paired_vs_coldstart"]
    sources = [s for s in next(iter(methods.values())) if s != "all"] + ["all"]
    pct = round(100 * result["level"])
    head = ["method", *sources, f"vs {result['reference']} (paired, {pct}% CI, p)"]
    lines = [
        f"EM on held-out questions (greedy), seeds {result['seeds']}; mean over seeds [{pct}% CI]",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    if result.get("complete") is False:
        lines[:0] = [
            f"**Partial comparison** (still to run: {', '.join(result['missing'])}): each row "
            "over the seeds it has finished, shown where fewer than all; each paired "
            "difference over the seeds the row shares with the reference.",
            "",
        ]
    for row, per in methods.items():
        seeds = per["all"].get("seeds", result["seeds"])
        label = row if seeds == result["seeds"] else f"{row} (seeds {', '.join(map(str, seeds))})"
        cells = [
            f"{per[s]['mean']:.3f} [{per[s]['ci_low']:.3f}, {per[s]['ci_high']:.3f}]"
            for s in sources
        ]
        d = paired.get(row)
        vs = (
            f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p = {d['p_value']:.2g}"
            if d
            else "–"
        )
        if d and d.get("seeds", seeds) != seeds:
            vs += f" (seeds {', '.join(map(str, d['seeds']))})"
        lines.append("| " + " | ".join([label, *cells, vs]) + " |")
    lines += ["", result["statistics"], ""]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Bars of each row's EM on all held-out questions with its interval, and the per-seed
    values as dots."""
    import matplotlib  # noqa: PLC0415 (plotting only here)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = list(result["methods"])
    allq = [result["methods"][r]["all"] for r in rows]
    means = np.array([a["mean"] for a in allq])
    low = np.array([a["ci_low"] for a in allq])
    high = np.array([a["ci_high"] for a in allq])
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.6))
    x = np.arange(len(rows))
    ok = np.isfinite(low) & np.isfinite(high)
    ax.bar(x, means, color="#8fb3d9", width=0.6)
    ax.errorbar(
        x[ok],
        means[ok],
        yerr=[means[ok] - low[ok], high[ok] - means[ok]],
        fmt="none",
        ecolor="black",
        capsize=4,
    )
    for i, a in enumerate(allq):
        ax.plot([i] * len(a["per_seed"]), a["per_seed"], "k.", alpha=0.6)
    ax.set_xticks(x, rows)
    ax.set_ylabel("EM, held-out questions")
    ax.set_ylim(0, 1)
    pct = round(100 * result["level"])
    partial = " (partial: compare.md)" if result.get("complete") is False else ""
    ax.set_title(f"mean over seeds {result['seeds']}, {pct}% CI; dots: seeds{partial}", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomically(path, png.getvalue())


# -------------------------------------------------------------------------- command line ---
def main(argv: list[str] | None = None) -> int:
    """``python -m dgpo_jax.launch.compare WORKDIR``: the comparison of the stage records in
    ``WORKDIR/stages/`` as they are (a run still going, or records brought back from machines
    that each ran part of it), written to ``WORKDIR/compare.{json,md,png}``. Trains nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m dgpo_jax.launch.compare",
        description="Summarise a compare run's finished stages (WORKDIR/stages/) with their "
        "confidence intervals; rows with fewer seeds than others are marked. Trains nothing.",
    )
    parser.add_argument("workdir", help="a compare run's --config.workdir")
    parser.add_argument("--level", type=float, default=0.95, help="interval level (0.95)")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    if not 0.0 < args.level < 1.0:
        parser.error(f"--level {args.level}: expected a level in (0, 1)")
    if args.resamples < 1:
        parser.error(f"--resamples {args.resamples}: expected >= 1")
    store = StageStore.reader(args.workdir)
    finished = store.finished()
    if not finished:
        print(f"compare: no stage records (seed<S>_<stage>.json) in {store.dir}", file=sys.stderr)
        return 2
    rows = [r for r in (TEACHER, COLDSTART) if r in finished]
    rows += sorted(r for r in finished if r not in (TEACHER, COLDSTART))
    seeds = sorted({s for v in finished.values() for s in v})
    world_seed = 0
    settings_file = os.path.join(args.workdir, "compare_config.json")
    if os.path.isfile(settings_file):
        with open(settings_file) as f:
            world_seed = int(json.load(f).get("seed", 0))
    result = comparison_from_records(store, rows, seeds, args.level, args.resamples, world_seed)
    print(write_comparison(args.workdir, result))
    print(f"results: {os.path.join(args.workdir, 'compare.json')}, compare.md, compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
