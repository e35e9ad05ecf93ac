"""The memory plan: bytes per device of every program of one RL step, found ahead of time.

``python -m dgpo_jax.launch --config=configs/dgpo_nq.py --config.mode=plan
--config.model.student=preset:qwen2.5-0.5b --config.model.teacher=preset:qwen2.5-3b
--config.plan.fake_devices=8``

Nothing is allocated: every model is abstract (``jax.ShapeDtypeStruct`` leaves carrying their
shardings on the configured mesh), and each program the training loop runs is compiled ahead of
time for that mesh from the same jitted function the loop calls (``.lower(...).compile()``):

* ``rollout``: the sampler's one compiled program (``dgpo_jax.sampler.loop.rollout_program``:
  prefill, the decode loops and observation ingestion, with the student's KV cache and, for
  Guided-OPD, the teacher's), over the whole rollout batch; ``rollout (teacher)`` when the
  teacher samples (KD data, TrOPD prefixes);
* ``score: ...``: the behaviour (and reference) log-prob passes (``sequence_logprobs``) over
  the whole batch, micro-batched;
* ``prepare (whole batch)``: ``UpdateStep.prepare_rollout``'s program (values, teacher
  log-probs, advantages over the whole batch) when a step makes more than one update;
* ``update (mini-batch)``: the fused update step for one PPO mini-batch
  (``UpdateStep.compile``, the program training runs);
* ``loss (validation)``: DistiLLM's validation loss, where the curriculum uses it;
* ``eval: ...``: the evaluation rollouts (one program per decoding), ``eval.batch_size`` rows.

Each program's bytes per device come from ``compiled.memory_analysis()`` (arguments,
temporaries, outputs, aliased), its FLOPs from ``compiled.cost_analysis()``. The resident
state (every model's parameters, the optimizer state) lives through the whole step; the peak
is the resident state plus the largest program's bytes beyond it (its arguments that are not
resident state -- batch, prompts, a compute-dtype copy of the policy -- + temporaries + outputs
that do not reuse a donated argument).

Targets: the configured mesh on this process's devices (``plan.fake_devices=N``: N fake CPU
devices, compiled by XLA:CPU, GPU-shaped), ``plan.target=tpu:v5e-16`` (v4, v5e, v5p, v6e):
the programs compiled by the TPU compiler (libtpu, the ``tpu`` extra) for that topology on this
host (``jax.experimental.topologies``), or ``plan.target=gpu:h100-8`` (h100, h200): compiled by
XLA:GPU for N GPUs on this host without one (JAX's CUDA plugin, the ``gpu`` extra; a
deviceless compile given `gpu_target_config`); bytes per chip, and the step's FLOPs as an ideal
step time at the chip's bf16 peak. ``WORKDIR/memory_plan.json`` gets the figures; the command exits
non-zero, naming the program, when the peak exceeds ``plan.device_memory_gib`` (for a TPU
target: the chip's HBM unless given). docs/scaleout.md has the figures and how to read them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

try:
    from jax.extend.core import jaxprs_in_params
except ImportError:  # not exported by every JAX release: the same walk over a primitive's params
    from jax.extend.core import ClosedJaxpr, Jaxpr

    def jaxprs_in_params(params):
        for value in params.values():
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, Jaxpr):
                    yield v
                elif isinstance(v, ClosedJaxpr):
                    yield v.jaxpr


from dgpo_jax.checkpoint.checkpointer import Checkpointer
from dgpo_jax.checkpoint.fileio import write_text_atomically
from dgpo_jax.checkpoint.params import model_source_kind
from dgpo_jax.config import (
    ConfigError,
    build_curriculum,
    build_objective,
    optim_config,
    parse_rules,
    sampler_config,
)
from dgpo_jax.curricula.config import needs_teacher_model
from dgpo_jax.errors import ModelFormatError
from dgpo_jax.learner.batches import SEQ_MULTIPLE, micro_batches, on_policy_update
from dgpo_jax.learner.update_step import abstract_update_state, make_update_step
from dgpo_jax.models import Qwen2Config, cast_params, get_preset, param_shapes, resolve_kernel
from dgpo_jax.models.qwen2 import KVCache, init_cache
from dgpo_jax.objectives.batch import abstract_batch, batch_requirements
from dgpo_jax.parallel.sharding import DEFAULT_RULES, ShardingPlan, plan_from_config
from dgpo_jax.sampler.host import prompt_widths

log = logging.getLogger(__name__)
GiB = 1024**3
MiB = 1024**2


# ------------------------------------------------------------------------------ TPU targets ---
@dataclass(frozen=True)
class TpuKind:
    """A TPU generation: libtpu's topology prefix, what the slice name's number counts, the bf16
    dense peak (TFLOP/s per chip), the HBM per chip (GiB) and its bandwidth (bytes/s)."""

    name: str
    counts: str  # "chips" (v5e-16 = 16 chips) or "cores" (v5p-16 = 8 chips of 2 TensorCores)
    peak_tflops: float
    hbm_gib: float
    dims: int  # 2: an X x Y torus; 3: X x Y x Z
    hbm_bytes_s: float = 0.0


# Public figures (cloud.google.com/tpu/docs, each generation's page: per chip, bf16 dense).
TPU_KINDS = {
    "v4": TpuKind("v4", "cores", 275.0, 32.0, 3, 1200e9),
    "v5e": TpuKind("v5e", "chips", 197.0, 16.0, 2, 819e9),
    "v5p": TpuKind("v5p", "cores", 459.0, 95.0, 3, 2765e9),
    "v6e": TpuKind("v6e", "chips", 918.0, 32.0, 2, 1638e9),
}
KNOWN_TARGETS = (
    "tpu:v4-N (N TensorCores: 8, 16, 32, ...), tpu:v5e-N (N chips: 4, 8, 16, ..., 256), "
    "tpu:v5p-N (N TensorCores: 8, 16, ...), tpu:v6e-N (N chips: 4, 8, ..., 256), "
    "tpu:KIND:TOPOLOGY (e.g. tpu:v5e:4x4, tpu:v5p:2x2x2), or gpu:h100-N / gpu:h200-N (N GPUs: "
    "1 to 8 on one host, or a multiple of 8 over hosts of 8)"
)


@dataclass(frozen=True)
class GpuKind:
    """An NVIDIA GPU XLA:GPU can compile for without one (a deviceless compile): its name as
    the device reports it, the bf16 dense peak (TFLOP/s), the HBM (GiB) and bandwidth (B/s)."""

    name: str
    device: str
    peak_tflops: float
    hbm_gib: float
    hbm_bytes_s: float


# Datasheet figures (SXM); the HBM as the devices report it (81559 and 143771 MiB).
GPU_KINDS = {
    "h100": GpuKind("h100", "NVIDIA H100 80GB HBM3", 989.0, 79.6, 3.35e12),
    "h200": GpuKind("h200", "NVIDIA H200", 989.0, 140.4, 4.8e12),
}


def gpu_target_config(kind: GpuKind) -> str:
    """XLA's ``GpuTargetConfigProto`` (text) for ``kind``: what XLA:GPU needs to compile without
    the device. Hopper's figures (132 SMs, compute capability 9.0), as XLA's own deviceless
    tests describe an H100 SXM; the H200 is the same die with more, faster HBM."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(kind.hbm_bytes_s)}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {int(kind.hbm_gib * 2**30)}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{kind.device}"
