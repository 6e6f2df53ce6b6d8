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


def test_initialize_distributed_single_process_and_bad_settings(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "SDXL_DISTRIBUTED"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    # One host, nothing configured (and the tests' backend already started): nothing to initialise.
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed("off", "127.0.0.1:1", 2, 0) is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    assert parallel.initialize_distributed() is False  # an explicit 1-process job is a plain run
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"incomplete.*\['coordinator address'\]"):
        parallel.initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match=r"\$JAX_PROCESS_ID='one' must be an integer"):
        parallel.initialize_distributed()
    with pytest.raises(ValueError, match="choose auto, on or off"):
        parallel.initialize_distributed("maybe")


def test_cluster_auto_detection_from_the_environment():
    assert parallel._auto_detected_cluster({}) is None
    assert parallel._auto_detected_cluster({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"}) is None
    slurm = {"SLURM_NTASKS": "16", "SLURM_JOB_ID": "5", "SLURM_STEP_NODELIST": "gpu[01-02]"}
    assert parallel._auto_detected_cluster(slurm) == "slurm"
    assert parallel._auto_detected_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"
    assert parallel._auto_detected_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == "tpu"
    assert parallel._auto_detected_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None


def test_one_host_feeds_the_whole_batch_and_describes_itself():
    config = _config(data=2, fsdp=4)
    mesh = parallel.make_mesh(config.mesh)
    assert parallel.host_batch_block(config, mesh) == (0, 1)
    line = parallel.describe_topology(mesh, config)
    assert "host 0 of 1" in line and "8 local of 8 cpu devices" in line and "'fsdp': 4" in line
    # Batch axes that do not cover the mesh (tensor replicates rows): still one block on one host.
    config.mesh.update(data=2, fsdp=2, tensor=2)
    assert parallel.host_batch_block(config, parallel.make_mesh(config.mesh)) == (0, 1)
