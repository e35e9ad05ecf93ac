"""Meshes and logical axis rules on 8 fake CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import dgpo_jax
from dgpo_jax.parallel.sharding import DEFAULT_RULES, ShardingPlan, make_mesh, plan_from_config


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1)])
@pytest.mark.parametrize("axes", [("data", "fsdp"), ("fsdp", "tensor")])
def test_sharded_forward_equals_unsharded(hf_models, shape, axes):
    path, _ = hf_models[(False, 1e6)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 256, (8, 10))
    mask = np.ones((8, 10), np.int32)
    mask[::3, :4] = 0
    ref = np.asarray(dgpo_jax.forward(config, params, ids, mask))
    plan = plan_from_config(dict(zip(axes, shape)))
    sharded = plan.shard_params(config, params)
    if dict(plan.mesh.shape).get("fsdp", 1) > 1:  # parameters really are split
        assert "fsdp" in str(sharded["layers"]["mlp"]["up_kernel"].sharding.spec)
    out = dgpo_jax.forward(
        config, sharded, plan.shard_batch(ids), plan.shard_batch(mask), plan=plan
    )
    np.testing.assert_allclose(np.asarray(out)[mask == 1], ref[mask == 1], atol=2e-5, rtol=0)


def test_load_hf_places_leaves_by_rules(hf_models):
    plan = plan_from_config({"data": 2, "fsdp": 2, "tensor": 2})
    config, params = dgpo_jax.load_hf(hf_models[(True, 1e6)][0], dtype="bfloat16", plan=plan)
    assert params["embed_tokens"].sharding.spec == P("tensor", "fsdp")  # vocab, embed
    assert params["layers"]["attn"]["q_kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["layers"]["mlp"]["down_kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert params["final_norm"].sharding.spec == P(None)


def test_rules_collision_and_unknown_axis_errors():
    mesh = make_mesh({"data": 2, "fsdp": 4})
    plan = ShardingPlan(mesh, (("embed", "fsdp"), ("mlp", "fsdp"), ("batch", "data")))
    with pytest.raises(
        ValueError, match="mesh axis 'fsdp' is used by logical axes 'embed' and 'mlp'"
    ):
        plan.spec(("embed", "mlp"))
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'heads'"):
        plan.spec(("batch", "heads"))
    with pytest.raises(ValueError, match="more than one sharding rule"):
        ShardingPlan(mesh, (("embed", "fsdp"), ("embed", None)))


def test_indivisible_dimension_is_replicated():
    plan = ShardingPlan(make_mesh({"tensor": 8}), DEFAULT_RULES)
    assert plan.spec(("kv_heads",), (2,)) == P(None)  # 2 KV heads cannot split 8 ways
    assert plan.spec(("mlp",), (64,)) == P("tensor")


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 6 devices, but 8 are available"):
        make_mesh({"data": 2, "fsdp": 3})
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})
    assert dict(make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4}
