"""The launcher: ``python -m dgpo_jax.launch --config=NAME [--config.key=value ...]``.

``NAME`` is a packaged config (``dgpo_nq``, ``quickstart``, ...; see ``dgpo_jax/configs/``) or a
path to a config file. Modes (``config.mode``): ``train`` (any objective preset), ``coldstart``
(teacher rollouts + KD), ``eval``, ``export``, ``plan`` (bytes per device, compiled ahead of
time), ``quickstart`` (the embedded CPU demo), ``compare`` (methods over seeds with confidence
intervals). A config error (an unknown field, a value of the
wrong type or out of range, a missing file) prints ``error: ...`` and exits with status 2;
``--debug`` (or ``DGPO_DEBUG=1``) shows the traceback. With several processes
(``JAX_COORDINATOR_ADDRESS`` or a TPU pod / SLURM environment) ``jax.distributed.initialize``
runs first. ``--print_config`` prints the config and the resolved objective and curriculum, and
exits.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

import jax

from dgpo_jax.config import (
    ConfigError,
    available_configs,
    build_curriculum,
    build_objective,
    load_config,
    validate,
)
from dgpo_jax.errors import run_cli
from dgpo_jax.launch import coldstart, compare, evaluate, export, plan, quickstart, train
from dgpo_jax.parallel.distributed import initialize_from_env

MODES = {
    "train": train.run_train,
    "coldstart": coldstart.run_coldstart,
    "eval": evaluate.run_eval,
    "export": export.run_export,
    "plan": plan.run_plan,
    "quickstart": quickstart.run_quickstart,
    "compare": compare.run_compare,
}


def use_fake_devices(count: int) -> None:
    """``plan`` mode on a machine without the target mesh: N fake CPU devices. Must run before
    JAX initialises a backend (XLA reads the flag once)."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    flags_now = " ".join(
        f for f in flags_now.split() if not f.startswith("--xla_force_host_platform_device_count")
    )
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


def enable_compilation_cache() -> None:
    """Persist compiled programs across runs (``DGPO_JAX_COMPILATION_CACHE``, default
    ``~/.cache/dgpo_jax/xla``; empty to disable): a second run of the same config skips most
    compilation."""
    path = os.environ.get(
        "DGPO_JAX_COMPILATION_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "dgpo_jax", "xla"),
    )
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def run(cfg) -> object:
    """Validate ``cfg`` and run its mode."""
    validate(cfg)
    return MODES[cfg.mode](cfg)


def describe(cfg) -> str:
    """The config as the run will use it: every field, then the objective and curriculum with
    the preset's values filled in."""
    text = str(cfg)
    if cfg.mode in ("train", "plan", "coldstart"):
        text += f"\n# resolved objective\n{build_objective(cfg)}\n"
        text += f"# resolved curriculum\n{build_curriculum(cfg)}\n"
    return text


def main(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(f"packaged configs: {', '.join(available_configs())}")
        return 0
    flags_left = [a for a in argv[1:] if a not in ("--debug", "--print_config")]
    cfg, rest = load_config([argv[0]] + flags_left)
    if len(rest) > 1:
        raise ConfigError(
            f"unexpected arguments: {rest[1:]} (settings are --config.SECTION.FIELD=VALUE)"
        )
    if "--print_config" in argv:  # before validation: it shows what a failing config holds
        print(describe(cfg))
        return 0
    # force: imported libraries (absl) may have put a handler on the root logger already
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if cfg.mode == "plan" and cfg.plan.fake_devices:
        use_fake_devices(cfg.plan.fake_devices)
    enable_compilation_cache()
    if cfg.mode != "plan":
        initialize_from_env()
    result = run(cfg)
    if isinstance(result, dict) and "final_eval" in result:
        print(json.dumps({"final_eval": result["final_eval"]}, indent=1))
    return 0


def run_main(argv: Sequence[str] | None = None) -> None:
    """The console entry point: the project's own errors (config, data, model files,
    checkpoints, retrieval) as one ``error:`` line plus a ``hint:``, exit status 2
    (`dgpo_jax.errors.run_cli`); other exceptions keep their traceback."""
    argv = list(sys.argv if argv is None else argv)
    run_cli(lambda args: main([argv[0], *args]), argv[1:])
