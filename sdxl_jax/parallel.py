"""Mesh, logical-axis rules -> shardings, multi-host start-up and global batch assembly.

The only module (besides configs/) that names mesh axes. Models name logical axes (see
sdxl_jax/models/layers.py); `config.sharding_rules` maps them onto the mesh axes below.
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# A parameter at least this large (elements) must not stay fully replicated when fsdp > 1: replicating
# e.g. a 1280x5120 feed-forward kernel on every device defeats the point of FSDP.
LARGE_PARAM_SIZE = 1 << 20


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() when the environment describes several processes.

    TPU pod slices, SLURM jobs and explicit coordinator settings are auto-detected by JAX; on a single
    host there is nothing to initialise and calling it would fail to find a coordinator.
    """
    env = os.environ
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        logging.info("process %d of %d", jax.process_index(), jax.process_count())


def _named(sizes) -> dict:
    return dict(zip(MESH_AXES, sizes, strict=True))


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Axis sizes in MESH_AXES order; one axis may be -1 ("the rest of the devices")."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {_named(sizes)}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise ValueError(
            f"config.mesh {_named(sizes)} does not fit {num_devices} devices: the fixed axis "
            f"sizes must be positive and their product ({known}) must divide the device count"
        )
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh {_named(sizes)} uses {math.prod(sizes)} devices but {num_devices} "
            "are present; set one axis to -1 to take the rest"
        )
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axis types: shardings come from the rules + constraints, not from explicit-sharding types.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules(config) -> tuple:
    return tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in config.sharding_rules)


def batch_axes(config) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over (the rule for "activation_batch")."""
    for name, axes in rules(config):
        if name == "activation_batch":
            return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return ()


def batch_shards(config, mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(config))


def _fit_spec(shape, spec: P, mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. a 4-channel conv over fsdp=8)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        names = tuple(a for a in names if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in names)
        out.append(None if not names or dim % size else (names[0] if len(names) == 1 else names))
    return P(*out)


def logical_shardings(abstract_tree, mesh: Mesh, config, *, check_large: bool = True):
    """NamedShardings for a pytree of (boxed) abstract params: nn.Partitioned / LogicallyPartitioned leaves.

    Returns an unboxed pytree of shardings with the structure of `nn.meta.unbox(abstract_tree)`.
    Leaves without logical names are replicated. With fsdp > 1, a large parameter that ends up
    replicated (no rule shards it, or its sharded dimension does not divide) is an error.
    """
    logical = nn.get_partition_spec(abstract_tree)
    unboxed = nn.meta.unbox(abstract_tree)
    rule_list = rules(config)
    replicated_large = []

    def one(path, leaf, spec):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rule_list) if spec is not None else P()
        fitted = _fit_spec(leaf.shape, mesh_spec, mesh)
        if check_large and all(a is None for a in fitted) and math.prod(leaf.shape) >= LARGE_PARAM_SIZE:
            replicated_large.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} logical {spec}")
        return NamedSharding(mesh, fitted)

    shardings = jax.tree_util.tree_map_with_path(
        one, unboxed, logical, is_leaf=lambda x: x is None or isinstance(x, P)
    )
    if replicated_large and mesh.shape["fsdp"] > 1:
        raise ValueError(
            f"{len(replicated_large)} large parameters would stay replicated with fsdp={mesh.shape['fsdp']}: "
            + "; ".join(replicated_large[:5])
            + ". Map one of their logical axes to 'fsdp' in config.sharding_rules or pick an fsdp size "
            "that divides their dimensions."
        )
    return shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(config, mesh: Mesh, ndim: int) -> NamedSharding:
    axes = batch_axes(config)
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def global_batch(local_batch: dict, config, mesh: Mesh) -> dict:
    """Host-local numpy batch (this process's rows) -> global jax.Arrays split over the batch axes."""
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(batch_sharding(config, mesh, value.ndim), value)
    return out


def batch_shardings_like(batch: dict, config, mesh: Mesh) -> dict:
    return {k: batch_sharding(config, mesh, np.ndim(v)) for k, v in batch.items()}
