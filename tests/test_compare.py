"""mode=compare: the statistics of the comparison against hand computations, and the mode end to
end on a tiny world (2 seeds, 2 methods), interrupted in the middle and resumed."""

import json
import math
import os
import re
import shutil

import jax
import numpy as np
import pytest

from dgpo_jax.checkpoint.params import (
    checkpoint_fingerprint,
    params_fingerprint,
    save_params_checkpoint,
)
from dgpo_jax.config import ConfigError, load_config, split_list, validate
from dgpo_jax.errors import NotReproducedError, OutputExistsError
from dgpo_jax.launch import compare
from dgpo_jax.launch.compare import run_compare, summarize_comparison
from dgpo_jax.models import get_preset, init_params

T_975_1 = 12.706204736174698  # Student t, 97.5% quantile, 1 degree of freedom (tables)


def test_summary_against_hand_values():
    # 2 seeds x 4 questions of one data source; "all" is the same questions.
    cold = {0: [1, 0, 1, 0], 1: [1, 1, 0, 0]}
    dgpo = {0: [1, 1, 1, 0], 1: [1, 1, 1, 1]}
    scores = {
        name: {s: {"nq": v[s], "all": v[s]} for s in (0, 1)}
        for name, v in (("coldstart", cold), ("dgpo", dgpo))
    }
    out = summarize_comparison(scores, "coldstart", resamples=2000)
    row = out["methods"]["dgpo"]["all"]
    assert row["per_seed"] == [0.75, 1.0]
    assert row["mean"] == pytest.approx(0.875)
    # t interval over the two seed means: sd = 0.25 / sqrt(2), half-width t * sd / sqrt(2)
    half = T_975_1 * 0.125
    assert row["ci_low"] == pytest.approx(0.875 - half, rel=1e-9)
    assert row["ci_high"] == pytest.approx(0.875 + half, rel=1e-9)
    assert "t interval" in row["ci_method"]
    # Within seeds, only questions vary: seed 1 of dgpo is all right, so its share is fixed at
    # 1; seed 0's share is a bootstrap of [1,1,1,0] in {0.25,..,1}: the mean of the two lies
    # in [0.625, 1.0].
    assert 0.625 <= row["questions_ci_low"] <= row["questions_ci_high"] <= 1.0
    d = out["paired_vs_coldstart"]["dgpo"]
    # per-seed differences 0.25 and 0.5; dgpo right where the cold start is wrong on 3 pairs
    # (seed 0 q1, seed 1 q2, q3), never the reverse: McNemar 2 * 0.5**3.
    assert d["diff"] == pytest.approx(0.375)
    assert d["discordant"] == [3, 0]
    assert d["test"] == "mcnemar_exact"
    assert d["p_value"] == pytest.approx(0.25)
    assert d["n"] == 8
    assert d["ci_low"] <= 0.375 <= d["ci_high"]
    assert "coldstart" not in out["paired_vs_coldstart"]
    json.dumps(out)  # plain JSON


def test_a_row_with_fewer_seeds_is_summarised_over_its_own():
    """A comparison still running: dgpo has finished seed 0 only, the cold start seeds 0 and 1."""
    cold = {0: [1, 0, 1, 0], 1: [1, 1, 0, 0]}
    scores = {
        "coldstart": {s: {"all": v} for s, v in cold.items()},
        "dgpo": {0: {"all": [1, 1, 1, 0]}},
    }
    out = summarize_comparison(scores, "coldstart", resamples=2000)
    assert out["seeds"] == [0, 1]
    row = out["methods"]["dgpo"]["all"]
    assert row["seeds"] == [0] and row["per_seed"] == [0.75]
    assert "bootstrap" in row["ci_method"]  # one seed: the interval over questions
    assert out["methods"]["coldstart"]["all"]["seeds"] == [0, 1]
    # paired over seed 0 only: dgpo right where the cold start is wrong on question 1, never
    # the reverse: diff 1/4, McNemar 2 * 0.5**1 = 1
    d = out["paired_vs_coldstart"]["dgpo"]
    assert d["seeds"] == [0] and d["n"] == 4
    assert d["diff"] == pytest.approx(0.25)
    assert d["discordant"] == [1, 0] and d["p_value"] == pytest.approx(1.0)
    # no reference yet: rows without a paired entry
    alone = summarize_comparison({"teacher": {0: {"all": [1, 0]}}}, "coldstart", resamples=200)
    assert alone["paired_vs_coldstart"] == {}
    assert "| dgpo (seeds 0) |" in compare.markdown(out)


