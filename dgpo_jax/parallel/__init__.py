"""Parallelism: device meshes and logical-axis sharding rules (`dgpo_jax.parallel.sharding`),
several JAX processes (`dgpo_jax.parallel.distributed`)."""
