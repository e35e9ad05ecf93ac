"""The run config's homes: packaged configs by name and by path from any directory, every
objective and curriculum knob settable from the command line, unknown fields named with the
nearest valid one, and nothing changed behind the user's back by preset name."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgpo_jax.config import (
    ConfigError,
    available_configs,
    build_curriculum,
    build_objective,
    load_config,
    nq_config,
    validate,
)
from dgpo_jax.curricula.config import CurriculumConfig
from dgpo_jax.objectives.config import ObjectiveConfig
from dgpo_jax.objectives.presets import get_objective

REPO = Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (REPO / "dgpo_jax" / "configs").glob("[!_]*.py"))


def test_the_packaged_names_are_the_files():
    assert available_configs() == NAMES
    assert {"dgpo_nq", "quickstart", "ppo_nq", "coldstart_nq"} <= set(NAMES)
    # configs/ at the repository root is the packaged folder, not a copy.
    assert (REPO / "configs").resolve() == (REPO / "dgpo_jax" / "configs").resolve()


@pytest.mark.parametrize("name", NAMES)
def test_every_config_loads_by_name_and_by_path_elsewhere(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root
    by_name, rest = load_config(["prog", f"--config={name}"])
    assert rest == ["prog"]
    by_file = load_config(["prog", f"--config={name}.py"])[0]
    by_path = load_config(["prog", f"--config={REPO / 'configs' / (name + '.py')}"])[0]
    assert by_name.to_dict() == by_file.to_dict() == by_path.to_dict()
    assert by_name.mode in ("train", "coldstart", "eval", "quickstart", "compare")
    # The objective and curriculum of each config build (their knobs are consistent).
    if by_name.mode in ("train", "coldstart"):
        build_objective(by_name), build_curriculum(by_name)


def test_relative_path_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg, _ = load_config(["prog", "--config=configs/dgpo_nq.py", "--config.seed=3"])
    assert cfg.seed == 3


def test_unknown_config_name_lists_the_available_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(["prog", "--config=dgpo_nqq"])
    msg = str(e.value)
    assert "no packaged config named 'dgpo_nqq'" in msg and "did you mean 'dgpo_nq'" in msg
    assert all(n in msg for n in NAMES)
    with pytest.raises(ConfigError, match="--config is required"):
        load_config(["prog"])


def _knob_value(field: dataclasses.Field, current):
    """A valid value of the knob's type that differs from ``current`` where one is easy."""
    kind = field.type
    if "bool" in kind:
        return "False" if current else "True", not current
    if kind.startswith("int"):
        return "7", 7
    if kind.startswith("float"):
        return "0.375", 0.375
    return None, None


@pytest.mark.parametrize(
    "knob", [f.name for f in dataclasses.fields(ObjectiveConfig) if f.name != "name"]
)
def test_every_objective_knob_reaches_the_objective_from_the_command_line(knob):
    field = next(f for f in dataclasses.fields(ObjectiveConfig) if f.name == knob)
    default = getattr(get_objective("ppo"), knob)
    text, value = _knob_value(field, default)
    if text is None:  # string knobs: the default itself round-trips as text
        text, value = str(default), default
    cfg, _ = load_config(["prog", "--config=ppo_nq", f"--config.objective.{knob}={text}"])
    assert cfg.objective[knob] == value
    try:
        got = getattr(build_objective(cfg), knob)
    except ConfigError as e:  # the value is valid for its type but not for ppo: named
        assert knob in str(e) or "inconsistent" in str(e), e
        return
    assert got == value


@pytest.mark.parametrize("knob", [f.name for f in dataclasses.fields(CurriculumConfig)])
def test_every_curriculum_knob_is_a_command_line_field(knob):
    field = next(f for f in dataclasses.fields(CurriculumConfig) if f.name == knob)
    text, value = _knob_value(field, getattr(CurriculumConfig(), knob))
    if text is None:
        text, value = "cosine", "cosine"
    cfg, _ = load_config(["prog", "--config=taid_nq", f"--config.curriculum.{knob}={text}"])
    assert cfg.curriculum[knob] == value