def test_one_seed_falls_back_to_the_question_bootstrap():
    scores = {
        "coldstart": {3: {"all": [0, 1] * 50}},
        "ppo": {3: {"all": [1, 1] * 50}},
    }
    out = summarize_comparison(scores, "coldstart", resamples=2000)
    row = out["methods"]["coldstart"]["all"]
    assert "bootstrap" in row["ci_method"]
    # a share of 0.5 over 100 questions: the normal approximation +-1.96 * 0.05
    assert row["ci_low"] == pytest.approx(0.5 - 0.098, abs=0.02)
    assert row["ci_high"] == pytest.approx(0.5 + 0.098, abs=0.02)
    assert out["paired_vs_coldstart"]["ppo"]["discordant"] == [50, 0]


def tiny_compare_config(workdir, **changes):
    args = [
        "prog",
        "--config=compare",
        f"--config.workdir={workdir}",
        "--config.compare.seeds=0,1",
        "--config.compare.methods=ppo,opd",
        "--config.compare.resamples=500",
        # The teacher memorises 4 training questions and the cold start asks it those 4, so it
        # has trajectories to distill at this size.
        "--config.quickstart.num_entities=100",
        "--config.quickstart.teacher_questions=4",
        "--config.quickstart.teacher_batch_size=4",
        "--config.quickstart.teacher_steps=60",
        "--config.quickstart.teacher_lr=3e-3",
        "--config.coldstart.max_questions=4",
        # the teacher's self-check on training questions: 2 per data source, at most 2 cycles
        "--config.quickstart.teacher_check_questions=2",
        "--config.quickstart.teacher_max_rounds=2",
        "--config.coldstart.epochs=1",
        "--config.coldstart.batch_size=4",
        # the cold start's check, set out of reach of one epoch: a second round continues
        "--config.quickstart.coldstart_min_train_em=1.0",
        "--config.quickstart.coldstart_max_rounds=2",
        "--config.quickstart.rl_steps=1",
        "--config.quickstart.rl_batch_size=4",
        "--config.train.micro_batch_size=4",
        "--config.eval.max_examples=4",
        "--config.eval.batch_size=8",
        "--config.logging.progress=False",
        "--config.logging.tensorboard=False",
        # not the subject here: the decode path with the cheaper compile
        "--config.sampler.decode_path=accelerator",
        "--config.mesh.num_devices=1",
    ] + [f"--config.{k}={v}" for k, v in changes.items()]
    cfg, _ = load_config(args)
    return cfg


