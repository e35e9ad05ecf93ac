"""The memory plan: bytes per device of a run, found ahead of time, before a pod run starts.

``python -m dgpo_jax.launch --config=configs/dgpo_nq.py --config.mode=plan
--config.model.student=preset:qwen2.5-0.5b --config.model.teacher=preset:qwen2.5-3b
--config.plan.fake_devices=8``

Nothing is allocated: every model is abstract (``jax.ShapeDtypeStruct`` leaves carrying their
shardings on the configured mesh), and the programs that dominate memory are compiled ahead of
time for that mesh (``jit(...).lower(...).compile()``). Per device:

* parameters: student, teacher, reference and critic, from the shardings' shard shapes;
* optimizer state: AdamW's moments (sharded like their parameters) and counters;
* update activations: XLA's temporary buffers of the compiled fused update step for one PPO
  mini-batch at the longest sequence (``sampler.cache_len`` rounded up to 64 positions) --
  activations, gradients and the micro-batch accumulators;
* KV cache: the sampler's cache for the whole rollout batch (``[L, B, K, S, Dh]`` for k and v,
  student and, for Guided-OPD, teacher), from its sharding;
* rollout step: XLA's temporary buffers of one compiled decode step over the whole batch (the
  largest step the sampler runs; observations are ingested one row at a time).

The peak is the resident state (parameters + optimizer state) plus the larger of the update
phase and the rollout phase. With ``plan.fake_devices=N`` the launcher runs on N fake CPU
devices, so a plan for a 64-chip mesh runs on a laptop. ``WORKDIR/memory_plan.json`` gets the
figures; the command exits non-zero when the peak exceeds ``plan.device_memory_gib``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp

from dgpo_jax.checkpoint.checkpointer import Checkpointer
from dgpo_jax.config import build_curriculum, build_objective, optim_config
from dgpo_jax.curricula.config import needs_teacher_model
from dgpo_jax.launch.context import make_plan
from dgpo_jax.learner.batches import SEQ_MULTIPLE, micro_batches
from dgpo_jax.learner.update_step import abstract_update_state, make_update_step
from dgpo_jax.models import Qwen2Config, get_preset, param_shapes
from dgpo_jax.models.qwen2 import KVCache, forward_with_cache, init_cache
from dgpo_jax.objectives.batch import BATCH_FIELDS, batch_requirements

log = logging.getLogger(__name__)
GiB = 1024**3


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
    if source.startswith("preset:"):
        return get_preset(source[len("preset:") :])
    hf_config = os.path.join(source, "config.json")
    if os.path.isfile(hf_config):
        with open(hf_config) as f:
            return Qwen2Config.from_hf_dict(json.load(f), source=hf_config)
    if os.path.isdir(source):
        with Checkpointer(source) as ckpt:
            metadata = ckpt.restore_metadata(None)
        if "model_config" not in metadata:
            raise ValueError(f"{role} {source!r}: checkpoint metadata has no 'model_config'")
        return Qwen2Config.from_hf_dict(metadata["model_config"], source=f"{source} metadata")
    raise FileNotFoundError(f"{role} {source!r}: not a HF directory, a checkpoint or preset:NAME")


# ---------------------------------------------------------------------------------- plan ---
@dataclass
class MemoryPlan:
    """Bytes per device of each component, and the phases' peaks."""

    mesh: dict
    devices: int
    platform: str
    components: dict = field(default_factory=dict)  # name -> bytes per device
    notes: dict = field(default_factory=dict)  # name -> what was counted
    device_memory: int = 0  # bytes per device available (0 = unknown)

    @property
    def resident(self) -> int:
        c = self.components
        return sum(
            c.get(k, 0)
            for k in (
                "student params",
                "critic params",
                "teacher params",
                "reference params",
                "optimizer state",
            )
        )

    @property
    def update_peak(self) -> int:
        return self.resident + self.components.get("update activations", 0)

    @property
    def rollout_peak(self) -> int:
        c = self.components
        return self.resident + c.get("kv cache", 0) + c.get("rollout step", 0)

    @property
    def peak(self) -> int:
        return max(self.update_peak, self.rollout_peak)

    @property
    def fits(self) -> bool | None:
        return None if not self.device_memory else self.peak <= self.device_memory

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            resident=self.resident,
            update_peak=self.update_peak,
            rollout_peak=self.rollout_peak,
            peak=self.peak,
            fits=self.fits,
        )
        return out

    def table(self) -> str:
        rows = [(k, v, self.notes.get(k, "")) for k, v in self.components.items()]
        rows += [
            ("= resident (params + optimizer)", self.resident, ""),
            ("= update phase peak", self.update_peak, "resident + update activations"),
            ("= rollout phase peak", self.rollout_peak, "resident + kv cache + step"),
            ("= PEAK", self.peak, ""),
        ]
        width = max(len(r[0]) for r in rows) + 2
        lines = [
            f"memory plan per device: mesh {self.mesh} over {self.devices} {self.platform} devices"
        ]
        lines += [f"  {name.ljust(width)}{_fmt(b):>12}  {note}" for name, b, note in rows]
        if self.device_memory:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(
                f"  device memory {_fmt(self.device_memory)}: {verdict} "
                f"({self.peak / self.device_memory:.0%} used)"
            )
        return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _temp_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend gives no memory analysis for compiled programs")
    return int(stats.temp_size_in_bytes)


