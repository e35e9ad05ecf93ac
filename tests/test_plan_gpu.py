"""The memory plan for GPU targets, compiled on this host by XLA:GPU without a GPU (JAX's CUDA
plugin, the gpu extra): the tiny DGPO step's programs for two H100s, the rollout included
(its host callback stubbed for the compile, `plan.host_calls_stubbed`)."""

import importlib.util

import jax
import pytest

from dgpo_jax.config import base_config
from dgpo_jax.launch.plan import build_memory_plan, cuda_plugin_installed

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax_plugins") is None or not cuda_plugin_installed(),
    reason="JAX's CUDA plugin is not installed (the gpu extra, in an environment of its own: "
    "pip install -e '.[gpu]'); GPU targets compile with XLA:GPU, which it holds",
)

if not jax._src.xla_bridge.backends_are_initialized():
    # The GPUs are compile-only devices; this host computes on its CPU.
    jax.config.update("jax_platforms", "cpu")


def tiny_gpu_config(tmp_path, programs: str):
    cfg = base_config()
    cfg.mode, cfg.workdir = "plan", str(tmp_path)
    cfg.objective.preset = "dgpo"
    cfg.model.student, cfg.model.teacher = "preset:tiny", "preset:tiny-teacher"
    cfg.data.batch_size, cfg.train.mini_batch_size, cfg.train.micro_batch_size = 8, 8, 4
    cfg.train.pack = False
    cfg.sampler.cache_len, cfg.sampler.max_prompt_length = 256, 64
    cfg.plan.target = "gpu:h100-2"
    cfg.plan.programs = programs
    return cfg


def test_tiny_step_compiles_for_two_h100s(tmp_path):
    plan = build_memory_plan(tiny_gpu_config(tmp_path, "rollout,update"))
    assert plan.compiler.startswith("XLA:GPU without a GPU")
    assert plan.devices == 2 and plan.device_kind.startswith("NVIDIA H100")
    assert plan.target == "gpu:h100-2" and plan.platform == "gpu"
    assert list(plan.programs) == ["rollout", "update (mini-batch)"]
    for program in plan.programs.values():
        assert program.temporaries > 0 and program.live > 0
    # 79.6 GiB a device (the HBM an H100 reports) unless plan.device_memory_gib says otherwise
    assert plan.device_memory == int(79.6 * 2**30) and plan.fits is True
    assert plan.peak_tflops == 989.0