"""


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin is installed (the ``gpu`` extra): XLA:GPU compiles with it,
    a GPU or not."""
    if importlib.util.find_spec("jax_plugins") is None:  # the plugins' namespace package
        return False
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))


def _grid(chips: int, dims: int) -> str:
    """The most even power-of-two torus of ``chips`` chips, as Cloud TPU names them: 16 -> 4x4
    (2-D), 8 -> 2x2x2, 4 -> 2x2x1 (a side of 1 last: libtpu rejects 1x2x2, which is not a
    multiple of a host's 2x2x1 chips)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips is not a power of two")
    sides = [1] * dims
    for i in range(int(math.log2(chips))):
        sides[i % dims] *= 2
    return "x".join(str(s) for s in sorted(sides, key=lambda side: (side == 1, side)))


@dataclass(frozen=True)
class Target:
    """Where the programs are compiled for: this process's devices, a TPU topology, or GPUs."""

    name: str  # "" = local devices
    kind: TpuKind | GpuKind | None = None
    topology: str = ""  # libtpu's name, e.g. "v5e:4x4"; XLA:GPU's "slices x hosts x GPUs"

    @property
    def is_tpu(self) -> bool:
        return isinstance(self.kind, TpuKind)

    @property
    def is_gpu(self) -> bool:
        return isinstance(self.kind, GpuKind)

    @property
    def compile_only(self) -> bool:
        """Compiled for devices this host does not have (JAX itself runs on the CPU)."""
        return self.kind is not None


def parse_target(text: str) -> Target:
    """``""`` (local devices), ``tpu:v5e-16`` or ``tpu:v5e:4x4``. A name outside the known
    kinds and sizes is a ValueError listing the known ones."""
    text = (text or "").strip()
    if not text:
        return Target("")
    gpu = re.fullmatch(r"gpu:([a-z0-9]+)-(\d+)", text)
    if gpu:
        kind, count = GPU_KINDS.get(gpu.group(1)), int(gpu.group(2))
        if kind is None or count < 1 or (count > 8 and count % 8):
            raise ConfigError(f"plan.target={text!r} is not a GPU target; known: {KNOWN_TARGETS}")
        return Target(text, kind, f"1x{max(count // 8, 1)}x{min(count, 8)}")
    match = re.fullmatch(r"tpu:(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", text)
    kind = TPU_KINDS.get(match.group(1)) if match else None
    if kind is None:
        raise ConfigError(
            f"plan.target={text!r} is not a TPU target libtpu knows; known: {KNOWN_TARGETS}"
        )
    if match.group(3):
        return Target(text, kind, f"{kind.name}:{match.group(3)}")
    count = int(match.group(2))
    chips = count // 2 if kind.counts == "cores" else count
    try:
        grid = _grid(chips, kind.dims)
    except ValueError:
        grid = ""
    if not grid or chips < 4:
        raise ConfigError(
            f"plan.target={text!r}: {count} {kind.counts} is not a {kind.name} slice size; "
            f"known: {KNOWN_TARGETS}"
        )
    return Target(text, kind, f"{kind.name}:{grid}")


def target_devices(target: Target) -> list:
    """The devices of ``target``: a TPU topology's (compile-only; needs libtpu), GPUs'
    (compile-only; needs the CUDA plugin, no GPU), else the local ones."""
    if target.is_gpu:
        return _gpu_devices(target)
    if not target.is_tpu:
        return jax.devices()
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            f"plan.target={target.name!r} compiles with the TPU compiler, which needs libtpu: "
            "install the tpu extra (pip install -e '.[tpu]')"
        )
    # Compile-only: no chip is opened, so other processes using libtpu (its lockfile) do not
    # conflict.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # noqa: PLC0415 (only for TPU targets)

    try:
        return list(topologies.get_topology_desc(target.topology, "tpu").devices)
    except Exception as error:  # libtpu's errors are runtime errors with its own text
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"plan.target={target.name!r} (topology {target.topology}): libtpu says: {first}; "
            f"known: {KNOWN_TARGETS}"
        ) from None


def _gpu_devices(target: Target) -> list:
    if not cuda_plugin_installed():
        raise ConfigError(
            f"plan.target={target.name!r} compiles with XLA:GPU, which needs JAX's CUDA plugin "
            "(no GPU): install the gpu extra, in an environment of its own on a machine "
            "without GPUs (pip install -e '.[gpu]')"
        )
    from jax.experimental import topologies  # noqa: PLC0415 (only for compile-only targets)

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(target.kind), topology=target.topology
        )
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"plan.target={target.name!r}: the CUDA plugin says: {first}; known: {KNOWN_TARGETS}"
        ) from None
    return list(topology.devices)


def libtpu_version() -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("libtpu")
    except Exception:
        return "unknown"