def test_compare_end_to_end_interrupted_and_resumed(tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "cmp"
    calls = []
    real = {n: getattr(compare, n) for n in ("teacher_stage", "coldstart_stage", "rl_stage")}

    replayed = []  # the rounds a rebuild was told to replay

    def recorder(name, fail_on=None):
        def stage(*args, **kwargs):
            out = real[name](*args, **kwargs)
            calls.append((name, args[1]))
            if name == "coldstart_stage" and len(args) > 4:
                replayed.append(args[4])
            if fail_on is not None and fail_on(args):
                raise KeyboardInterrupt("killed after the stage's work, before its record")
            return out

        return stage

    # The first run dies in seed 1's second method (opd), after training it.
    monkeypatch.setattr(compare, "teacher_stage", recorder("teacher_stage"))
    monkeypatch.setattr(compare, "coldstart_stage", recorder("coldstart_stage"))
    monkeypatch.setattr(compare, "rl_stage", recorder("rl_stage", lambda a: a[1] == "seed1/opd"))
    # The first run gets a relative workdir; the resume below runs from another directory.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_compare(tiny_compare_config("cmp"))
    first = list(calls)
    assert [c[0] for c in first].count("rl_stage") == 4
    stored = sorted(os.listdir(workdir / "stages"))
    assert "seed1_opd.json" not in stored and "seed1_ppo.json" in stored and len(stored) == 7
    # the stopped run left the table of what it had finished
    partial = json.loads((workdir / "compare.json").read_text())
    assert partial["complete"] is False and partial["missing"] == ["seed1_opd"]
    assert partial["methods"]["opd"]["all"]["seeds"] == [0]
    assert partial["methods"]["ppo"]["all"]["seeds"] == [0, 1]
    # over seed 0: its 2 data sources x eval.max_examples questions
    assert partial["paired_vs_coldstart"]["opd"]["n"] == 2 * 4
    assert "| opd (seeds 0) |" in (workdir / "compare.md").read_text()

    # Without resume the finished stages are not overwritten; a changed setting is named.
    with pytest.raises(OutputExistsError, match="finished stages"):
        run_compare(tiny_compare_config(workdir))
    with pytest.raises(ConfigError, match="quickstart.rl_steps: 1 -> 2"):
        run_compare(tiny_compare_config(workdir, resume=True, **{"quickstart.rl_steps": 2}))

    # A setting the schema gained after that run, at its default, does not block the resume.
    settings = workdir / "compare_config.json"
    stored_settings = json.loads(settings.read_text())
    assert stored_settings.pop("sampler.decode_layers") == "auto"
    settings.write_text(json.dumps(stored_settings))
    # The resume runs where seed 1's cold start is missing (the records travel, checkpoints do
    # not; the teacher's rebuild is the same path, with stand-in stages below): it is trained
    # again, from the teacher checked in place, and must match its recorded fingerprint before
    # opd starts from it.
    records = {
        name: json.loads((workdir / "stages" / f"seed1_{name}.json").read_text())
        for name in ("teacher", "coldstart")
    }
    assert all(len(r["fingerprint"]) == 64 for r in records.values())
    assert os.path.dirname(records["coldstart"]["checkpoint_in_workdir"]).startswith("seed1/")
    for d in (workdir / "seed1").glob("coldstart*"):  # its rounds, evaluations and checks
        shutil.rmtree(d)
    calls.clear()
    monkeypatch.setattr(compare, "rl_stage", recorder("rl_stage"))
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = run_compare(tiny_compare_config(workdir, resume=True))
    # only the unfinished stage ran again, after seed 1's cold start was rebuilt
    assert calls == [("coldstart_stage", "seed1/coldstart"), ("rl_stage", "seed1/opd")]
    assert "the coldstart reproduced bit for bit" in capsys.readouterr().out
    # the rebuild replayed the recorded rounds (the fingerprint matched, so all of them) and
    # spent nothing on the checks and held-out evaluations already on record
    assert replayed == [len(records["coldstart"]["coldstart"])]
    rebuilt = sorted(d.name for d in (workdir / "seed1").glob("coldstart*"))
    assert rebuilt == ["coldstart", "coldstart_1"][: replayed[0]]
    assert not any((workdir / "seed1" / d / "eval").exists() for d in rebuilt)

    on_disk = json.loads((workdir / "compare.json").read_text())
    assert on_disk["seeds"] == [0, 1]
    assert on_disk["complete"] is True and on_disk["missing"] == []
    assert set(on_disk["methods"]) == {"teacher", "coldstart", "ppo", "opd"}
    for row in on_disk["methods"].values():
        assert set(row) == {"synthetic_1hop", "synthetic_2hop", "all"}
        cell = row["all"]
        assert len(cell["per_seed"]) == 2
        assert cell["mean"] == pytest.approx(np.mean(cell["per_seed"]))
        for key in ("ci_low", "ci_high", "questions_ci_low", "questions_ci_high"):
            assert math.isfinite(cell[key])
    for name in ("teacher", "ppo", "opd"):
        d = on_disk["paired_vs_coldstart"][name]
        assert 0.0 <= d["p_value"] <= 1.0 and d["ci_low"] <= d["diff"] <= d["ci_high"]
        assert d["n"] == 2 * 2 * 4  # seeds x data sources x eval.max_examples
    assert result["methods"] == on_disk["methods"]
    # The teacher stage stopped at the first cycle whose training-question EM reached the
    # threshold, or after teacher_max_rounds cycles of 60 steps each.
    threshold = tiny_compare_config(workdir).quickstart.teacher_min_train_em
    assert threshold == 0.9  # configs/compare.py's choice
    for seed in ("0", "1"):
        rounds = on_disk["teacher_rounds"][seed]["rounds"]
        assert [r["steps"] for r in rounds] == [60 * (i + 1) for i in range(len(rounds))]
        assert all(r["train_em"] < threshold for r in rounds[:-1])
        assert rounds[-1]["train_em"] >= threshold or len(rounds) == 2
    # Likewise the cold start, in rounds of one epoch; a second round continues from the first
    # round's student (its first loss is below the fresh student's) and is the one recorded.
    for seed in ("0", "1"):
        rounds = on_disk["coldstart_rounds"][seed]
        assert [r["epochs"] for r in rounds] == list(range(1, len(rounds) + 1))
        assert rounds[-1]["train_em"] >= 1.0 or len(rounds) == 2
        if len(rounds) == 2:
            record = json.loads((workdir / "stages" / f"seed{seed}_coldstart.json").read_text())
            assert record["checkpoint"].endswith(f"seed{seed}/coldstart_1/student_coldstart")
            first_loss = [
                json.loads(
                    (workdir / f"seed{seed}" / d / "coldstart_metrics.jsonl").open().readline()
                )["loss"]
                for d in ("coldstart", "coldstart_1")
            ]
            assert first_loss[1] < first_loss[0]
    assert "| opd |" in (workdir / "compare.md").read_text()
    assert (workdir / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "compare.methods",
            "dgpo,dgpoo",
            "'dgpoo' is not an objective preset (did you mean 'dgpo'?)",
        ),
        ("compare.seeds", "0,1,0", "repeats a seed"),
        ("compare.seeds", "0,x", "'x' is not an integer"),
        ("compare.level", "1.5", "expected a level in (0, 1)"),
        ("quickstart.teacher_min_train_em", "2.0", "expected a share in [0, 1]"),
        ("quickstart.coldstart_min_train_em", "-0.5", "expected a share in [0, 1]"),
        ("quickstart.coldstart_max_rounds", "0", "expected >= 1"),
        ("quickstart.answers", "half", "'half': expected one of closed, open"),
    ],
)
def test_compare_settings_are_checked_by_name(tmp_path, field, value, message):
    cfg = tiny_compare_config(tmp_path / "c", **{field: value})
    with pytest.raises(
        ConfigError, match=re.escape(f"config.{field}: ") + ".*" + re.escape(message)
    ):
        validate(cfg)