def plan_update(
    objective, student, teacher, tx, plan, rows: int, seq: int, micro_batches: int, dtype
) -> tuple[object, int]:
    """(abstract update state, temporary bytes per device of the compiled update step)."""
    teacher_in_program = objective.teacher_in_update
    update = make_update_step(
        objective,
        student["config"],
        teacher["config"] if teacher_in_program else None,
        optimizer=tx,
        micro_batches=micro_batches,
        plan=plan,
    )
    state = abstract_update_state(objective, student["params"], update.tx)
    required, _ = batch_requirements(objective, teacher_in_program)
    batch = {}
    for name in required:
        kind, integer = BATCH_FIELDS[name]
        shape = {"BT": (rows, seq), "B": (rows,), "": ()}[kind]
        dt = jnp.int32 if integer else jnp.float32
        sharding = plan.batch_sharding(len(shape), shape) if shape else plan.sharding(())
        batch[name] = jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    teacher_params = teacher["params"] if teacher_in_program else None
    compiled = update._compiled(state).lower(state, batch, teacher_params).compile()
    return state, _temp_bytes(compiled)


def plan_rollout_step(config: Qwen2Config, params, cache: KVCache, chunk: int, plan) -> int:
    """Temporary bytes per device of one compiled cache step of ``chunk`` tokens for every row."""
    rows = cache.end.shape[0]
    sh = plan.batch_sharding(2, (rows, chunk))
    ids = jax.ShapeDtypeStruct((rows, chunk), jnp.int32, sharding=sh)
    mask = jax.ShapeDtypeStruct((rows, chunk), jnp.bool_, sharding=sh)
    fn = jax.jit(lambda p, i, c, m: forward_with_cache(config, p, i, c, m, plan))
    return _temp_bytes(fn.lower(params, ids, cache, mask).compile())