# ------------------------------------------------------------------------------- counting ---
def bytes_per_device(tree) -> int:
    """Bytes one device holds for a tree of arrays / ``ShapeDtypeStruct`` with shardings (the
    largest shard of each leaf; leaves without a sharding count whole)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        dtype = leaf.dtype
        itemsize = 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else dtype.itemsize
        total += math.prod(shape) * itemsize
    return total


def abstract_params(config: Qwen2Config, dtype, plan) -> dict:
    """The parameter tree as ``ShapeDtypeStruct`` leaves placed by ``plan`` (nothing allocated)."""
    shapes = param_shapes(config, jnp.dtype(dtype))
    shardings = plan.param_shardings(config)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def abstract_cache(config: Qwen2Config, batch: int, slots: int, dtype, plan) -> KVCache:
    """The sampler's KV cache for ``batch`` rows and ``slots`` positions, sharded as the sampler
    constrains it (batch over the data axes, kv heads over tensor)."""
    cache = jax.eval_shape(lambda: init_cache(config, batch, slots, jnp.dtype(dtype)))
    kv_names = ("layers", "batch", "act_kv_heads", "cache_seq", "head_dim")

    def place(x, names):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=plan.sharding(names, x.shape))

    return cache.replace(
        k=place(cache.k, kv_names),
        v=place(cache.v, kv_names),
        valid=place(cache.valid, ("batch", None)),
        end=place(cache.end, ("batch",)),
        next_pos=place(cache.next_pos, ("batch",)),
    )


def model_config_from_source(source: str, role: str) -> Qwen2Config:
    """The architecture of a model source without reading its weights: ``preset:NAME`` (the
    preset's own vocabulary), a HF directory's ``config.json``, or a dgpo_jax checkpoint's
    metadata."""
    kind = model_source_kind(source, role)
    if kind == "preset":
        return get_preset(source[len("preset:") :])
    if kind == "hf":
        hf_config = os.path.join(source, "config.json")
        with open(hf_config) as f:
            return Qwen2Config.from_hf_dict(json.load(f), source=hf_config)
    with Checkpointer(source) as ckpt:
        metadata = ckpt.restore_metadata(None)
    if "model_config" not in metadata:
        raise ModelFormatError(f"{role} {source!r}: checkpoint metadata has no 'model_config'")
    return Qwen2Config.from_hf_dict(metadata["model_config"], source=f"{source} metadata")


# ---------------------------------------------------------------------------------- plan ---
@dataclass
class ProgramPlan:
    """One compiled program: bytes per device from ``memory_analysis``; FLOPs of one call over
    all devices from its traced program with loop trip counts (``jaxpr_flops``), and XLA's
    ``cost_analysis`` per device (every loop body counted once)."""

    name: str
    function: str  # the jitted Python function compiled, as jax names it ("rollout_program")
    arguments: int
    temporaries: int
    outputs: int
    aliased: int  # outputs written into donated arguments
    inputs: int  # bytes of its arguments that are not resident state (batch, prompts, copies)
    flops: float  # matmul FLOPs of one call, all devices (jaxpr_flops)
    calls: int  # times one RL step runs it (0: not every step, e.g. evaluation)
    note: str = ""
    compile_seconds: float = 0.0
    same_as: str = ""  # the program it is (the same compiled program, other arguments)
    kernels: list = field(default_factory=list)  # custom calls inside (Pallas kernels, libraries)
    occupancy: float = 1.0  # of its micro-batches, the share a step is expected to fill
    refused: str = ""  # the compiler's refusal (TPU: temporaries above the chip's HBM)
    xla_flops: float = 0.0  # compiled.cost_analysis()["flops"], per device, loop bodies once

    @property
    def live(self) -> int:
        """Bytes per device while it runs, beyond the resident state."""
        return self.inputs + self.temporaries + self.outputs - self.aliased

    def to_dict(self) -> dict:
        return dict(asdict(self), live=self.live)


@dataclass
class MemoryPlan:
    """Bytes per device of the resident state and of each program; the peak."""

    mesh: dict
    devices: int
    platform: str
    compiler: str
    target: str = ""
    device_kind: str = ""
    devices_per_chip: int = 1
    components: dict = field(default_factory=dict)  # resident state: name -> bytes per device
    notes: dict = field(default_factory=dict)  # component name -> what was counted
    programs: dict = field(default_factory=dict)  # name -> ProgramPlan
    assumptions: dict = field(default_factory=dict)  # the shapes the programs were compiled for
    device_memory: int = 0  # bytes per device available (0 = unknown)
    peak_tflops: float = 0.0  # bf16 peak per chip, for the ideal step time (0 = unknown)

    @property
    def resident(self) -> int:
        return sum(self.components.values())

    @property
    def peak_program(self) -> str:
        return max(self.programs.values(), key=lambda p: p.live).name if self.programs else ""

    @property
    def peak(self) -> int:
        return self.resident + max((p.live for p in self.programs.values()), default=0)

    @property
    def fits(self) -> bool | None:
        if any(p.refused for p in self.programs.values()):
            return False
        return None if not self.device_memory else self.peak <= self.device_memory

    def _flops(self, expected: bool) -> float:
        return sum(
            p.flops * p.calls * (p.occupancy if expected else 1.0)
            for p in self.programs.values()
            if p.function != "rollout_program"
        )

    @property
    def step_flops(self) -> float:
        """Matmul FLOPs of one RL step's dense programs over all devices, as compiled (every
        micro-batch full): scoring, whole-batch pass and updates, each times its calls per
        step. Rollouts are left out: their decode loops are ``while`` loops whose trip count
        is not known before they run."""
        return self._flops(expected=False)

    @property
    def expected_step_flops(self) -> float:
        """``step_flops`` counting only the micro-batches that hold tokens at the plan's
        real-token estimate (packed batches skip the empty ones)."""
        return self._flops(expected=True)

    def ideal_seconds(self, flops: float) -> float | None:
        """``flops`` at the chips' bf16 peak."""
        if not self.peak_tflops:
            return None
        chips = self.devices / self.devices_per_chip
        return flops / (chips * self.peak_tflops * 1e12)

    @property
    def ideal_step_seconds(self) -> float | None:
        return self.ideal_seconds(self.expected_step_flops)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["programs"] = {k: p.to_dict() for k, p in self.programs.items()}
        out.update(
            resident=self.resident,
            peak=self.peak,
            peak_program=self.peak_program,
            peak_per_chip=self.peak * self.devices_per_chip,
            fits=self.fits,
            step_flops=self.step_flops,
            expected_step_flops=self.expected_step_flops,
            ideal_step_seconds=self.ideal_step_seconds,
            ideal_full_step_seconds=self.ideal_seconds(self.step_flops),
        )
        return out

    def table(self) -> str:
        unit = "chip" if self.target else "device"
        scale = self.devices_per_chip
        where = f"{self.devices} {self.platform} devices"
        if self.target:
            where = f"{self.target} ({self.devices} x {self.device_kind})"
        names = list(self.components) + list(self.programs)
        width = max([len(k) for k in names] + [20]) + 2
        lines = [
            f"memory plan per {unit}: mesh {self.mesh} over {where}, compiled by {self.compiler}"
        ]
        lines.append("  resident state")
        for name, b in self.components.items():
            note = self.notes.get(name, "")
            lines.append(f"    {name.ljust(width)}{_fmt(b * scale):>11}  {note}")
        lines.append(f"    {'= resident'.ljust(width)}{_fmt(self.resident * scale):>11}")
        head = ("arguments", "temporaries", "outputs", "+resident", "TFLOP/call")
        lines.append("  programs" + " " * (width - 4) + "".join(f"{h:>12}" for h in head))
        for p in self.programs.values():
            cols = (p.arguments, p.temporaries, p.outputs - p.aliased, self.resident + p.live)
            row = "".join(f"{_fmt(c * scale):>12}" for c in cols)
            row += f"{p.flops / 1e12:>12.4g}"
            mark = "  <- peak" if p.name == self.peak_program else ""
            mark += "  REFUSED by the compiler (temporaries only)" if p.refused else ""
            lines.append(f"    {p.name.ljust(width)}{row}{mark}")
        lines.append(
            f"  PEAK {_fmt(self.peak * scale)} per {unit}: the resident state + "
            f"{self.peak_program} (outputs: beyond donated arguments; +resident: the peak while "
            "it runs)"
        )
        if self.device_memory:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(
                f"  {unit} memory {_fmt(self.device_memory * scale)}: {verdict} "
                f"({self.peak / self.device_memory:.0%} used)"
            )
        if self.ideal_step_seconds is not None:
            lines.append(
                f"  step (scoring, whole-batch pass, updates; rollouts not counted): "
                f"{self.expected_step_flops / 1e12:.1f} TFLOP at the real-token estimate = "
                f"{self.ideal_step_seconds:.2f} s at {self.peak_tflops:g} TFLOP/s per chip "
                f"(ideal); {self.step_flops / 1e12:.1f} TFLOP = "
                f"{self.ideal_seconds(self.step_flops):.2f} s with every row full"
            )
        lines.append("  compiled for")
        lines += [f"    {p.name}: {p.note}" for p in self.programs.values() if p.note]
        lines += [f"    {k}: {v}" for k, v in self.assumptions.items()]
        return "\n".join(lines)