def test_gpu_quickstart_config_sizes():
    """configs/quickstart_gpu.py loads and validates; its models have the sizes it states,
    counted by hand: per layer q/o 512x512 (+ q bias 512), k/v 512x128 (+ 128 bias) each, the
    MLP 3 x 512 x 1536, two norms of 512; tied embeddings of vocabulary x 512; a final norm."""
    cfg, _ = load_config(["prog", "--config=quickstart_gpu"])
    validate(cfg)
    assert cfg.mode == "compare"
    assert split_list(cfg.compare.methods) == ["dgpo", "ppo", "opd", "exopd", "kd"]
    vocab = 1000
    layer = 2 * 512 * 512 + 512 + 2 * (512 * 128 + 128) + 3 * 512 * 1536 + 2 * 512
    for preset, layers in ((cfg.quickstart.teacher_preset, 8), (cfg.quickstart.student_preset, 4)):
        config = get_preset(preset, vocab_size=vocab)
        assert config.num_params() == vocab * 512 + layers * layer + 512
    assert 20e6 < get_preset(cfg.quickstart.teacher_preset, vocab_size=vocab).num_params() < 30e6


def test_params_fingerprint_is_the_weights_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    params = {"a": {"w": rng.normal(size=(3, 4)).astype(np.float32)}, "b": np.arange(5)}
    same = {"b": np.arange(5), "a": {"w": params["a"]["w"].copy()}}  # another insertion order
    assert params_fingerprint(params) == params_fingerprint(same)
    nudged = params["a"]["w"].copy()
    nudged[1, 2] = np.nextafter(nudged[1, 2], np.float32(np.inf))  # one ulp
    assert params_fingerprint({**params, "a": {"w": nudged}}) != params_fingerprint(params)
    as_f64 = {**params, "a": {"w": params["a"]["w"].astype(np.float64)}}
    assert params_fingerprint(as_f64) != params_fingerprint(params)
    renamed = {"a": {"v": params["a"]["w"]}, "b": params["b"]}
    assert params_fingerprint(renamed) != params_fingerprint(params)
    # a checkpoint's weights read back: the same fingerprint as in memory
    config = get_preset("tiny", vocab_size=64)
    weights = init_params(config, jax.random.key(0))
    save_params_checkpoint(config, weights, str(tmp_path / "ckpt"))
    assert checkpoint_fingerprint(str(tmp_path / "ckpt")) == params_fingerprint(weights)


