"""Metrics logging: JSON lines, TensorBoard events, resume de-duplication, the PNG plot."""

import json
import os

import pytest

from dgpo_jax.launch.metrics_log import MetricsLogger, plot_curves, read_metrics


def test_jsonl_tensorboard_and_plot(tmp_path):
    log = MetricsLogger(str(tmp_path), total_steps=3, progress=False)
    for step in range(1, 4):
        log.write(
            step, {"reward": 0.1 * step, "em": 0.2, "kl_k1": 0.01, "text": "skip"}, tokens=100
        )
    png = log.close()
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[2]["reward"] == pytest.approx(0.3) and "text" not in recs[0]
    assert recs[0]["tokens_per_s"] > 0
    assert png and os.path.getsize(png) > 1000 and open(png, "rb").read(4) == b"\x89PNG"
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)


def test_resume_keeps_last_record_and_tolerates_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "reward": 0.0}, {"step": 2, "reward": 0.5}, {"step": 2, "reward": 0.7}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 3, "rew')
    recs = read_metrics(str(path))
    assert [(r["step"], r["reward"]) for r in recs] == [(1, 0.0), (2, 0.7)]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(str(path))


def test_plot_without_metrics_file(tmp_path):
    assert plot_curves(str(tmp_path / "none.jsonl"), str(tmp_path / "x.png")) is None
