"""The embedded default: tiny SDXL-shaped models on the built-in shapes data; trains on a laptop CPU in
minutes and learns to draw coloured shapes from their captions.

    python train.py --config=configs/shapes.py --workdir=/tmp/sdxl_shapes
    python train.py --config=configs/shapes.py:smoke --workdir=/tmp/sdxl_shapes_smoke
"""

from configs import common

VARIANTS = (None, "smoke")


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.base()
    common.smoke(c, resolution=64)
    c.data.batch_size = 16
    c.total_steps = 3_000
    c.log_every = 50
    c.checkpoint_every = 500
    c.sample_every = 500
    c.optim.warmup_steps = 100
    c.optim.lr = 3e-4
    c.ema.decay = 0.999
    c.sample.steps = 20
    if a.smoke:
        common.smoke(c, resolution=64)
    return c
