"""The launcher: ``python -m dgpo_jax.launch --config=configs/NAME.py [--config.key=value ...]``.

Modes (``config.mode``): ``train`` (any objective preset), ``coldstart`` (teacher rollouts +
KD), ``eval``, ``export``, ``plan`` (bytes per device, compiled ahead of time: see
``dgpo_jax.memory_plan``), ``quickstart`` (the embedded CPU demo). Unknown keys and wrongly
typed values are rejected by ml_collections; ``dgpo_jax.run_config.validate`` checks choices
and paths before anything heavy starts. With several processes (``JAX_COORDINATOR_ADDRESS``
or a TPU pod / SLURM environment) ``jax.distributed.initialize`` runs first.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def maybe_initialize_distributed() -> None:
    """Multi-process runs: initialise JAX's distributed runtime when the environment says so
    (see ``dgpo_jax.distributed``)."""
    from dgpo_jax.distributed import initialize_from_env
    initialize_from_env()


def use_fake_devices(count: int) -> None:
    """``plan`` mode on a machine without the target mesh: N fake CPU devices. Must run before
    JAX initialises a backend (XLA reads the flag once)."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    flags_now = " ".join(f for f in flags_now.split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_platforms", "cpu")


def enable_compilation_cache() -> None:
    """Persist compiled programs across runs (``DGPO_JAX_COMPILATION_CACHE``, default
    ``~/.cache/dgpo_jax/xla``): a second run of the same config skips most compilation."""
    import jax
    path = os.environ.get("DGPO_JAX_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "dgpo_jax", "xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def run(cfg) -> object:
    from dgpo_jax.run_config import validate
    validate(cfg)
    if cfg.mode == "quickstart":
        from dgpo_jax.quickstart import run_quickstart
        return run_quickstart(cfg)
    if cfg.mode == "plan":
        from dgpo_jax.memory_plan import run_plan
        return run_plan(cfg)
    from dgpo_jax.training import loop
    return {"train": loop.run_train, "coldstart": loop.run_coldstart, "eval": loop.run_eval,
            "export": loop.run_export}[cfg.mode](cfg)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = _CONFIG.value
    if cfg.mode == "plan" and cfg.plan.fake_devices:
        use_fake_devices(cfg.plan.fake_devices)
    enable_compilation_cache()
    if cfg.mode != "plan":
        maybe_initialize_distributed()
    result = run(cfg)
    if isinstance(result, dict) and "final_eval" in result:
        print(json.dumps({"final_eval": result["final_eval"]}, indent=1))


if __name__ == "__main__":
    app.run(main)