def build_memory_plan(cfg) -> MemoryPlan:
    """The plan for a run config (see the module docstring)."""
    plan = make_plan(cfg)
    devices = plan.mesh.devices.size
    dtype = cfg.model.dtype
    objective, curriculum = build_objective(cfg), build_curriculum(cfg)
    n = cfg.data.rollouts_per_prompt
    rollout_rows = cfg.data.batch_size * n
    mini_rows = min(cfg.train.mini_batch_size, cfg.data.batch_size) * n
    cache_slots = cfg.sampler.cache_len
    seq = -(-cfg.sampler.cache_len // SEQ_MULTIPLE) * SEQ_MULTIPLE

    result = MemoryPlan(
        mesh=dict(plan.mesh.shape),
        devices=int(devices),
        platform=plan.mesh.devices.flat[0].platform,
        device_memory=int(cfg.plan.device_memory_gib * GiB),
    )

    def model(role, source):
        config = model_config_from_source(source, f"model.{role}")
        return {"config": config, "params": abstract_params(config, dtype, plan)}

    student = model("student", cfg.model.student)
    result.components["student params"] = bytes_per_device(student["params"])
    result.notes["student params"] = (
        f"{student['config'].num_params() / 1e6:.0f}M x {jnp.dtype(dtype).name}"
    )
    teacher = None
    if needs_teacher_model(objective, curriculum):
        if not cfg.model.teacher:
            raise ValueError(f"objective {objective.name!r} needs config.model.teacher")
        teacher = model("teacher", cfg.model.teacher)
        result.components["teacher params"] = bytes_per_device(teacher["params"])
        result.notes["teacher params"] = f"{teacher['config'].num_params() / 1e6:.0f}M"
    if objective.needs_ref_logp:
        if cfg.model.ref_model == "initial_student":
            result.components["reference params"] = result.components["student params"]
            result.notes["reference params"] = "a copy of the initial student"
        else:
            ref = model("reference", cfg.model.reference)
            result.components["reference params"] = bytes_per_device(ref["params"])

    tx = optim_config(cfg, cfg.train.steps)
    micro = micro_batches(mini_rows, cfg.train.micro_batch_size)
    log.info(
        "compiling the update step for %d x %d tokens (%d micro-batches) ...", mini_rows, seq, micro
    )
    state, update_temp = plan_update(
        objective, student, teacher, tx, plan, mini_rows, seq, micro, dtype
    )
    critic = {k: v for k, v in state.train.params.items() if k != "policy"}
    result.components["critic params"] = bytes_per_device(critic)
    result.notes["critic params"] = objective.critic
    result.components["optimizer state"] = bytes_per_device(state.train.opt_state)
    result.notes["optimizer state"] = "AdamW moments (float32 like the params' dtype) + counters"
    result.components["update activations"] = update_temp
    result.notes["update activations"] = (
        f"compiled update step, {mini_rows} rows x {seq} positions, {micro} micro-batches"
    )

    cache = abstract_cache(student["config"], rollout_rows, cache_slots, dtype, plan)
    kv = bytes_per_device(cache)
    note = f"{rollout_rows} rows x {cache_slots} slots"
    if curriculum.guided_p0 > 0 and teacher is not None:
        teacher_cache = abstract_cache(teacher["config"], rollout_rows, cache_slots, dtype, plan)
        kv += bytes_per_device(teacher_cache)
        note += ", student + teacher"
    result.components["kv cache"] = kv
    result.notes["kv cache"] = note
    log.info("compiling a rollout decode step ...")
    result.components["rollout step"] = plan_rollout_step(
        student["config"], student["params"], cache, 1, plan
    )
    result.notes["rollout step"] = f"one compiled decode step of all {rollout_rows} rows"
    return result


def run_plan(cfg) -> dict:
    """The launcher's ``plan`` mode: print the table, write ``WORKDIR/memory_plan.json``."""
    result = build_memory_plan(cfg)
    print(result.table(), flush=True)
    os.makedirs(cfg.workdir, exist_ok=True)
    out = result.to_dict()
    with open(os.path.join(cfg.workdir, "memory_plan.json"), "w") as f:
        json.dump(out, f, indent=1)
    if result.fits is False:
        raise SystemExit(
            f"memory plan: peak {_fmt(result.peak)} per device exceeds "
            f"plan.device_memory_gib={cfg.plan.device_memory_gib}"
        )
    return out


__all__ = [
    "MemoryPlan",
    "build_memory_plan",
    "run_plan",
    "bytes_per_device",
    "abstract_params",
    "abstract_cache",
    "model_config_from_source",
]
