"""Metrics logging: JSON lines, TensorBoard events, resume de-duplication, the PNG plot; on a
local disk and on an object store (an in-memory fake ``gs://``)."""

import json
import os
import struct

import pytest
from etils import epath

from dgpo_jax.launch.metrics_log import MetricsLogger, plot_curves, read_metrics
from tests.test_fileio import assert_no_local_files, use_fake_gcs


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


def test_resume_after_a_cut_line_appends_after_the_last_whole_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.1}\n{"step": 2, "reward": 0.2}\n{"step": 3, "re')
    log = MetricsLogger(str(tmp_path), tensorboard=False, progress=False, primary=True)
    log.write(3, {"reward": 0.3})
    log.close(plot=False)
    assert path.read_text().count("\n") == 3  # the cut line went; the new record follows
    assert [(r["step"], r["reward"]) for r in read_metrics(str(path))] == [
        (1, 0.1),
        (2, 0.2),
        (3, pytest.approx(0.3)),
    ]


def _scalar_events(data: bytes) -> list[tuple[str, int, float]]:
    """(tag, step, value) of the scalar summaries in a TFRecord event file."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    out, at = [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
        at += 12 + length + 4
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_object_store_workdir_jsonl_tensorboard_png_and_resume(monkeypatch, tmp_path):
    """A ``gs://`` workdir (in-memory fake, no appends): metrics.jsonl is uploaded whole at the
    first record, then every flush_secs / flush() / close(); a resumed logger continues it."""
    run = use_fake_gcs(monkeypatch, tmp_path)
    log = MetricsLogger(run, total_steps=3, progress=False, primary=True, flush_secs=3600)
    path = epath.Path(run) / "metrics.jsonl"
    assert log.path == str(path) == "gs://fake-bucket/run/metrics.jsonl"
    log.write(1, {"reward": 0.1, "em": 0.5})
    assert [r["step"] for r in read_metrics(log.path)] == [1]  # the first record shows at once
    log.write(2, {"reward": 0.2, "em": 0.5})
    log.write(3, {"reward": 0.3, "em": 0.5})
    assert [r["step"] for r in read_metrics(log.path)] == [1]  # buffered for flush_secs
    log.flush()
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    png = log.close()
    assert png == log.path + ".png" and epath.Path(png).read_bytes()[:4] == b"\x89PNG"
    (events,) = (epath.Path(run) / "tensorboard").iterdir()
    assert events.name.startswith("events.out.tfevents")
    scalars = _scalar_events(events.read_bytes())
    assert [(s, v) for t, s, v in scalars if t == "reward"] == [
        (1, pytest.approx(0.1)),
        (2, pytest.approx(0.2)),
        (3, pytest.approx(0.3)),
    ]

    resumed = MetricsLogger(run, tensorboard=False, progress=False, primary=True, flush_secs=3600)
    resumed.write(3, {"reward": 0.33})
    resumed.write(4, {"reward": 0.4})
    resumed.close(plot=False)
    recs = read_metrics(log.path)
    assert [(r["step"], r["reward"]) for r in recs] == [
        (1, pytest.approx(0.1)),
        (2, pytest.approx(0.2)),
        (3, pytest.approx(0.33)),
        (4, pytest.approx(0.4)),
    ]
    assert path.read_text().count("\n") == 5  # the earlier run's records kept, none appended
    assert_no_local_files(tmp_path)
