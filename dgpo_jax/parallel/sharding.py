"""Device meshes and logical axis rules.

The model names every parameter and activation axis with a *logical* name (``embed``,
``q_heads``, ``batch`` ...). A ``ShardingPlan`` holds a mesh and the rules (plain data, from the
config) that map logical names to mesh axes; everything that places arrays goes through it:
parameters, optimizer state, batches, and activation constraints inside the model.

Rules are a sequence of ``(logical_name, mesh_axes)`` pairs where ``mesh_axes`` is ``None``, a
mesh axis name, or a tuple of them. Mesh axes that the mesh does not have, or that do not divide
the dimension, are dropped for that dimension (so the same rules serve 1-axis and 3-axis meshes,
and 2 KV heads simply replicate over a tensor axis of 4). A mesh axis used twice within one
array's spec is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dgpo_jax.models import qwen2
from dgpo_jax.parallel.distributed import device_put_global, tree_device_put_global

log = logging.getLogger(__name__)

# Parameters: FSDP over ``fsdp`` on the embedding dimension, tensor parallelism over ``tensor``
# on heads / FFN / vocab. Activations: batch over ``data`` and ``fsdp``; heads and FFN over
# ``tensor``. Override any of these from the config (``mesh.rules``).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_seq", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(
    shape: Mapping[str, int] | Sequence[int] = None,
    axis_names: Sequence[str] = MESH_AXES,
    devices=None,
) -> Mesh:
    """A named mesh. ``shape`` maps axis name -> size; one size may be -1 (all the rest).

    ``make_mesh({"data": 2, "fsdp": -1})`` on 8 devices is a 2x4 mesh. Default: everything on
    ``fsdp``.
    """
    devices = list(devices if devices is not None else jax.devices())
    if shape is None:
        shape = {"fsdp": -1}
    if isinstance(shape, Mapping):
        axis_names, sizes = tuple(shape.keys()), [int(v) for v in shape.values()]
    else:
        sizes = [int(v) for v in shape]
        axis_names = tuple(axis_names)[: len(sizes)]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {dict(zip(axis_names, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh shape {dict(zip(axis_names, sizes))} does not divide {len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(axis_names, sizes))} needs {math.prod(sizes)} "
            f"devices, but {len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(sizes),
        axis_names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
        devices=devices,
    )


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A mesh plus logical-axis rules. Hashable, so it can be a static jit argument."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES

    def __post_init__(self):
        normalised = []
        seen = set()
        for item in self.rules:
            if len(item) != 2:
                raise ValueError(f"sharding rule {item!r} must be a (logical_name, mesh_axes) pair")
            name, axes = item
            if name in seen:
                raise ValueError(f"logical axis {name!r} has more than one sharding rule")
            seen.add(name)
            normalised.append((name, _as_tuple(axes)))
        object.__setattr__(self, "rules", tuple(normalised))

    @property
    def rule_map(self) -> dict[str, tuple[str, ...]]:
        return dict(self.rules)

    def spec(
        self, names: Sequence[str | None], shape: Sequence[int] | None = None
    ) -> PartitionSpec:
        """Logical names (one per dimension) -> ``PartitionSpec`` on this mesh."""
        rules, mesh_shape = self.rule_map, dict(self.mesh.shape)
        used: dict[str, str] = {}
        out = []
        for dim, name in enumerate(names):
            if name is None:
                out.append(None)
                continue
            if name not in rules:
                raise KeyError(
                    f"no sharding rule for logical axis {name!r} (axes {tuple(names)}); "
                    f"known: {sorted(rules)}"
                )
            axes = []
            size = 1
            for ax in rules[name]:
                if ax not in mesh_shape or mesh_shape[ax] == 1:
                    continue
                if ax in used:
                    raise ValueError(
                        f"sharding rules collide: mesh axis {ax!r} is used by logical axes "
                        f"{used[ax]!r} and {name!r} in the same array (axes {tuple(names)})"
                    )
                if shape is not None and shape[dim] % (size * mesh_shape[ax]):
                    log.debug(
                        "axis %s (size %d) not divisible by mesh axis %s: replicated",
                        name,
                        shape[dim],
                        ax,
                    )
                    continue
                used[ax] = name
                axes.append(ax)
                size *= mesh_shape[ax]
            out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
        return PartitionSpec(*out)

    def sharding(self, names, shape=None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    def constrain(self, x: jax.Array, names) -> jax.Array:
        """``with_sharding_constraint`` by logical names (used inside the model)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))

    # --- trees ------------------------------------------------------------------------------
    def tree_shardings(self, logical_tree, shapes_tree):
        """Map a tree of logical ``PartitionSpec`` leaves + matching shapes to ``NamedSharding``."""
        is_spec = lambda x: isinstance(x, PartitionSpec)
        return jax.tree.map(
            lambda names, s: self.sharding(tuple(names), s.shape),
            logical_tree,
            shapes_tree,
            is_leaf=is_spec,
        )

    def param_shardings(self, config) -> Any:
        return self.tree_shardings(qwen2.param_logical_axes(config), qwen2.param_shapes(config))

    def shard_params(self, config, params) -> Any:
        return tree_device_put_global(params, self.param_shardings(config))

    def batch_shards(self, rows: int | None = None) -> int:
        """How many ways the plan splits a batch's rows (the mesh axes of the ``batch`` rule;
        for a ``rows``-row batch only those that divide it, as `spec` places it)."""
        spec = self.spec(("batch",), None if rows is None else (rows,))[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
        return math.prod(int(self.mesh.shape[a]) for a in axes)

    def batch_sharding(self, ndim: int, shape=None) -> NamedSharding:
        """Leading dimension over the batch axes, the rest replicated."""
        return self.sharding(("batch",) + (None,) * (ndim - 1), shape)

    def shard_batch(self, batch):
        """Place every array of a batch pytree with its leading dimension over the batch axes.
        With several processes, each passes the same global batch and sends its own shards."""

        return jax.tree.map(
            lambda x: device_put_global(x, self.batch_sharding(np.ndim(x), np.shape(x))), batch
        )


def plan_from_config(
    mesh_shape: Mapping[str, int] | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    devices=None,
) -> ShardingPlan:
    """Builds the plan from config data: ``mesh_shape`` like ``{"data": 1, "fsdp": -1}`` and
    optional rule overrides (merged over ``DEFAULT_RULES``)."""
    merged = dict(DEFAULT_RULES)
    for name, axes in rules or ():
        merged[name] = axes
    return ShardingPlan(make_mesh(mesh_shape, devices=devices), tuple(merged.items()))