def test_seed_checkpoints_rebuilt_elsewhere_must_match_their_records(tmp_path, monkeypatch, capsys):
    """`seed_checkpoints` on a machine without the seed's checkpoints: stages that give other
    weights than the recorded run stop the compare by name; a record without a fingerprint
    (written before fingerprints) cannot be checked and says so."""
    config = get_preset("tiny", vocab_size=64)
    workdir = tmp_path / "w"

    def weights(seed):
        return init_params(config, jax.random.key(seed))

    replays = []

    def fake_teacher(prep, seed, teacher_dir, seed_workdir, cycles_done=None):
        replays.append(("teacher", cycles_done))
        shutil.rmtree(teacher_dir, ignore_errors=True)  # as the stage does
        save_params_checkpoint(config, weights(prep.teacher_seed), teacher_dir)

    def fake_coldstart(base, name, teacher_dir, seed, rounds_done=None):
        replays.append(("coldstart", rounds_done))
        out = os.path.join(str(workdir), name, "student_coldstart")
        save_params_checkpoint(config, weights(100), out)
        return {"checkpoint": out}

    monkeypatch.setattr(compare, "teacher_stage", fake_teacher)
    monkeypatch.setattr(compare, "coldstart_stage", fake_coldstart)
    store = compare.StageStore(str(workdir), tiny_compare_config(workdir))
    records = {
        "teacher": {
            "fingerprint": params_fingerprint(weights(7)),
            "teacher": {"rounds": [{"steps": 60, "train_em": 0.5}, {"steps": 120}]},
        },
        "coldstart": {
            "checkpoint": "/elsewhere/seed3/coldstart/student_coldstart",
            "checkpoint_in_workdir": "seed3/coldstart/student_coldstart",
            "fingerprint": params_fingerprint(weights(100)),
            "coldstart": [{"epochs": 1, "train_em": 0.2}, {"epochs": 2}, {"epochs": 3}],
        },
    }
    for name, record in records.items():
        store.put(3, name, record)

    class Prep:
        base = None
        teacher_seed = 8  # a teacher that comes out different this time

    with pytest.raises(NotReproducedError, match="seed 3's teacher in .* differs from the rec"):
        compare.seed_checkpoints(store, Prep, str(workdir), 3)
    assert "reproduced" not in capsys.readouterr().out
    # the wrong teacher stays on disk, and the next try refuses it rather than use it
    with pytest.raises(NotReproducedError, match="seed 3's teacher in .* differs from the rec"):
        compare.seed_checkpoints(store, Prep, str(workdir), 3)
    shutil.rmtree(workdir / "seed3")
    Prep.teacher_seed = 7  # the same weights: the cold start is found where the record says
    got = compare.seed_checkpoints(store, Prep, str(workdir), 3)
    assert got == str(workdir / "seed3/coldstart/student_coldstart")
    out = capsys.readouterr().out
    assert "the teacher reproduced bit for bit" in out
    assert "the coldstart reproduced bit for bit" in out
    # each rebuild replays its record's rounds (the checks are not run again)
    assert replays[-2:] == [("teacher", 2), ("coldstart", 3)]
    # now on this machine: used as they are (checked), nothing trained
    monkeypatch.setattr(compare, "teacher_stage", None)
    monkeypatch.setattr(compare, "coldstart_stage", None)
    assert compare.seed_checkpoints(store, Prep, str(workdir), 3) == got
    # a checkpoint there that is not the recorded one (a stage killed before its check, an
    # overwritten directory) is refused, not used
    shutil.rmtree(workdir / "seed3/teacher")
    save_params_checkpoint(config, weights(8), str(workdir / "seed3/teacher"))
    with pytest.raises(NotReproducedError, match="seed 3's teacher in .* differs from the rec"):
        compare.seed_checkpoints(store, Prep, str(workdir), 3)
    shutil.rmtree(workdir / "seed3/teacher")
    save_params_checkpoint(config, weights(7), str(workdir / "seed3/teacher"))
    # a record from before fingerprints: used unchecked where the checkpoints are, refused
    # where they are missing
    store.put(3, "teacher", {})
    assert compare.seed_checkpoints(store, Prep, str(workdir), 3) == got
    assert compare._rounds_done({}, "teacher") is None  # such a rebuild checks its cycles
    shutil.rmtree(workdir / "seed3")
    with pytest.raises(NotReproducedError, match="has no fingerprint to check"):
        compare.seed_checkpoints(store, Prep, str(workdir), 3)


