"""Mesh, logical-axis rules -> shardings, multi-host start-up and global batch assembly.

The only module (besides configs/) that names mesh axes. Models name logical axes (see
sdxl_jax/models/layers.py); `config.sharding_rules` maps them onto the mesh axes below.
"""

from __future__ import annotations

import itertools
import math
import os
import socket

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


# Environment variables of the explicit setting (the local launcher and hand-written scripts use them);
# JAX itself reads JAX_COORDINATOR_ADDRESS too. SDXL_DISTRIBUTED: auto | on | off.
ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_MODE, ENV_HEARTBEAT = "SDXL_DISTRIBUTED", "SDXL_HEARTBEAT_TIMEOUT_S"
# JAX's coordination service declares a process dead after this many seconds without a heartbeat and then
# ends every other process with an error (jax.distributed.initialize(heartbeat_timeout_seconds=...)).
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


def _auto_detected_cluster(env) -> str | None:
    """The multi-process cluster JAX can describe itself (TPU pod slice, SLURM, Open MPI), or None."""
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or int(env.get("MEGASCALE_NUM_SLICES", "1")) > 1:
        return "tpu"
    return None


def initialize_distributed(
    mode: str | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int | None = None,
    init_timeout_s: int = 300,
) -> bool:
    """Start JAX's multi-process runtime when this process is one of several; True when it is running.

    Explicit settings (arguments, else $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID)
    win; otherwise `mode="auto"` lets JAX auto-detect TPU pod slices, SLURM jobs (one process per task)
    and Open MPI, and does nothing on a single host. `mode="on"` always initialises through JAX's
    auto-detection (a TPU VM pod reads its topology from the metadata server), `mode="off"` never.
    Must run before anything touches a JAX device. A process that stops sending heartbeats for
    `heartbeat_timeout_s` is declared dead and the coordination service ends all the others with an error.
    """
    env = os.environ
    mode = mode or env.get(ENV_MODE, "auto")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode {mode!r}: choose auto, on or off (--distributed / ${ENV_MODE})")
    if jax.distributed.is_initialized() or mode == "off":
        return jax.distributed.is_initialized()
    address = coordinator_address or env.get(ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _env_int(env, ENV_COUNT)
    index = process_id if process_id is not None else _env_int(env, ENV_ID)
    explicit = {"coordinator address": address, "process count": count, "process id": index}
    if count is not None or index is not None:
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(
                f"explicit multi-process settings are incomplete: {explicit}; also set the {missing} "
                f"(flags --coordinator_address/--num_processes/--process_id or ${ENV_ADDRESS}, ${ENV_COUNT}, "
                f"${ENV_ID}), or set none of them to let JAX auto-detect the cluster"
            )
    heartbeat = int(heartbeat_timeout_s or env.get(ENV_HEARTBEAT) or DEFAULT_HEARTBEAT_TIMEOUT_S)
    timeouts = dict(initialization_timeout=int(init_timeout_s), heartbeat_timeout_seconds=heartbeat)
    if count is not None:
        if count == 1:
            return False
        how = f"explicit settings, coordinator {address}"
        jax.distributed.initialize(address, count, index, cluster_detection_method="deactivate", **timeouts)
    else:
        cluster = _auto_detected_cluster(env)
        if cluster is None and mode == "auto":
            return False
        how = f"auto-detected {cluster or 'cluster'}"
        jax.distributed.initialize(coordinator_address=address, **timeouts)
    logging.info("jax.distributed: process %d of %d (%s)", jax.process_index(), jax.process_count(), how)
    print(
        f"jax.distributed initialised ({how}): process {jax.process_index()} of {jax.process_count()}; "
        f"a process silent for {heartbeat} s ends the job",
        flush=True,
    )
    return True


def maybe_initialize_distributed() -> None:
    """initialize_distributed() from the environment alone (library entry points call it)."""
    initialize_distributed()


def _env_int(env, key) -> int | None:
    value = env.get(key, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${key}={value!r} must be an integer") from None


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


def fit_spec(shape, spec: P, mesh: Mesh) -> P:
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
        if leaf is None:  # an absent part (a TrainState without its compute copy)
            return None
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rule_list) if spec is not None else P()
        fitted = fit_spec(leaf.shape, mesh_spec, mesh)
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


def host_batch_block(config, mesh: Mesh) -> tuple[int, int]:
    """(block, num_blocks): this process feeds rows [block * G / num_blocks, (block + 1) * G / num_blocks).

    The data pipeline gives host p of P a contiguous block of each global batch (sdxl_jax/data/pipeline.py);
    this is the block the mesh places on this process's devices. Usually (process_index, process_count);
    processes that share a block (batch axes not spanning every host) load the same rows.
    """
    shards = batch_shards(config, mesh)
    sharding = batch_sharding(config, mesh, 1)
    index_map = sharding.addressable_devices_indices_map((shards,))
    rows = sorted({idx[0].indices(shards)[:2] for idx in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    size = stop - start
    if sum(b - a for a, b in rows) != size or shards % size or start % size:
        raise ValueError(
            f"the mesh {dict(mesh.shape)} gives process {jax.process_index()} the batch shards {rows} of "
            f"{shards}, not one contiguous block; order the devices so that each host's devices are "
            "adjacent along the batch axes (data, fsdp), e.g. keep jax.devices() order"
        )
    return start // size, shards // size


def global_batch(local_batch: dict, config, mesh: Mesh) -> dict:
    """Host-local numpy batch (this process's block of rows, see host_batch_block) -> global jax.Arrays."""
    _, blocks = host_batch_block(config, mesh)
    local = {k: np.asarray(v) for k, v in local_batch.items()}
    shardings = {k: batch_sharding(config, mesh, v.ndim) for k, v in local.items()}
    shapes = {k: (v.shape[0] * blocks, *v.shape[1:]) for k, v in local.items()}
    # One call for the whole dict: on one process that is one device_put of every array, not one each.
    return jax.make_array_from_process_local_data(shardings, local, shapes)


def describe_topology(mesh: Mesh, config) -> str:
    """One line per host, printed once at start-up: who am I, what do I hold, which rows do I feed."""
    block, blocks = host_batch_block(config, mesh)
    kind = jax.local_devices()[0].device_kind
    return (
        f"host {jax.process_index()} of {jax.process_count()} ({socket.gethostname()}): "
        f"{jax.local_device_count()} local of {jax.device_count()} {kind} devices; mesh {dict(mesh.shape)}; "
        f"feeds batch block {block} of {blocks}"
    )


def batch_shardings_like(batch: dict, config, mesh: Mesh) -> dict:
    """Shardings for a batch of arrays or of jax.ShapeDtypeStructs."""
    return {k: batch_sharding(config, mesh, np.ndim(v)) for k, v in batch.items()}


_barriers = itertools.count()


def sync_hosts(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process gets here, through JAX's coordination service (no device collective).

    Used where hosts may arrive far apart (one compiles slower, host 0 samples previews alone): CPU
    collectives (gloo) give a late peer only ~30 s to join before failing with "Gloo context
    initialization failed: DEADLINE_EXCEEDED", while this barrier waits `timeout_s`.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client orbax's barriers use too; no public accessor yet

    distributed.global_state.client.wait_at_barrier(f"sdxl:{name}:{next(_barriers)}", timeout_s * 1000)