def test_command_line_knobs_change_the_built_objects():
    cfg, _ = load_config(
        [
            "prog",
            "--config=dgpo_nq",
            "--config.objective.token_reward_coef=0.01",
            "--config.objective.whiten_advantages=False",
        ]
    )
    objective = build_objective(cfg)
    assert (objective.token_reward_coef, objective.whiten_advantages) == (0.01, False)
    # A knob the config leaves unset keeps the preset's value, and the preset can change.
    cfg, _ = load_config(["prog", "--config=quickstart", "--config.objective.preset=grpo"])
    assert build_objective(cfg) == get_objective("grpo")
    cfg, _ = load_config(
        [
            "prog",
            "--config=guided_opd_nq",
            "--config.curriculum.guided_p0=0.25",
            "--config.curriculum.guided_schedule=cosine",
        ]
    )
    curriculum = build_curriculum(cfg)
    assert (curriculum.guided_p0, curriculum.guided_schedule) == (0.25, "cosine")


def test_precision_attention_and_packing_knobs_from_the_command_line():
    cfg, _ = load_config(
        [
            "prog",
            "--config=dgpo_nq",
            "--config.model.param_dtype=bfloat16",
            "--config.model.attention=chunked",
            "--config.train.pack=False",
            "--config.train.score_micro_batch_size=4",
        ]
    )
    assert (cfg.model.param_dtype, cfg.model.attention) == ("bfloat16", "chunked")
    assert (cfg.train.pack, cfg.train.score_micro_batch_size) == (False, 4)
    with pytest.raises(ConfigError, match="did you mean --config.model.param_dtype\\?"):
        load_config(["prog", "--config=dgpo_nq", "--config.model.params_dtype=float32"])
    # The quickstart computes and keeps its weights in float32 on unpacked rows, as before.
    cfg, _ = load_config(["prog", "--config=quickstart"])
    assert (cfg.model.param_dtype, cfg.model.dtype, cfg.train.pack) == ("float32", "float32", False)


@pytest.mark.parametrize(
    "flag, nearest",
    [
        ("--config.objective.token_reward_cof=0.01", "--config.objective.token_reward_coef"),
        ("--config.curriculum.guided_p=0.3", "--config.curriculum.guided_p0"),
        ("--config.optim.actor_l=1e-5", "--config.optim.actor_lr"),
    ],
)
def test_an_unknown_field_names_the_nearest(flag, nearest):
    with pytest.raises(ConfigError, match=f"did you mean {nearest}\\?"):
        load_config(["prog", "--config=dgpo_nq", flag])


def test_the_old_overrides_spelling_is_an_error_naming_the_field():
    with pytest.raises(ConfigError, match="config.objective.overrides.token_reward_coef: no such"):
        load_config(
            ["prog", "--config=dgpo_nq", "--config.objective.overrides.token_reward_coef=0.01"]
        )


def test_wrong_types_and_inconsistent_knobs_are_config_errors():
    with pytest.raises(ConfigError, match="could not convert string to float: 'abc'"):
        load_config(["prog", "--config=dgpo_nq", "--config.objective.clip_low=abc"])
    cfg, _ = load_config(["prog", "--config=ppo_nq", "--config.objective.critic=none"])
    with pytest.raises(ConfigError, match="config.objective: .*advantage='gae' needs a critic"):
        build_objective(cfg)
    cfg, _ = load_config(["prog", "--config=ppo_nq", "--config.curriculum.replay_buffer_size=10"])
    with pytest.raises(ConfigError, match="config.curriculum: .*off-policy KD"):
        build_curriculum(cfg)
    cfg, _ = load_config(
        ["prog", "--config=tropd_nq", "--config.curriculum.teacher_prefix_share=0.5"]
    )
    with pytest.raises(ConfigError, match="teacher_prefix_share=0.5 needs teacher_prefix_tokens"):
        build_curriculum(cfg)
    cfg, _ = load_config(["prog", "--config=quickstart", "--config.sampler.decode_layers=unroll"])
    with pytest.raises(
        ConfigError, match=r"config.sampler.decode_layers: 'unroll': expected one of \('auto'"
    ):
        validate(cfg)
    cfg, _ = load_config(["prog", "--config=quickstart", "--config.sampler.decode_attention=flash"])
    with pytest.raises(
        ConfigError, match=r"config.sampler.decode_attention: 'flash': expected one of \('xla'"
    ):
        validate(cfg)
    for flags, match in (
        (
            ["decode_attention=fused", "decode_layers=scan"],
            r"config.sampler.decode_attention: 'fused' runs on the accelerator path with "
            r"split layers; got decode_path='accelerator', decode_layers='scan'",
        ),
        (
            ["decode_attention=fused", "decode_path=accelerator", "cache_len=1000"],
            r"config.sampler.cache_len: 1000: decode_attention='fused' reads the cache in "
            r"blocks of 16 slots; expected a multiple of 16",
        ),
        (
            ["chunk_attention=pallas", "decode_path=cpu"],
            r"config.sampler.chunk_attention: 'pallas' runs on the accelerator path \(all "
            r"rows every step\); got decode_path='cpu'",
        ),
    ):
        cfg, _ = load_config(
            ["prog", "--config=quickstart"] + [f"--config.sampler.{f}" for f in flags]
        )
        with pytest.raises(ConfigError, match=match):
            validate(cfg)


