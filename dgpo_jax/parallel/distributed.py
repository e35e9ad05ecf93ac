"""Several JAX processes (TPU pod hosts, GPU nodes, or CPU processes on one machine).

The training loop is written once for one or many processes, with one rule: every process
holds the same *global* host batch (prompts, rollout tokens, rewards are tiny next to the
models) and places it on the global mesh with ``ShardingPlan.shard_batch``, which transfers
only the shards of its own devices. Device results come back with ``to_host``, which gathers
arrays that span other processes. The sampler's host callback (retrieval) runs on the process
that owns the first device of the mesh and its results reach every process through the
compiled program. Files (metrics, results) are written by process 0 only; orbax checkpoints
are written by all processes together.

Started when the environment says so (``initialize_from_env``):

* ``JAX_COORDINATOR_ADDRESS`` (host:port) + ``DGPO_NUM_PROCESSES`` + ``DGPO_PROCESS_ID``:
  explicit, e.g. several CPU processes on one machine (tests, ``launch/``);
* a TPU pod (``TPU_WORKER_HOSTNAMES`` on GKE; on plain Cloud TPU VMs, which do not set it,
  ``DGPO_NUM_PROCESSES`` = the number of workers, as ``launch/tpu_pod.sh`` does) or a SLURM job
  with several tasks (``SLURM_NTASKS``): ``jax.distributed.initialize()`` discovers the rest.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def wants_distributed(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(
        env.get("JAX_COORDINATOR_ADDRESS")
        or env.get("DGPO_NUM_PROCESSES", "1") not in ("", "1")
        or env.get("TPU_WORKER_HOSTNAMES")
        or env.get("SLURM_NTASKS", "1") not in ("", "1")
    )


def initialize_from_env() -> bool:
    """``jax.distributed.initialize`` when the environment describes several processes.
    Returns whether it ran. CPU processes exchange data through gloo collectives."""
    env = os.environ
    if not wants_distributed(env):
        return False
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("DGPO_NUM_PROCESSES", "DGPO_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS is set but {missing} are not: set the number of "
                "processes and this process's id (0-based)"
            )
        kwargs = dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["DGPO_NUM_PROCESSES"]),
            process_id=int(env["DGPO_PROCESS_ID"]),
        )
        if env.get("DGPO_LOCAL_DEVICE_IDS"):
            kwargs["local_device_ids"] = [int(i) for i in env["DGPO_LOCAL_DEVICE_IDS"].split(",")]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    log.info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_primary() -> bool:
    """Process 0 writes the files a run produces (metrics, results, exports)."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Device arrays -> numpy, gathering the shards other processes hold (every process gets
    the whole array). Non-array leaves pass through."""

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils  # noqa: PLC0415 (libtpu topologies only when asked for)

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def device_put_global(x: Any, sharding) -> Any:
    """``jax.device_put`` that also works when ``sharding`` spans other processes' devices and
    ``x`` is a host value or a local device array (every process passes the same value; each
    transfers only its own shards). Typed PRNG keys go through their key data."""
    spans_processes = not sharding.is_fully_addressable
    if not spans_processes or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = device_put_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)


def tree_device_put_global(tree: Any, shardings: Any) -> Any:
    """``device_put_global`` leaf by leaf; ``shardings`` is one sharding or a matching tree."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: device_put_global(x, shardings), tree)
    return jax.tree.map(device_put_global, tree, shardings)
