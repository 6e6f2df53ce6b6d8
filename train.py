"""Train one SDXL stage: `python train.py --config=configs/stage1_256.py --workdir=DIR [--config.k=v ...]`.

Rerunning the same command resumes from DIR's newest checkpoint. See configs/*.py for each stage's
launch command and `:smoke` variant.
"""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "config file, e.g. configs/stage1_256.py:smoke", lock_config=True
)
flags.DEFINE_string(
    "workdir", None, "this stage's directory: checkpoints, metrics.jsonl, tensorboard, samples"
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.key=value")
    from sdxl_jax import train_lib

    train_lib.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
