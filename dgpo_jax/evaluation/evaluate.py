"""Evaluation: roll out on test questions, EM per data source (greedy and sampled, labelled),
the ARCap diagnostics, written as JSON and a markdown table."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from etils import epath

from dgpo_jax.checkpoint.fileio import write_text_atomically
from dgpo_jax.data.prompts import encode_prompt, fit_prompts
from dgpo_jax.data.search_r1 import QARecord
from dgpo_jax.evaluation import TrajectoryRecord, arcap_summary, greedy_vs_sampled
from dgpo_jax.learner.batches import score_rollout
from dgpo_jax.models import cast_params
from dgpo_jax.sampler import Sampler

log = logging.getLogger(__name__)


def rollout_records(
    sampler,
    params,
    records: Sequence[QARecord],
    tokenizer,
    batch_size: int,
    seed: int = 0,
    use_chat_template: bool = True,
    truncation: str = "error",
    **generate_kw,
):
    """Roll out every record in batches; returns (scored rollouts per batch, records).

    Prompts longer than the sampler's ``max_prompt_length``: ``truncation`` ``error`` raises a
    `DataError` naming the row, ``left`` keeps their last tokens, ``drop`` keeps the row, which
    finishes as ``prompt_too_long`` without a token (scored wrong, counted in its results):
    an evaluation does not change its set of questions."""
    out = []
    limit = sampler.config.max_prompt_length
    for start in range(0, len(records), batch_size):
        chunk = list(records[start : start + batch_size])
        prompts = [encode_prompt(r, tokenizer, use_chat_template) for r in chunk]
        if truncation != "drop":
            prompts, _ = fit_prompts(prompts, chunk, limit, truncation)
        rollout = sampler.generate(
            params,
            prompts,
            seed=seed + start,
            row_ids=list(range(start, start + len(chunk))),
            **generate_kw,
        )
        out.append((score_rollout(rollout, chunk, tokenizer), chunk))
    return out


def _question(prompt: str) -> str:
    """The text after the prompt's last "Question:" (both templates end with it), else the
    prompt's last non-empty line."""
    head, marker, tail = prompt.rpartition("Question:")
    if marker:
        return tail.strip()
    lines = [line for line in prompt.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def evaluate(
    model_config,
    params,
    records: Sequence[QARecord],
    tokenizer,
    retriever,
    sampler_configs: dict[str, Any],
    batch_size: int,
    seed: int = 0,
    plan=None,
    use_chat_template: bool = True,
    num_samples: int = 8,
    sampled_repeats: int = 1,
    dtype=None,
    truncation: str = "error",
) -> dict[str, dict]:
    """``sampler_configs``: {"greedy": SamplerConfig, "sampled": SamplerConfig, ...}.

    Returns {decoding: {data_source: {em, em_without_think, hit_ratio, search_calls,
    search_share, count}}} plus, per decoding, ``"_seconds"``, ``"_samples"``: the first
    ``num_samples`` trajectories per data source (question, response, golds, EM), to read what
    the model does, and ``"_predictions"``: one row per question and draw (its position in
    ``records`` as ``index``, ``sample``, source, the file's split and index, the question
    (`_question`), golds, extracted answer, EM, searches), which `write_results` puts in a
    JSON-lines file of its own.

    A sampling decoding draws ``sampled_repeats`` trajectories per question (new keys each
    draw); its metrics average over all draws (``count`` counts draws). When a greedy decoding
    is evaluated too, each sampling decoding also gets ``"_vs_greedy"``:
    `greedy_vs_sampled` per data source (pass@k, sampled EM where greedy is right / wrong).

    ``dtype``: the compute dtype; float32 master weights are cast to it once, before decoding.
    ``truncation``: over-long prompts, as in `rollout_records`.
    """
    if not (isinstance(sampled_repeats, int) and sampled_repeats >= 1):
        raise ValueError(f"sampled_repeats must be an int >= 1, got {sampled_repeats!r}")
    if dtype is not None:
        params = cast_params(params, dtype)
    results: dict[str, dict] = {}
    for name, scfg in sampler_configs.items():
        t = time.time()
        sampler = Sampler(model_config, scfg, tokenizer, retriever, plan=plan)
        trajs, samples, shown, predictions = [], [], {}, []
        draws = 1 if scfg.greedy else sampled_repeats
        for draw in range(draws):
            # Draw d's batch at record offset `start` gets seed + d * len(records) + start:
            # distinct keys for every (draw, batch); draw 0 keeps the single-draw seeds.
            for scored, chunk in rollout_records(
                sampler,
                params,
                records,
                tokenizer,
                batch_size,
                seed + draw * len(records),
                use_chat_template,
                truncation,
            ):
                for i, rec in enumerate(chunk):
                    trajs.append(
                        TrajectoryRecord(
                            rec.data_source,
                            scored.responses[i],
                            rec.golds,
                            int(scored.num_searches[i]),
                        )
                    )
                    predictions.append(
                        {
                            "index": len(predictions) - draw * len(records),
                            "sample": draw,
                            "data_source": rec.data_source,
                            "split": rec.split,
                            "row_index": rec.index,
                            "question": _question(rec.user_content),
                            "golds": list(rec.golds),
                            "answer": scored.answers[i],
                            "em": float(scored.rewards[i]),
                            "searches": int(scored.num_searches[i]),
                        }
                    )
                    if shown.get(rec.data_source, 0) < num_samples:
                        shown[rec.data_source] = shown.get(rec.data_source, 0) + 1
                        samples.append(
                            {
                                "data_source": rec.data_source,
                                "prompt": rec.user_content[-300:],
                                "golds": list(rec.golds),
                                "response": scored.responses[i],
                                "em": float(scored.rewards[i]),
                            }
                        )
        results[name] = arcap_summary(trajs)
        results[name]["_seconds"] = round(time.time() - t, 2)
        results[name]["_samples"] = samples
        results[name]["_predictions"] = predictions
        log.info(
            "eval %s: EM %.3f over %d trajectories (%.1fs)",
            name,
            results[name]["all"]["em"],
            len(trajs),
            results[name]["_seconds"],
        )
    greedy = [n for n, c in sampler_configs.items() if c.greedy]
    for name, scfg in sampler_configs.items():
        if greedy and not scfg.greedy:
            results[name]["_vs_greedy"] = greedy_vs_sampled(
                results[greedy[0]]["_predictions"], results[name]["_predictions"]
            )
    return results


def markdown_table(results: dict[str, dict], title: str = "") -> str:
    """One row per (decoding, data source)."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| decoding | data source | EM | EM w/o think | hit ratio | searches | search share "
        "| search tags | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for decoding, per_source in results.items():
        for source, m in per_source.items():
            if source.startswith("_"):
                continue
            lines.append(
                f"| {decoding} | {source} | {m['em']:.3f} | {m['em_without_think']:.3f} "
                f"| {m['hit_ratio']:.3f} | {m['search_calls']:.2f} | "
                f"{m['search_share']:.2f} | {m['search_tags']:.2f} | {int(m['count'])} |"
            )
    for decoding, per_source in results.items():
        vs = per_source.get("_vs_greedy")
        if not vs:
            continue
        k = next(iter(vs.values()))["k"]
        lines += [
            "",
            f"{decoding} against greedy, {k} draw(s) per question:",
            "",
            "| data source | greedy EM | sampled EM | pass@k | sampled EM, greedy right "
            "(n) | sampled EM, greedy wrong (n) |",
            "|---|---|---|---|---|---|",
        ]
        for source, m in vs.items():
            cell = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
            lines.append(
                f"| {source} | {m['greedy_em']:.3f} | {m['sampled_em']:.3f} | "
                f"{m['pass_at_k']:.3f} | {cell(m['sampled_em_greedy_right'])} "
                f"({m['n_greedy_right']}) | {cell(m['sampled_em_greedy_wrong'])} "
                f"({m['n_greedy_wrong']}) |"
            )
    return "\n".join(lines) + "\n"


def write_results(
    workdir: str, name: str, results: dict[str, dict], extra: dict | None = None
) -> tuple[str, str]:
    """``WORKDIR/eval/NAME.json``, ``NAME.md`` and, when the results carry them, the
    per-question predictions as ``NAME.predictions.jsonl`` (one row per question and decoding,
    with a ``decoding`` field); returns the JSON and markdown paths."""
    out_dir = epath.Path(workdir) / "eval"  # local or an object store (gs://...)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        dict(decoding=d, **row) for d, per in results.items() for row in per.get("_predictions", ())
    ]
    results = {
        d: {k: v for k, v in per.items() if k != "_predictions"} for d, per in results.items()
    }
    if rows:
        write_text_atomically(
            out_dir / f"{name}.predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
        )
    json_path = str(out_dir / f"{name}.json")
    write_text_atomically(json_path, json.dumps(dict(extra or {}, results=results), indent=2))
    md_path = str(out_dir / f"{name}.md")
    write_text_atomically(md_path, markdown_table(results, name))
    return json_path, md_path
