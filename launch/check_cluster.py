"""Check a multi-host setup before a long run: every host runs this, like train.py.

    python launch/check_cluster.py [--workdir=gs://BUCKET/tmp/check] [--steps=5]
    python launch/local.py --num_processes=2 --devices_per_process=4 -- python launch/check_cluster.py

It starts jax.distributed the way train.py does (same flags / environment), prints each host's topology
line, assembles a global batch from per-host rows (sdxl_jax.parallel.global_batch) and checks that a
cross-host reduction over it sees every row exactly once, waits at a coordination-service barrier, then
(with --workdir) writes and reads back a sharded orbax checkpoint collectively. It ends with
"cluster check passed" on host 0.
--fail_process=K makes process K exit abruptly (os._exit) after --fail_after_step steps, to see how the
job ends when a host dies: the others must stop with an error within about the heartbeat timeout.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("workdir", "", "also write + read a small sharded checkpoint here (local or gs://)")
flags.DEFINE_integer("steps", 3, "cross-host reductions to run")
flags.DEFINE_float("step_sleep_s", 0.0, "pause between reductions")
flags.DEFINE_integer("rows_per_device", 2, "global batch rows per device")
flags.DEFINE_integer("fail_process", -1, "this process exits abruptly (simulated host failure)")
flags.DEFINE_integer("fail_after_step", 1, "... after this many reductions")
flags.DEFINE_enum("distributed", None, ["auto", "on", "off"], "as in train.py")
flags.DEFINE_integer("heartbeat_timeout_s", None, "as in train.py")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sdxl_jax import parallel

    parallel.initialize_distributed(FLAGS.distributed, heartbeat_timeout_s=FLAGS.heartbeat_timeout_s)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import common

    config = common.base()
    mesh = parallel.make_mesh(config.mesh)
    print(parallel.describe_topology(mesh, config), flush=True)
    block, blocks = parallel.host_batch_block(config, mesh)
    g = FLAGS.rows_per_device * jax.device_count()
    local = g // blocks
    rows = np.arange(block * local, (block + 1) * local, dtype=np.int32)
    total = jax.jit(lambda x: jnp.sum(x))
    for step in range(1, FLAGS.steps + 1):
        t0 = time.time()
        batch = parallel.global_batch({"row": rows + step}, config, mesh)["row"]
        got, want = int(total(batch)), int(np.arange(g).sum() + g * step)
        if got != want:
            raise SystemExit(f"cross-host sum {got} != {want}: hosts' rows overlap or are missing")
        print(f"step {step}: cross-host sum over {g} rows ok ({time.time() - t0:.2f} s)", flush=True)
        if step == FLAGS.fail_after_step and jax.process_index() == FLAGS.fail_process:
            print(f"process {jax.process_index()}: simulated failure, exiting abruptly", flush=True)
            os._exit(3)
        time.sleep(FLAGS.step_sleep_s)
    # Hosts arriving far apart must wait at a barrier, not in a (time-limited) collective.
    time.sleep(3 * jax.process_index())
    parallel.sync_hosts("cluster check", timeout_s=60)
    print("coordination-service barrier ok", flush=True)
    if FLAGS.workdir:
        _check_checkpoint(FLAGS.workdir, mesh)
    if jax.process_index() == 0:
        print("cluster check passed", flush=True)


def _check_checkpoint(workdir, mesh):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from etils import epath
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    n = 4 * jax.device_count()
    x = jax.jit(lambda: jnp.arange(n, dtype=jnp.float32), out_shardings=sharding)()
    path = epath.Path(workdir) / "cluster_check"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"x": x}, force=True)
        ckptr.wait_until_finished()
        back = ckptr.restore(path, {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)})
    ok = all(
        np.array_equal(np.asarray(s.data), np.asarray(t.data))
        for s, t in zip(back["x"].addressable_shards, x.addressable_shards, strict=True)
    )
    if not ok:
        raise SystemExit(f"checkpoint round trip through {path} changed the data")
    print(f"collective checkpoint write + read at {path} ok", flush=True)


if __name__ == "__main__":
    app.run(main)
