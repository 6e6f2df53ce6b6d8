"""SDXL stage 2 (paper sec. 2.3): 200k steps at 512x512, initialised from stage 1.

Launch, after stage 1 (params and EMA carry over, the optimizer starts fresh):
    python train.py --config=configs/stage2_512.py --workdir=gs://BUCKET/sdxl/stage2 \\
        --config.init_from=gs://BUCKET/sdxl/stage1
Smoke (CPU, seconds; run stage1_256.py:smoke first):
    python train.py --config=configs/stage2_512.py:smoke --workdir=/tmp/sdxl_smoke/stage2 \\
        --config.init_from=/tmp/sdxl_smoke/stage1
"""

from configs import common

VARIANTS = (None, "smoke")


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.base()
    c.total_steps = 200_000  # SDXL sec. 2.3
    c.data.batch_size = 2048
    c.data.buckets = "square"
    c.data.resolution = 512
    c.optim.warmup_steps = 1_000  # a short re-warm-up for the fresh optimizer state
    c.mesh.fsdp = 8  # activations 4x stage 1: shard params and optimizer state
    c.sample.height = c.sample.width = 512
    if a.smoke:
        common.smoke(c, resolution=96)
        c.mesh.fsdp = 1
    return c
