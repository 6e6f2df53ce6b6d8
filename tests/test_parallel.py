"""Mesh from config, logical rules -> shardings, the replicated-large-param check, global batches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from sdxl_jax import parallel
from sdxl_jax.models import layers


class _Tiny(nn.Module):
    width: int = 64

    @nn.compact
    def __call__(self, x):
        h = layers.conv(self.width, 3, name="conv")(x)
        h = layers.GroupNorm(num_groups=8, name="norm")(h)
        h = layers.dense(4 * self.width, ("embed", "mlp"), name="up")(h)
        return layers.conv(4, 1, name="out")(h)


def _config(**mesh):
    c = common.base()
    c.mesh.update(mesh)
    return c


def test_mesh_shape_minus_one_takes_the_rest():
    assert parallel.mesh_shape(_config().mesh, 8) == (8, 1, 1)
    assert parallel.mesh_shape(_config(data=-1, fsdp=4).mesh, 8) == (2, 4, 1)
    assert parallel.mesh_shape(_config(data=2, fsdp=2, tensor=2).mesh, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        parallel.mesh_shape(_config(data=-1, fsdp=-1).mesh, 8)
    with pytest.raises(ValueError, match="does not fit 8 devices"):
        parallel.mesh_shape(_config(data=-1, fsdp=3).mesh, 8)
    with pytest.raises(ValueError, match="uses 4 devices but 8"):
        parallel.mesh_shape(_config(data=2, fsdp=2).mesh, 8)


def test_make_mesh_uses_all_devices():
    mesh = parallel.make_mesh(_config(data=-1, fsdp=4).mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh.devices.size == jax.device_count() == 8


def _abstract(module, shape=(1, 8, 8, 3)):
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(shape))["params"]


def test_logical_shardings_follow_the_rules_and_skip_undivisible_dims():
    config = _config(data=2, fsdp=4)
    mesh = parallel.make_mesh(config.mesh)
    sh = parallel.logical_shardings(_abstract(_Tiny()), mesh, config)
    # conv kernel HWIO (None, None, conv_in, conv_out): conv_out -> fsdp
    assert sh["conv"]["kernel"].spec == P(None, None, None, "fsdp")
    # dense (embed, mlp): embed -> fsdp, mlp -> tensor (size 1: left out)
    assert sh["up"]["kernel"].spec == P("fsdp", None)
    # norm params are replicated; 4 output channels divide over fsdp=4
    assert sh["norm"]["norm"]["scale"].spec == P(None)
    assert sh["out"]["kernel"].spec == P(None, None, None, "fsdp")
    config8 = _config(data=1, fsdp=8)
    sh8 = parallel.logical_shardings(_abstract(_Tiny()), parallel.make_mesh(config8.mesh), config8)
    assert sh8["out"]["kernel"].spec == P(None, None, None, None)  # 4 output channels over 8: replicated


def test_large_replicated_param_is_an_error_under_fsdp():
    config = _config(data=1, fsdp=8)
    mesh = parallel.make_mesh(config.mesh)
    big = _Tiny(width=1024)  # up: 1024 x 4096 = 4M elements
    config.sharding_rules = tuple((n, None if n in ("embed", "mlp") else a) for n, a in config.sharding_rules)
    with pytest.raises(ValueError, match=r"large parameters would stay replicated.*\['up'\]\['kernel'\]"):
        parallel.logical_shardings(_abstract(big), mesh, config)
    # without fsdp, replication is the plan, not a mistake
    config1 = _config(data=-1)
    config1.sharding_rules = config.sharding_rules
    parallel.logical_shardings(_abstract(big), parallel.make_mesh(config1.mesh), config1)


def test_global_batch_splits_rows_over_data_and_fsdp():
    config = _config(data=2, fsdp=4)
    mesh = parallel.make_mesh(config.mesh)
    local = {
        "image": np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3),
        "ids_l": np.ones((8, 77)),
    }
    batch = parallel.global_batch(local, config, mesh)
    assert batch["image"].shape == (8, 2, 2, 3)
    assert batch["image"].sharding.spec == P(("data", "fsdp"), None, None, None)
    assert {s.data.shape for s in batch["image"].addressable_shards} == {(1, 2, 2, 3)}
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
    assert parallel.batch_shards(config, mesh) == 8


def test_logical_constraints_apply_under_set_mesh():
    # The models' nn.with_logical_constraint must see the mesh set by jax.set_mesh (not `with mesh:`).
    config = _config(data=2, fsdp=4)
    mesh = parallel.make_mesh(config.mesh)

    def f(x):
        return nn.with_logical_constraint(x * 2, layers.IMAGE_AXES)

    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules(config)):
        out = jax.jit(f)(jnp.ones((8, 4, 4, 2)))
    assert out.sharding.spec[0] == ("data", "fsdp")
