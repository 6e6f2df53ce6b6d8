"""SDXL stage 1 (paper sec. 2.3): 600k steps at 256x256, batch 2048, size and crop conditioning.

Launch (TPU / GPU pod; every host runs the same command, see launch/README.md):
    python train.py --config=configs/stage1_256.py --workdir=gs://BUCKET/sdxl/stage1 \\
        --config.data.source=webdataset --config.data.path='gs://BUCKET/data/{00000..09999}.tar'
Smoke (CPU, tiny models, the built-in shapes data, seconds):
    python train.py --config=configs/stage1_256.py:smoke --workdir=/tmp/sdxl_smoke/stage1
"""

from configs import common

VARIANTS = (None, "smoke")


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.base()
    c.total_steps = 600_000  # SDXL sec. 2.3
    c.data.batch_size = 2048
    c.data.buckets = "square"
    c.data.resolution = 256
    # Size conditioning needs the original sizes of small images too, so none is filtered out
    # (SDXL sec. 2.2: conditioning instead of discarding ~39% of the data below 256^2).
    c.data.min_image_side = 0
    c.mesh.fsdp = 1  # 2.6B params fit replicated at 256^2 on 16 GB+; raise on smaller devices
    c.sample.height = c.sample.width = 256
    if a.smoke:
        common.smoke(c, resolution=64)
    return c