def _fmt(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _flops(compiled) -> float:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend answers
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def jaxpr_flops(jaxpr) -> float:
    """Matrix-multiply FLOPs of a (traced, global-shape) jaxpr, loops counted with their trip
    counts: ``dot_general`` = 2 x output elements x contracted size; a ``scan`` (``lax.map``,
    the layer scan, micro-batch loops) times its length; a ``cond`` its costliest branch; a
    Pallas kernel its body times its grid; a ``shard_map`` body (per-shard shapes) times its
    shards; a ``while`` loop's body once (its trip count is not known before it runs).
    ``compiled.cost_analysis()`` counts every loop body once, so it cannot say what a step
    costs."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            out = eqn.outvars[0].aval
            total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
        elif name == "scan":
            total += params["length"] * jaxpr_flops(params["jaxpr"])
        elif name == "while":
            total += jaxpr_flops(params["body_jaxpr"]) + jaxpr_flops(params["cond_jaxpr"])
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in params["branches"])
        elif name == "pallas_call":
            grid = getattr(params.get("grid_mapping"), "grid", ()) or ()
            total += math.prod(int(g) for g in grid) * jaxpr_flops(params["jaxpr"])
        elif name == "shard_map":
            mesh, axes = params["mesh"], params.get("manual_axes", ())
            shards = math.prod(mesh.shape[a] for a in axes) if axes else mesh.size
            total += shards * jaxpr_flops(params["jaxpr"])
        else:  # pjit, remat / checkpoint, custom_vjp / custom_jvp calls: their inner jaxpr
            total += sum(jaxpr_flops(inner) for inner in jaxprs_in_params(params))
    return total


def _kernels(compiled) -> list[str]:
    """Custom-call targets of a program compiled for a TPU (``tpu_custom_call``: a Pallas
    kernel such as splash attention) or a GPU (``__gpu$xla.gpu.triton``: a Pallas Triton
    kernel; cuDNN, cuBLAS calls); [] on CPUs (the XLA:CPU text of a large program is slow to
    print)."""
    try:
        sharding = jax.tree.leaves(compiled.input_shardings)[0]
        if next(iter(sharding.device_set)).platform not in ("tpu", "gpu"):
            return []
    except (IndexError, AttributeError, StopIteration, TypeError):
        return []
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))


@dataclass
class Compiler:
    """How this plan compiles: extra XLA options (XLA:CPU: LLVM's optimisation level, which
    changes the generated code but not the buffers, so compiles are cheaper and the bytes the
    same)."""

    options: dict | None = None

    def measure(self, name, function, lowered, inputs, calls, note="", flops=0.0) -> ProgramPlan:
        """Compile ``lowered`` (a ``jax.stages.Lowered``, or a function returning the compiled
        program) and read its analyses. A program the TPU compiler refuses because its
        temporaries exceed the chip's HBM is recorded with the bytes the compiler names."""
        t0 = time.perf_counter()
        try:
            if callable(lowered):
                compiled = lowered()
            else:
                compiled = lowered.compile(self.options) if self.options else lowered.compile()
        except Exception as error:  # jax's runtime errors carry the compiler's status text
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            return refused_program(name, function, str(error), inputs, calls, note, flops)
        seconds = time.perf_counter() - t0
        return self.read(name, function, compiled, inputs, calls, note, seconds, flops)

    @staticmethod
    def read(
        name, function, compiled, inputs, calls, note="", seconds=0.0, flops=0.0
    ) -> ProgramPlan:
        stats = compiled.memory_analysis()
        if stats is None:
            raise RuntimeError(f"{name}: this backend gives no memory analysis for its programs")
        log.info("compiled %s (%s) in %.1f s", name, function, seconds)
        return ProgramPlan(
            name=name,
            function=function,
            arguments=int(stats.argument_size_in_bytes),
            temporaries=int(stats.temp_size_in_bytes),
            outputs=int(stats.output_size_in_bytes),
            aliased=int(stats.alias_size_in_bytes),
            inputs=int(inputs),
            flops=float(flops),
            xla_flops=_flops(compiled),
            calls=calls,
            note=note,
            compile_seconds=round(seconds, 2),
            kernels=_kernels(compiled),
        )


_UNITS = {"": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024**4}


def refused_program(name, function, message, inputs, calls, note, flops=0.0) -> ProgramPlan:
    """A program the TPU compiler would not compile: its HLO temporaries exceed the chip's HBM
    (libtpu: "the total memory required for HLO temporaries (66.50G) exceeds available HBM
    (15.75G)"). The bytes it names are the temporaries; arguments and outputs are unknown."""
    found = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
    temporaries = int(float(found.group(1)) * _UNITS[found.group(2)]) if found else 0
    first = message.strip().splitlines()[0] if message.strip() else "RESOURCE_EXHAUSTED"
    log.info("%s: the compiler refused it: %s", name, first)
    return ProgramPlan(
        name=name,
        function=function,
        arguments=0,
        temporaries=temporaries,
        outputs=0,
        aliased=0,
        inputs=int(inputs),
        flops=float(flops),
        calls=calls,
        note=note,
        refused=first,
    )


# ------------------------------------------------------------------------------- shapes ---
# Padded positions per real token packing is expected to leave (the target: within
# ~15% of the real tokens on a realistic length mix; a run reports its measured
# padded_positions_per_real_token). Only the expected FLOPs use it.
PACK_SLACK = 0.15


@dataclass
class StepShapes:
    """The shapes one RL step's scoring and update programs are compiled for, as
    ``dgpo_jax.launch.train`` forms them."""

    trajectories: int  # rollouts per step
    mini_trajectories: int  # per PPO mini-batch
    width: int  # positions per row
    rows: int  # rows of the whole batch (scoring, whole-batch pass)
    score_micro_rows: int  # rows per micro-batch of the scoring passes and the whole-batch pass
    mini_rows: int  # rows of one PPO mini-batch
    micro: int  # micro-batches of the update
    packed: bool
    updates: int  # update steps per RL step
    whole_micro: int  # micro-batches of the whole-batch pass
    tokens_per_trajectory: int = 0  # real tokens per trajectory the occupancy assumes
    occupancy_whole: float = 1.0  # of the whole batch's micro-batches, those holding tokens
    occupancy_mini: float = 1.0  # of a mini-batch's micro-batches, those holding tokens

    @property
    def micro_rows(self) -> int:
        return self.mini_rows // self.micro

    def describe(self) -> str:
        out = (
            f"{'packed' if self.packed else 'padded'} rows of {self.width} positions; "
            f"{self.trajectories} trajectories -> {self.rows} rows for the scoring passes "
            f"({self.score_micro_rows} at a time) and the whole-batch pass; {self.updates} "
            f"update(s) of {self.mini_trajectories} trajectories -> {self.mini_rows} rows in "
            f"{self.micro} micro-batches of {self.micro_rows}"
        )
        if self.packed:
            out += (
                f". One trajectory per row at most: the shapes hold for any lengths. At "
                f"~{self.tokens_per_trajectory} real tokens per trajectory "
                f"(plan.tokens_per_trajectory) + {PACK_SLACK:.0%} padding, "
                f"{self.occupancy_whole:.0%} of the whole batch's and {self.occupancy_mini:.0%} "
                "of a mini-batch's micro-batches hold tokens (the others are skipped)"
            )
        return out


def step_shapes(cfg, shards: int) -> StepShapes:
    """Rows and width of the scoring and update programs, as ``dgpo_jax.launch.train`` forms
    them. Padded (``train.pack=False``): one trajectory per row of the longest context,
    ``sampler.cache_len`` (rounded up to 64), rows padded to whole micro-batches: the widest
    program (``train.width_buckets`` and ``train.length_groups`` only narrow it). Packed: N
    trajectories become N rows of ``train.pack_width`` (default: the context) filled
    micro-batch by micro-batch, so the shapes do not depend on the lengths; how many
    micro-batches hold tokens follows ``plan.tokens_per_trajectory``. ``shards``: ways the
    batch rows split over the mesh."""
    n = cfg.data.rollouts_per_prompt
    trajectories = cfg.data.batch_size * n
    mini = min(cfg.train.mini_batch_size, cfg.data.batch_size) * n
    updates = -(-trajectories // mini) * cfg.train.ppo_epochs
    micro = micro_batches(mini, cfg.train.micro_batch_size)
    per_micro = mini // micro
    score_rows = int(cfg.train.get("score_micro_batch_size", 0) or 0) or per_micro
    if not cfg.train.get("pack", False):
        width = -(-cfg.sampler.cache_len // SEQ_MULTIPLE) * SEQ_MULTIPLE
        rows = -(-trajectories // micro) * micro  # pad_rows_to: whole micro-batches
        return StepShapes(
            trajectories,
            mini,
            width,
            rows,
            score_rows,
            mini,
            micro,
            False,
            updates,
            micro_batches(rows, per_micro),
        )
    width = int(cfg.train.get("pack_width", 0) or 0) or cfg.sampler.cache_len
    width = -(-width // SEQ_MULTIPLE) * SEQ_MULTIPLE
    quantum = math.lcm(score_rows, shards)
    rows = -(-trajectories // quantum) * quantum
    tokens = int(cfg.plan.get("tokens_per_trajectory", 0) or 0) or width

    def occupancy(count: int, per: int, total: int) -> float:
        needed = math.ceil(count * min(tokens, width) * (1 + PACK_SLACK) / width)
        return min(1.0, math.ceil(needed / per) / total)

    return StepShapes(
        trajectories,
        mini,
        width,
        rows,
        score_rows,
        mini,
        micro,
        True,
        updates,
        rows // score_rows,
        tokens,
        occupancy(trajectories, score_rows, rows // score_rows),
        occupancy(mini, per_micro, micro),
    )


def _batch_arg(plan: ShardingPlan, shape, dtype):
    """An abstract array placed as ``plan.shard_batch`` places it (scalars replicated)."""
    sharding = plan.batch_sharding(len(shape), shape) if shape else plan.sharding(())
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def rollout_inputs(plan: ShardingPlan, static, rows: int, prompt_width: int) -> tuple:
    """``rollout_program``'s arguments after the params, abstract and placed as
    ``Sampler.generate`` passes them: prompt ids and mask, active rows, prefix ids and lengths,
    the seed, row ids, the host id, the teacher-turn probability and the wave policy."""
    return (
        _batch_arg(plan, (rows, prompt_width), jnp.int32),
        _batch_arg(plan, (rows, prompt_width), jnp.bool_),
        _batch_arg(plan, (rows,), jnp.bool_),
        _batch_arg(plan, (rows, max(static.max_prefix_length, 1)), jnp.int32),
        _batch_arg(plan, (rows,), jnp.int32),
        _batch_arg(plan, (), jnp.uint32),
        _batch_arg(plan, (rows,), jnp.int32),
        _batch_arg(plan, (), jnp.int32),
        _batch_arg(plan, (), jnp.float32),
        _batch_arg(plan, (), jnp.float32),
        _batch_arg(plan, (), jnp.int32),
    )


# ---------------------------------------------------------------------------- the programs ---
@contextlib.contextmanager
def host_calls_stubbed(plan):
    """For compile-only GPUs: a deviceless XLA:GPU compile cannot lower a host callback (JAX
    asks the GPU runtime for one), so while the rollout is traced and lowered the host wave's
    callback becomes zeros of its shapes. The callback runs on the host between decode loops;
    its results (small) are in the program either way. Pallas' Triton lowering asks the
    default device for the GPU, so that is the plan's first device meanwhile. Elsewhere: no
    change."""
    from dgpo_jax.sampler import loop as loop_module  # noqa: PLC0415 (plan-only, heavy)

    device = plan.mesh.devices.flat[0]
    if device.platform != "gpu" or jax.default_backend() == "gpu":
        yield
        return
    real = loop_module.io_callback
    loop_module.io_callback = lambda _f, shapes, *_a, **_k: jax.tree.map(
        lambda x: jnp.zeros(x.shape, x.dtype), shapes
    )
    try:
        with jax.default_device(device):
            yield
    finally:
        loop_module.io_callback = real


def plan_rollout(
    compiler: Compiler,
    name: str,
    model_config: Qwen2Config,
    sampler_cfg,
    params,
    rows: int,
    prompt_width: int,
    plan: ShardingPlan,
    params_resident: bool,
    calls: int,
    teacher_config: Qwen2Config | None = None,
    teacher_params=None,
) -> ProgramPlan:
    """The sampler's compiled rollout (``rollout_program``, as ``Sampler.generate`` calls it)
    for ``rows`` prompts of ``prompt_width`` positions: prefill, the decode and ingest loops,
    the KV cache(s). ``params_resident``: ``params`` are resident state (else a copy made for
    this program); teacher params always are."""
    from dgpo_jax.sampler.loop import (  # noqa: PLC0415 (plan-only, heavy)
        resolve_decode_layers,
        rollout_program,
    )

    # As generate(): the teacher coin and the wave policy are traced. The devices stand for the
    # target's accelerators (fake CPU devices shaped like GPUs, or a TPU topology): the rollout
    # is planned on the decode path, and with the layers, that run there (a GPU splits its
    # layers and KV cache: `resolve_decode_layers`).
    static = sampler_cfg.compiled()
    if static.decode_path == "auto":
        static = static.replace(decode_path="accelerator")
    platform = plan.mesh.devices.flat[0].platform
    target = "gpu" if platform == "cpu" else platform  # fake CPU devices stand for GPUs
    layers = resolve_decode_layers(static, static.decode_path, platform=target)
    static = static.replace(decode_layers=layers)
    args = (
        params,
        teacher_params if teacher_config is not None else None,
        *rollout_inputs(plan, static, rows, prompt_width),
    )
    with host_calls_stubbed(plan):
        traced = rollout_program.trace(model_config, static, plan, teacher_config, *args)
        lowered = traced.lower()
    inputs = bytes_per_device(args[2:]) + (0 if params_resident else bytes_per_device(params))
    dtype = params["embed_tokens"].dtype
    cache = bytes_per_device(abstract_cache(model_config, rows, static.cache_len, dtype, plan))
    note = f"{rows} rows, prompt {prompt_width} + {static.cache_len - prompt_width} slots"
    if teacher_config is not None:
        tdtype = teacher_params["embed_tokens"].dtype
        cache += bytes_per_device(
            abstract_cache(teacher_config, rows, static.cache_len, tdtype, plan)
        )
        note += ", student + teacher caches"
    note += f"; its temporaries hold the KV cache, {_fmt(cache)} per device"
    return compiler.measure(
        name, "rollout_program", lowered, inputs, calls, note, jaxpr_flops(traced.jaxpr)
    )


def plan_scoring(
    compiler: Compiler,
    name: str,
    config: Qwen2Config,
    params,
    shapes: StepShapes,
    plan: ShardingPlan,
    params_resident: bool,
) -> ProgramPlan:
    """A log-prob pass (``sequence_logprobs``) over the whole batch, as the loop calls it.
    ``params_resident``: ``params`` are resident state (else a copy made for it)."""
    from dgpo_jax.learner.scoring import sequence_logprobs  # noqa: PLC0415

    rows, width = shapes.rows, shapes.width
    ids = _batch_arg(plan, (rows, width), jnp.int32)
    mask = _batch_arg(plan, (rows, width), jnp.int32)
    kwargs = dict(micro_batch=shapes.score_micro_rows, plan=plan)
    if shapes.packed:
        kwargs["segment_ids"] = _batch_arg(plan, (rows, width), jnp.int32)
    traced = sequence_logprobs.trace(config, params, ids, mask, **kwargs)
    inputs = bytes_per_device((ids, mask, kwargs.get("segment_ids")))
    inputs += 0 if params_resident else bytes_per_device(params)
    note = (
        f"{rows} {'packed ' if shapes.packed else ''}rows x {width}, "
        f"{shapes.score_micro_rows} rows at a time"
    )
    measured = compiler.measure(
        name, "sequence_logprobs", traced.lower(), inputs, 1, note, jaxpr_flops(traced.jaxpr)
    )
    measured.occupancy = shapes.occupancy_whole
    return measured


def _used_fields(
    objective, teacher_in_program: bool, fields, on_policy: bool = False
) -> tuple[str, ...]:
    """Of ``fields`` (what the loop hands over), those the update step keeps."""
    required, optional = batch_requirements(objective, teacher_in_program, on_policy)
    return tuple(f for f in fields if f in optional and f not in required)


def _loop_fields(
    objective, has_ref: bool, prepared: bool, on_policy: bool = False
) -> tuple[str, ...]:
    """The batch fields the loop hands to the update step (before validation drops unused
    ones): the scored rollout, behaviour / reference log-probs, TAID's t, and the whole-batch
    pass's outputs when it ran."""
    fields = ["teacher_mask", "sampler_logprobs", "rewards", "group_ids"]
    if objective.uses_policy and not on_policy:
        fields.append("old_logprobs")
    if has_ref:
        fields.append("ref_logprobs")
    if objective.divergence == "taid":
        fields.append("taid_t")
    if prepared:
        fields += ["advantages", "policy_gate", "returns", "values", "teacher_logprobs"]
    return tuple(fields)


def _update_flops(update, state, batch, teacher_params) -> float:
    """``jaxpr_flops`` of the update step's program (traced as ``UpdateStep.compile`` lowers
    it)."""
    if update.teacher_config is None:
        teacher_params = None
    traced = update._compiled(state).trace(state, update._abstract_batch_arg(batch), teacher_params)
    return jaxpr_flops(traced.jaxpr)


def plan_update_programs(
    compiler: Compiler,
    cfg,
    objective,
    curriculum,
    student: dict,
    teacher: dict | None,
    plan: ShardingPlan,
    shapes: StepShapes,
    has_ref: bool,
    wanted: set[str],
    on_policy: bool,
):
    """(abstract update state, [prepare, update, loss programs] of those ``wanted``);
    ``on_policy``: the update takes its behaviour log-probs from its own forward."""
    in_program = objective.teacher_in_update and teacher is not None
    tx = optim_config(cfg, cfg.train.steps * shapes.updates)
    update = make_update_step(
        objective,
        student["config"],
        teacher["config"] if in_program else None,
        optimizer=tx,
        micro_batches=shapes.micro,
        plan=plan,
        compute_dtype=jnp.dtype(cfg.model.dtype),
        compiler_options=compiler.options,
        on_policy=on_policy,
    )
    state = abstract_update_state(objective, student["params"], update.tx)
    teacher_params = teacher["params"] if in_program else None
    with_teacher = ", teacher in the program" if in_program else ""
    programs = []
    prepared = objective.uses_policy and objective.global_advantage and shapes.updates > 1
    if prepared and "prepare" in wanted:
        fields = _used_fields(objective, in_program, _loop_fields(objective, has_ref, False))
        batch = abstract_batch(
            objective,
            shapes.rows,
            shapes.width,
            in_program,
            plan,
            packed=shapes.packed,
            trajectories=shapes.trajectories,
            fields=fields,
        )
        # The program prepare_rollout jits (UpdateStep._prepare), micro-batched as the loop
        # asks.
        traced = jax.jit(update._prepare, static_argnames=("micro",)).trace(
            state, batch, teacher_params, micro=shapes.whole_micro
        )
        note = f"{shapes.rows} rows x {shapes.width}, {shapes.whole_micro} micro-batches"
        programs.append(
            compiler.measure(
                "prepare (whole batch)",
                "_prepare",
                traced.lower(),
                bytes_per_device(batch),
                1,
                note + with_teacher,
                jaxpr_flops(traced.jaxpr),
            )
        )
        programs[-1].occupancy = shapes.occupancy_whole
    fields = _used_fields(
        objective, in_program, _loop_fields(objective, has_ref, prepared, on_policy), on_policy
    )
    batch = abstract_batch(
        objective,
        shapes.mini_rows,
        shapes.width,
        in_program,
        plan,
        packed=shapes.packed,
        trajectories=shapes.mini_trajectories,
        fields=fields,
        on_policy=on_policy,
    )
    if "update" in wanted:
        note = (
            f"{shapes.mini_rows} rows x {shapes.width}, {shapes.micro} micro-batches of "
            f"{shapes.micro_rows} rows, remat={student['config'].remat}" + with_teacher
        )
        programs.append(
            compiler.measure(
                "update (mini-batch)",
                "_step",
                lambda: update.compile(state, batch, teacher_params),  # what training runs
                bytes_per_device(batch),
                shapes.updates,
                note,
                _update_flops(update, state, batch, teacher_params),
            )
        )
        programs[-1].occupancy = shapes.occupancy_mini
    if curriculum.adaptive_student_share and "loss" in wanted:
        traced = jax.jit(update._loss_only).trace(state, batch, teacher_params)
        note = "DistiLLM's validation loss on one mini-batch"
        programs.append(
            compiler.measure(
                "loss (validation)",
                "_loss_only",
                traced.lower(),
                bytes_per_device(batch),
                0,
                note,
                jaxpr_flops(traced.jaxpr),
            )
        )
    return state, programs


def _with_attention(config: Qwen2Config, kernel: str, plan: ShardingPlan) -> Qwen2Config:
    """The model config with the run's attention kernel (``model.attention``); cudnn, which
    needs a GPU, compiles as ``chunked`` on a CPU plan (fake GPU-shaped devices): its memory
    stand-in, O(T x block) like cuDNN's flash attention."""
    if kernel == "cudnn" and plan.mesh.devices.flat[0].platform == "cpu":
        kernel = "chunked"
    return config.replace(attention=kernel)


def _attention_note(kernel: str, config: Qwen2Config, plan: ShardingPlan, width: int) -> str:
    platform = plan.mesh.devices.flat[0].platform
    runs = resolve_kernel(config.attention, width, plan, jnp.bfloat16, config.dim_per_head)
    note = f"model.attention={kernel}: {runs} at {width} positions on {platform}"
    if kernel != config.attention:
        note += " (cudnn's memory stand-in: it needs a GPU)"
    return note


PROGRAM_GROUPS = ("rollout", "score", "prepare", "update", "loss", "eval")


def _check_knobs(cfg) -> None:
    for name in ("tokens_per_trajectory", "prompt_width", "peak_tflops", "device_memory_gib"):
        value = cfg.plan.get(name, 0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"plan.{name}: must be a number >= 0, got {value!r}")


def _wanted(cfg) -> set[str]:
    """``plan.programs``: the program groups to compile ("" = all)."""
    names = {n.strip() for n in str(cfg.plan.get("programs", "") or "").split(",") if n.strip()}
    unknown = sorted(names - set(PROGRAM_GROUPS))
    if unknown:
        raise ConfigError(
            f"plan.programs: unknown program group(s) {unknown}; known: {', '.join(PROGRAM_GROUPS)}"
        )
    return names or set(PROGRAM_GROUPS)


def _make_plan(shape: dict, rules, devices) -> ShardingPlan:
    """``plan_from_config`` on ``devices``. A TPU v4 topology from libtpu lists one device per
    TensorCore (two per chip), where ``jax.make_mesh`` wants one per chip ("megacore"): those
    devices are laid out in their listed order instead."""
    try:
        return plan_from_config(shape, rules, devices=devices)
    except AssertionError as error:
        if "megacore" not in str(error):
            raise
    sizes = [int(v) for v in shape.values()]
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // math.prod(v for v in sizes if v != -1)
    mesh = jax.sharding.Mesh(np.array(devices).reshape(sizes), tuple(shape))
    merged = dict(DEFAULT_RULES)
    merged.update(dict(rules))
    return ShardingPlan(mesh, tuple(merged.items()))


def build_memory_plan(cfg) -> MemoryPlan:
    """The plan for a run config (see the module docstring)."""
    from dgpo_jax.launch.context import eval_sampler_configs  # noqa: PLC0415 (import cycle)
    from dgpo_jax.models.tokenizer import load_tokenizer  # noqa: PLC0415

    _check_knobs(cfg)
    target = parse_target(cfg.plan.get("target", ""))
    wanted = _wanted(cfg)
    devices = target_devices(target)
    if cfg.mesh.num_devices and not target.compile_only:
        devices = devices[: cfg.mesh.num_devices]
    shape = {k: int(v) for k, v in cfg.mesh.shape.items()}
    plan = _make_plan(shape, parse_rules(cfg.mesh.rules), devices)
    n_devices = int(plan.mesh.devices.size)
    first = plan.mesh.devices.flat[0]
    per_chip, memory_gib = 1, cfg.plan.device_memory_gib
    peak_tflops = float(cfg.plan.get("peak_tflops", 0.0) or 0.0)
    if target.is_tpu:
        compiler = Compiler()
        compiler_name = f"the TPU compiler (libtpu {libtpu_version()})"
        chips = len({tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)})
        per_chip = max(1, n_devices // max(chips, 1))
        memory_gib = memory_gib or target.kind.hbm_gib
        peak_tflops = peak_tflops or target.kind.peak_tflops
    elif target.is_gpu:
        compiler = Compiler()
        compiler_name = f"XLA:GPU without a GPU (jax {jax.__version__}, its CUDA plugin)"
        memory_gib = memory_gib or target.kind.hbm_gib
        peak_tflops = peak_tflops or target.kind.peak_tflops
    else:
        cpu = first.platform == "cpu"
        compiler = Compiler(
            {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
            if cpu
            else None
        )
        compiler_name = f"XLA:{first.platform.upper()}"
    result = MemoryPlan(
        mesh=dict(plan.mesh.shape),
        devices=n_devices,
        platform=first.platform,
        compiler=compiler_name,
        target=target.name,
        device_kind=getattr(first, "device_kind", first.platform),
        devices_per_chip=per_chip,
        device_memory=int(memory_gib * GiB / per_chip),
        peak_tflops=peak_tflops,
    )
    objective, curriculum = build_objective(cfg), build_curriculum(cfg)
    compute_dtype, param_dtype = jnp.dtype(cfg.model.dtype), jnp.dtype(cfg.model.param_dtype)
    kernel = cfg.model.attention

    def model(role, source, dtype):
        config = _with_attention(model_config_from_source(source, f"model.{role}"), kernel, plan)
        config = config.replace(attention_block=cfg.model.attention_block)
        return {"config": config, "params": abstract_params(config, dtype, plan)}

    # --- the resident state -------------------------------------------------------------------
    student = model("student", cfg.model.student, param_dtype)
    if cfg.model.remat != "none":
        student["config"] = student["config"].replace(remat=cfg.model.remat)
    shapes = step_shapes(cfg, plan.batch_shards())
    result.assumptions["attention"] = _attention_note(kernel, student["config"], plan, shapes.width)
    result.assumptions["update batches"] = shapes.describe()
    resident = {}
    teacher = None
    if needs_teacher_model(objective, curriculum):
        if not cfg.model.teacher:
            raise ValueError(f"objective {objective.name!r} needs config.model.teacher")
        teacher = model("teacher", cfg.model.teacher, compute_dtype)
        resident["teacher params"] = bytes_per_device(teacher["params"])
        result.notes["teacher params"] = (
            f"{teacher['config'].num_params() / 1e6:.0f}M x {compute_dtype.name}"
        )
    reference = None
    if objective.needs_ref_logp:
        if cfg.model.ref_model == "initial_student":
            params = cast_params(student["params"], compute_dtype)
            reference = {"config": student["config"], "params": params}
            note = "a copy of the initial student"
        else:
            reference = model("reference", cfg.model.reference, compute_dtype)
            note = cfg.model.reference
        resident["reference params"] = bytes_per_device(reference["params"])
        result.notes["reference params"] = f"{note}, {compute_dtype.name}"
    # One update per step with one micro-batch: the trainer's on-policy update (no scoring).
    on_policy = on_policy_update(cfg, objective.uses_policy, shapes.updates, shapes.micro)
    state, update_programs = plan_update_programs(
        compiler,
        cfg,
        objective,
        curriculum,
        student,
        teacher,
        plan,
        shapes,
        reference is not None,
        wanted,
        on_policy,
    )
    policy_bytes = bytes_per_device(state.train.params["policy"])
    critic = {k: v for k, v in state.train.params.items() if k != "policy"}
    critic_bytes = bytes_per_device(critic)
    result.components["student params"] = policy_bytes
    result.notes["student params"] = (
        f"{student['config'].num_params() / 1e6:.0f}M x {param_dtype.name} (masters)"
    )
    if critic:
        result.components["critic params"] = critic_bytes
        result.notes["critic params"] = f"{objective.critic} critic, {param_dtype.name}"
    # The optimizer state with the update state's counters (step, rng, skipped steps).
    result.components["optimizer state"] = bytes_per_device(state) - policy_bytes - critic_bytes
    result.notes["optimizer state"] = f"AdamW moments ({param_dtype.name}) + counters"
    result.components.update(resident)

    # The policy the sampler and the scoring passes read: its compute-dtype copy, cast once per
    # step and held by the loop through the step (the masters themselves when they are in the
    # compute dtype).
    policy = cast_params(student["params"], compute_dtype)
    if param_dtype != compute_dtype:
        result.components["policy compute copy"] = bytes_per_device(policy)
        result.notes["policy compute copy"] = (
            f"{compute_dtype.name}, for the rollout, scoring and evaluation"
        )

    # --- the programs, in the order the loop runs them ----------------------------------------
    tok = load_tokenizer(cfg.model.tokenizer)
    prompt_width = int(cfg.plan.get("prompt_width", 0) or 0) or cfg.sampler.max_prompt_length
    prompt_width = next(
        w
        for w in prompt_widths(cfg.sampler.max_prompt_length)
        if w >= min(prompt_width, cfg.sampler.max_prompt_length)
    )
    result.assumptions["prompt width"] = (
        f"{prompt_width} positions (plan.prompt_width; a rollout compiles for its batch's "
        f"longest prompt rounded up to a prompt width bucket, at most sampler.max_prompt_length="
        f"{cfg.sampler.max_prompt_length})"
    )
    programs: list[ProgramPlan] = []
    guided = curriculum.guided_p0 > 0 and teacher is not None
    teacher_samples = teacher is not None and (
        not objective.uses_policy or curriculum.teacher_prefix_share > 0
    )
    # The KD family samples with the student only when it mixes in student data.
    student_samples = objective.uses_policy or curriculum.mixes_student_data
    rows = shapes.trajectories
    if "rollout" in wanted and student_samples:
        scfg = sampler_config(cfg, tok, max_prefix_length=curriculum.teacher_prefix_tokens)
        programs.append(
            plan_rollout(
                compiler,
                "rollout",
                student["config"],
                scfg,
                policy,
                rows,
                prompt_width,
                plan,
                True,
                1,
                teacher["config"] if guided else None,
                teacher["params"] if guided else None,
            )
        )
    if "rollout" in wanted and teacher_samples:
        programs.append(
            plan_rollout(
                compiler,
                "rollout (teacher)",
                teacher["config"],
                sampler_config(cfg, tok),
                teacher["params"],
                rows,
                prompt_width,
                plan,
                True,
                1,
            )
        )
    if "score" in wanted:
        behaviour = None
        # An on-policy update (one per step) takes the behaviour log-probs from its forward.
        if objective.uses_policy and not on_policy:
            behaviour = plan_scoring(
                compiler,
                "score: behaviour log-probs",
                student["config"],
                policy,
                shapes,
                plan,
                True,
            )
            programs.append(behaviour)
        if reference is not None:
            if behaviour is not None and reference["config"] == student["config"]:
                # The initial student's copy has the policy's config, shapes and dtype: the
                # same compiled program as the behaviour pass.
                programs.append(
                    dataclasses.replace(
                        behaviour,
                        name="score: reference log-probs",
                        same_as=behaviour.name,
                    )
                )
            else:
                programs.append(
                    plan_scoring(
                        compiler,
                        "score: reference log-probs",
                        reference["config"],
                        reference["params"],
                        shapes,
                        plan,
                        True,
                    )
                )
    programs += update_programs
    if (cfg.train.eval_every or cfg.eval.at_end) and "eval" in wanted:
        for name, scfg in eval_sampler_configs(cfg, tok).items():
            programs.append(
                plan_rollout(
                    compiler,
                    f"eval: {name}",
                    student["config"],
                    scfg,
                    policy,
                    cfg.eval.batch_size,
                    prompt_width,
                    plan,
                    True,
                    0,
                )
            )
    result.programs = {p.name: p for p in programs}
    return result


def run_plan(cfg) -> dict:
    """The launcher's ``plan`` mode: print the table, write ``WORKDIR/memory_plan.json``; a plan
    that does not fit exits non-zero naming its largest program."""
    target = parse_target(cfg.plan.get("target", ""))
    if target.compile_only and not jax._src.xla_bridge.backends_are_initialized():
        # The TPU or GPU devices are compile-only; this host runs on its CPU (starting the TPU
        # runtime on a machine without TPUs only waits and warns; the CUDA plugin, asked for
        # no GPU, skips its driver checks).
        jax.config.update("jax_platforms", "cpu")
    result = build_memory_plan(cfg)
    print(result.table(), flush=True)
    epath.Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    out = result.to_dict()
    write_text_atomically(
        str(epath.Path(cfg.workdir) / "memory_plan.json"), json.dumps(out, indent=1)
    )
    if result.fits is False:
        refused = [p for p in result.programs.values() if p.refused]
        worst = refused[0] if refused else result.programs[result.peak_program]
        unit = "chip" if result.target else "device"
        scale = result.devices_per_chip
        if worst.refused:
            raise SystemExit(
                f"memory plan: {worst.name} ({worst.function}) does not fit: the TPU compiler "
                f"says: {worst.refused}"
            )
        raise SystemExit(
            f"memory plan: {worst.name} ({worst.function}) needs {_fmt(worst.live * scale)} "
            f"on top of the resident {_fmt(result.resident * scale)}: the peak "
            f"{_fmt(result.peak * scale)} per {unit} exceeds plan.device_memory_gib="
            f"{result.device_memory * scale / GiB:g}"
        )
    return out


__all__ = [
    "KNOWN_TARGETS",
    "MemoryPlan",
    "ProgramPlan",
    "StepShapes",
    "TPU_KINDS",
    "abstract_cache",
    "abstract_params",
    "build_memory_plan",
    "bytes_per_device",
    "model_config_from_source",
    "parse_target",
    "run_plan",
    "step_shapes",
    "target_devices",
]