def test_a_comparison_continued_elsewhere_rebuilds_what_each_stage_needs(tmp_path, monkeypatch):
    """run_compare's wiring with stand-in stages (no training): a run stopped after seed 0's
    teacher, continued where the checkpoints are missing, trains the teacher again (checked)
    before the cold start and then goes on; a teacher that comes out different stops it."""
    config = get_preset("tiny", vocab_size=64)
    trained, teacher_seed = [], {"value": 0}

    def final_eval(n=4):
        preds = [
            {"sample": 0, "index": i, "data_source": "synthetic_1hop", "em": float(i % 2)}
            for i in range(n)
        ]
        return {"greedy": {"_predictions": preds}}

    def fake_teacher(prep, seed, teacher_dir, seed_workdir, cycles_done=None):
        trained.append("teacher" if cycles_done is None else f"teacher x{cycles_done}")
        shutil.rmtree(teacher_dir, ignore_errors=True)
        save_params_checkpoint(
            config, init_params(config, jax.random.key(teacher_seed["value"])), teacher_dir
        )
        return {"rounds": [{"steps": 60, "train_em": 0.5}, {"steps": 120, "train_em": 0.95}]}

    def fake_coldstart(base, name, teacher_dir, seed, rounds_done=None):
        assert os.path.isdir(teacher_dir)  # distilled from a teacher that is there
        trained.append("coldstart")
        out = os.path.join(base.workdir, name, "student_coldstart")
        shutil.rmtree(out, ignore_errors=True)
        save_params_checkpoint(config, init_params(config, jax.random.key(100)), out)
        return {"final_eval": final_eval(), "checkpoint": out, "num_sequences": 4, "rounds": []}

    def fake_rl(base, name, preset, student, teacher_dir, seed):
        assert os.path.isdir(student) and os.path.isdir(teacher_dir)
        trained.append(preset)
        return {"final_eval": final_eval()}

    def stop_at_coldstart(*args):
        raise KeyboardInterrupt("killed before the cold start")

    monkeypatch.setattr(compare, "teacher_stage", fake_teacher)
    monkeypatch.setattr(compare, "coldstart_stage", stop_at_coldstart)
    monkeypatch.setattr(compare, "rl_stage", fake_rl)
    monkeypatch.setattr(compare, "run_eval", lambda cfg: {"final_eval": final_eval()})
    workdir = tmp_path / "cmp"
    with pytest.raises(KeyboardInterrupt):
        run_compare(tiny_compare_config(workdir, **{"compare.seeds": "0"}))
    assert trained == ["teacher"]
    # the records alone, summarised from the command line (trains nothing): the teacher row
    (workdir / "compare.json").unlink()
    assert compare.main([str(workdir), "--resamples", "100"]) == 0
    alone = json.loads((workdir / "compare.json").read_text())
    assert list(alone["methods"]) == ["teacher"] and alone["paired_vs_coldstart"] == {}
    assert alone["complete"] is True  # of what the records name: the CLI knows no plan
    assert compare.main([str(tmp_path / "nothing")]) == 2
    with pytest.raises(SystemExit):
        compare.main([str(workdir), "--level", "95"])
    shutil.rmtree(workdir / "seed0")  # "another machine": the records only

    teacher_seed["value"] = 1  # this machine's teacher comes out different: refused
    monkeypatch.setattr(compare, "coldstart_stage", fake_coldstart)
    cfg = tiny_compare_config(workdir, resume=True, **{"compare.seeds": "0"})
    with pytest.raises(NotReproducedError, match="seed 0's teacher in .* differs"):
        run_compare(cfg)
    # (trained again for its two recorded cycles, without their checks)
    assert trained == ["teacher", "teacher x2"]
    shutil.rmtree(workdir / "seed0")
    teacher_seed["value"] = 0  # the same teacher: the run goes on
    run_compare(cfg)
    assert trained == ["teacher", "teacher x2", "teacher x2", "coldstart", "ppo", "opd"]
    assert json.loads((workdir / "compare.json").read_text())["seeds"] == [0]
