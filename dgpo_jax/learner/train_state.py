"""Training state: step, params, optimizer state and PRNG key in one pytree.

`TrainState` is a plain registered dataclass (no methods that close over an
optimizer), so it can be passed through `jax.jit`, donated, and checkpointed
with `dgpo_jax.checkpoint`.

Sharding: `create_train_state` builds the optimizer state inside `jax.jit`
with explicit `out_shardings`, so every optimizer leaf that mirrors a parameter
(Adam's `mu`/`nu`, momentum traces, ...) gets exactly that parameter's sharding,
and every other leaf (step counts, scalars, factored statistics) is replicated
over the parameters' mesh. Without this, the moments may come out replicated
or on one device, silently doubling or tripling per-device memory.

PRNG keys are new-style typed keys (`jax.random.key`); a raw `uint32[2]`
key from `jax.random.PRNGKey` is accepted and wrapped.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from dgpo_jax.parallel.distributed import device_put_global

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything the train step reads and returns.

    Attributes:
        step: int32[] number of optimizer updates applied so far.
        params: model parameter pytree (jax.Arrays, typically sharded).
        opt_state: optax state for `params`; leaves mirroring a parameter
            share that parameter's shape and sharding.
        rng: typed PRNG key array, shape [] (dtype `key<impl>`).
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array


def _key_name(entry: Any) -> str:
    """One path entry of `jax.tree_util.tree_flatten_with_path` as a string."""
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def path_to_names(path: tuple) -> tuple[str, ...]:
    """A pytree key path as a tuple of strings, e.g. ('opt_state', '0', 'mu', 'w')."""
    return tuple(_key_name(entry) for entry in path)


def _leaf_sharding(leaf: Any) -> Sharding:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, Sharding):
        return sharding
    return SingleDeviceSharding(jax.devices()[0])


def replicated_sharding_like(params: PyTree) -> Sharding:
    """A fully replicated sharding on the mesh the params live on.

    The first `NamedSharding` among the params gives the mesh; if there is
    none (single-device params), the first param's sharding is used.
    """
    leaves = jax.tree.leaves(params)
    for leaf in leaves:
        sharding = _leaf_sharding(leaf)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    if leaves:
        return _leaf_sharding(leaves[0])
    return SingleDeviceSharding(jax.devices()[0])


def optimizer_state_shardings(params: PyTree, abstract_opt_state: PyTree) -> PyTree:
    """Sharding for each optimizer-state leaf, derived from the params.

    An optimizer leaf whose key path ends with a parameter's key path (e.g.
    `('0', 'mu', 'layers', 'w')` ends with `('layers', 'w')`) and has that
    parameter's shape gets the parameter's sharding; the longest matching
    suffix wins. Every other leaf is replicated on the params' mesh.

    Args:
        params: pytree of arrays (concrete or `jax.ShapeDtypeStruct` with
            `.sharding`).
        abstract_opt_state: `jax.eval_shape(tx.init, params)`.

    Returns:
        A pytree of `jax.sharding.Sharding` with the structure of
        `abstract_opt_state`.
    """
    sharding_by_path = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        sharding_by_path[path_to_names(path)] = (tuple(leaf.shape), _leaf_sharding(leaf))
    replicated = replicated_sharding_like(params)

    def pick(path, opt_leaf):
        names = path_to_names(path)
        for start in range(len(names)):
            match = sharding_by_path.get(names[start:])
            if match is not None and match[0] == tuple(opt_leaf.shape):
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def _as_typed_key(rng: jax.Array) -> jax.Array:
    rng = jnp.asarray(rng)
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(
                f"rng must be a single key of shape (), got a key array of shape {rng.shape}"
            )
        return rng
    if rng.dtype == jnp.uint32 and rng.shape == (2,):
        return jax.random.wrap_key_data(rng)
    raise ValueError(
        "rng must be a typed key from jax.random.key(seed) or a raw uint32[2] key from "
        f"jax.random.PRNGKey(seed); got dtype {rng.dtype}, shape {rng.shape}"
    )


def create_train_state(
    params: PyTree, tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """Builds step 0 of training. Call it outside `jax.jit` (it reads the params' shardings).

    Args:
        params: parameter pytree of jax.Arrays, already placed/sharded as
            training wants them; the optimizer state follows these shardings.
        tx: the optax optimizer.
        rng: `jax.random.key(seed)` (or a raw `jax.random.PRNGKey(seed)`,
            which is wrapped into a typed key).

    Returns:
        TrainState with step = int32 0, replicated over the params' mesh, and
        `rng` replicated likewise.
    """
    abstract_opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = optimizer_state_shardings(params, abstract_opt_state)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    replicated = replicated_sharding_like(params)
    step = device_put_global(jnp.zeros((), jnp.int32), replicated)
    rng = device_put_global(_as_typed_key(rng), replicated)
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def apply_gradients(
    state: TrainState, grads: PyTree, tx: optax.GradientTransformation
) -> TrainState:
    """One optimizer update (pure; jit it with `tx` closed over or static).

    Args:
        state: current state.
        grads: pytree with the structure and shapes of `state.params`.
        tx: the optimizer `state.opt_state` was created with.

    Returns:
        The state with updated params and opt_state and step + 1; `rng` is
        unchanged (split it in the train step where randomness is used).
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)
