"""The memory plan for GPU targets, compiled on this host by XLA:GPU without a GPU (JAX's CUDA
plugin, the gpu extra): the tiny DGPO step's programs for two H100s, the rollout included
(its host callback stubbed for the compile, `plan.host_calls_stubbed`)."""

import jax
import pytest

from dgpo_jax.launch.plan import build_memory_plan, cuda_plugin_installed
from tests.test_plan_tpu import tiny_tpu_config  # the same tiny step, another target

pytestmark = pytest.mark.skipif(
    not cuda_plugin_installed(),
    reason="JAX's CUDA plugin is not installed (the gpu extra, in an environment of its own: "
    "pip install -e '.[gpu]'); GPU targets compile with XLA:GPU, which it holds",
)

if not jax._src.xla_bridge.backends_are_initialized():
    # The GPUs are compile-only devices; this host computes on its CPU.
    jax.config.update("jax_platforms", "cpu")


def test_tiny_step_compiles_for_two_h100s(tmp_path):
    cfg = tiny_tpu_config(tmp_path, "auto", target="gpu:h100-2", programs="rollout,update")
    plan = build_memory_plan(cfg)
    assert plan.compiler.startswith("XLA:GPU without a GPU")
    assert plan.devices == 2 and plan.device_kind.startswith("NVIDIA H100")
    assert plan.target == "gpu:h100-2" and plan.platform == "gpu"
    assert list(plan.programs) == ["rollout", "update (mini-batch)"]
    for program in plan.programs.values():
        assert program.temporaries > 0 and program.live > 0
    # 79.6 GiB a device (the HBM an H100 reports) unless plan.device_memory_gib says otherwise
    assert plan.device_memory == int(79.6 * 2**30) and plan.fits is True
    assert plan.peak_tflops == 989.0


def test_rollout_compiles_the_triton_chunk_kernel_for_gpus(tmp_path):
    """The sampler's accelerator path for two H200s: ``chunk_attention="pallas"`` and
    ``decode_attention="fused"`` compile the prefill's and ingest steps' attention and the
    decode steps' rotary, cache writes and attention as Triton kernels (XLA:GPU's Triton custom
    calls, under shard_map on each GPU's rows); the defaults keep XLA's attention on GPUs."""
    kernels = {}
    for choice in ("pallas", "auto"):
        cfg = tiny_tpu_config(tmp_path, "xla", target="gpu:h200-2", programs="rollout")
        cfg.sampler.decode_path = "accelerator"
        cfg.sampler.chunk_attention = choice
        cfg.sampler.decode_attention = "fused" if choice == "pallas" else "xla"
        kernels[choice] = build_memory_plan(cfg).programs["rollout"].kernels
    assert "__gpu$xla.gpu.triton" in kernels["pallas"]
    assert "__gpu$xla.gpu.triton" not in kernels["auto"]
