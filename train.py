"""Train one SDXL stage: `python train.py --config=configs/stage1_256.py --workdir=DIR [--config.k=v ...]`.

Rerunning the same command resumes from DIR's newest checkpoint. See configs/*.py for each stage's
launch command and `:smoke` variant, and launch/README.md for pods and clusters: every host runs this same
command; JAX's multi-process runtime is started from the cluster's environment (TPU pod slice, SLURM) or
from --coordinator_address/--num_processes/--process_id (or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES,
$JAX_PROCESS_ID, which launch/local.py sets).
"""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "config file, e.g. configs/stage1_256.py:smoke", lock_config=True
)
flags.DEFINE_string(
    "workdir", None, "stage directory (local or gs://): checkpoints, metrics.jsonl, tensorboard, samples"
)
flags.DEFINE_enum(
    "distributed", None, ["auto", "on", "off"],
    "multi-process start-up: auto (explicit settings, SLURM, Open MPI, TPU env; else single process), "
    "on (always jax.distributed.initialize(), e.g. a TPU VM pod), off. Default: $SDXL_DISTRIBUTED or auto",
)  # fmt: skip
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (default $JAX_COORDINATOR_ADDRESS)")
flags.DEFINE_integer("num_processes", None, "number of processes (default $JAX_NUM_PROCESSES)")
flags.DEFINE_integer("process_id", None, "this process's index, 0-based (default $JAX_PROCESS_ID)")
flags.DEFINE_integer(
    "heartbeat_timeout_s", None,
    "a process silent this long is declared dead and the others stop with an error "
    "(default $SDXL_HEARTBEAT_TIMEOUT_S or 100)",
)  # fmt: skip
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.key=value")
    from sdxl_jax import parallel

    # Before anything touches a device: jax.distributed must start first.
    f = flags.FLAGS
    parallel.initialize_distributed(
        f.distributed, f.coordinator_address, f.num_processes, f.process_id,
        heartbeat_timeout_s=f.heartbeat_timeout_s,
    )  # fmt: skip
    from sdxl_jax import train_lib

    train_lib.train_and_evaluate(f.config, f.workdir)


if __name__ == "__main__":
    app.run(main)