def test_presets_change_no_hyperparameter_by_name():
    """nq_config gives every preset the same optimizer; each config file states its own."""
    base = nq_config("x", "dgpo").optim.to_dict()
    for preset in ("kd", "opd", "taid", "exopd"):
        assert nq_config("x", preset).optim.to_dict() == base
    assert load_config(["p", "--config=kd_nq"])[0].optim.actor_lr == 1e-4
    assert load_config(["p", "--config=opd_nq"])[0].optim.actor_lr == 1e-5


def test_exopd_reward_correction_needs_the_reference(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.setenv("DGPO_STUDENT", str(tmp_path / "m"))
    monkeypatch.setenv("DGPO_TEACHER", str(tmp_path / "m"))
    monkeypatch.delenv("DGPO_REFERENCE", raising=False)
    cfg, _ = load_config(["p", "--config=exopd_nq", "--config.mode=plan"])
    assert cfg.model.ref_model == "initial_student"
    validate(cfg)
    cfg, _ = load_config(
        ["p", "--config=exopd_nq", "--config.mode=plan", "--config.model.ref_model=teacher_base"]
    )
    with pytest.raises(
        ConfigError, match="config.model.reference: is empty: model.ref_model='teacher_base'"
    ):
        validate(cfg)
    monkeypatch.setenv("DGPO_REFERENCE", str(tmp_path / "m"))
    cfg, _ = load_config(["p", "--config=exopd_nq", "--config.mode=plan"])
    assert (cfg.model.ref_model, cfg.model.reference) == ("teacher_base", str(tmp_path / "m"))
    validate(cfg)


def _launch(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "dgpo_jax.launch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, DGPO_DEBUG=""),
    )


def test_launcher_by_name_from_another_directory(tmp_path):
    """As a user would: a bare name from a directory that is not the checkout; an unknown name
    is one line naming what was asked and what exists, exit 2, no traceback."""
    out = _launch(
        "--config=dgpo_nq", "--print_config", "--config.objective.entropy_coef=0.002", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "entropy_coef=0.002" in out.stdout and "# resolved objective" in out.stdout
    out = _launch("--config=nonexistent", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith(
        "error: --config=nonexistent: no such file, and no packaged config named 'nonexistent'"
    )
    assert "dgpo_nq" in out.stderr and "Traceback" not in out.stderr
    out = _launch("--help", cwd=tmp_path)
    assert out.returncode == 0 and "packaged configs: " in out.stdout and "dgpo_nq" in out.stdout


def _config_table() -> list[tuple[str, str, object, str]]:
    """The rows of docs/algorithms.md's "What each config runs" table."""
    text = (REPO / "docs" / "algorithms.md").read_text()
    section = text.split("### What each config runs", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[0] != "`config`":
            name, field, value = (c.strip("`") for c in cells[:3])
            rows.append((name, field, ast.literal_eval(value), cells[3]))
    return rows


def test_every_config_states_the_values_of_the_hyperparameter_table(monkeypatch):
    monkeypatch.delenv("DGPO_REFERENCE", raising=False)
    rows = _config_table()
    assert len(rows) > 80 and {r[0] for r in rows} >= {n for n in NAMES if n.endswith("_nq")} - {
        "eval_nq"
    }
    built = {}
    for name, field, want, source in rows:
        if name not in built:
            cfg = load_config(["p", f"--config={name}"])[0]
            built[name] = (cfg, build_objective(cfg), build_curriculum(cfg))
        cfg, objective, curriculum = built[name]
        section, _, key = field.partition(".")
        got = {
            "objective": lambda: getattr(objective, key),
            "curriculum": lambda: getattr(curriculum, key),
        }.get(section, lambda: cfg[section][key])()
        assert got == want, f"{name} {field}: config {got!r}, table {want!r} ({source})"
    # and each config file names a source for what it sets
    for name in {r[0] for r in rows}:
        text = (REPO / "dgpo_jax" / "configs" / f"{name}.py").read_text()
        assert text.count("#") >= 3, name
