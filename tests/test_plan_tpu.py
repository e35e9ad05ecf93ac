"""The memory plan for a TPU target, compiled on this CPU host by the TPU compiler (libtpu): the
tiny update step on a v5e 2x2 slice, with splash attention inside, and without it."""

import importlib.util

import jax
import pytest

from dgpo_jax.config import base_config
from dgpo_jax.launch.plan import TPU_KINDS, build_memory_plan

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (install the tpu extra: pip install -e '.[tpu]'); "
    "TPU targets compile with the TPU compiler it holds",
)

if not jax._src.xla_bridge.backends_are_initialized():
    # The TPU devices are libtpu's compile-only topology; this host computes on its CPU.
    jax.config.update("jax_platforms", "cpu")


def tiny_tpu_config(tmp_path, attention: str, target="tpu:v5e-4", programs="update"):
    """The tiny DGPO step's plan config for a compile-only target (tests/test_plan_gpu.py
    uses it for GPUs)."""
    cfg = base_config()
    cfg.mode, cfg.workdir = "plan", str(tmp_path)
    cfg.objective.preset = "dgpo"
    cfg.model.student, cfg.model.teacher = "preset:tiny", "preset:tiny-teacher"
    cfg.model.attention = attention
    cfg.data.batch_size, cfg.train.mini_batch_size, cfg.train.micro_batch_size = 8, 8, 4
    cfg.train.pack = False
    cfg.sampler.cache_len, cfg.sampler.max_prompt_length = 256, 64
    cfg.plan.target = target
    cfg.plan.programs = programs
    return cfg


def test_tiny_update_step_compiles_for_v5e_with_splash(tmp_path):
    splash = build_memory_plan(tiny_tpu_config(tmp_path, "splash"))
    assert splash.compiler.startswith("the TPU compiler (libtpu")
    assert splash.devices == 4 and splash.device_kind == "TPU v5 lite"
    assert splash.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert list(splash.programs) == ["update (mini-batch)"]
    update = splash.programs["update (mini-batch)"]
    assert "tpu_custom_call" in update.kernels  # the Pallas splash kernel, forward and backward
    assert update.temporaries > 0 and update.flops > 0 and update.xla_flops > 0
    # v5e: 16 GiB of HBM per chip (the fit check's default) and 197 TFLOP/s of bf16; the step
    # runs the update once (one mini-batch), every row full (unpacked), on 4 chips.
    assert splash.device_memory == 16 * 1024**3 and splash.fits
    assert update.calls == 1 and update.occupancy == 1.0
    assert splash.ideal_step_seconds == pytest.approx(
        update.flops / (4 * TPU_KINDS["v5e"].peak_tflops * 1e12)
    )
    # The materialised reference has no Pallas kernel inside: the kernel list can tell them
    # apart.
    xla = build_memory_plan(tiny_tpu_config(tmp_path, "xla"))
    assert "tpu_custom_call" not in xla.programs["update (mini-batch)"].kernels


def test_rollout_compiles_for_v5e_on_both_decode_paths(tmp_path):
    """The sampler's accelerator path (stacked layers in a scan, all rows stepped with a mask,
    one static key window per loop, the Pallas chunk kernels) compiles for a TPU slice, and
    needs fewer temporaries than the cpu path (a split copy of the layer weights, rows gathered
    out of the cache)."""
    temporaries = {}
    for path in ("accelerator", "cpu"):
        cfg = tiny_tpu_config(tmp_path, "xla")
        cfg.plan.programs = "rollout"
        cfg.sampler.decode_path = path
        plan = build_memory_plan(cfg)
        assert list(plan.programs) == ["rollout"]
        temporaries[path] = plan.programs["rollout"].temporaries
        # the prefill of all rows (and on the accelerator path the ingest steps): the Pallas
        # chunk kernels, under shard_map on the 4 chips' rows
        assert "tpu_custom_call" in plan.programs["rollout"].kernels, path
    assert 0 < temporaries["accelerator"] < temporaries["cpu"]
    cfg.sampler.chunk_attention = "xla"  # (the cpu path's config: its prefill by XLA now)
    assert "tpu_custom_call" not in build_memory_plan(cfg).programs["rollout"].kernels
