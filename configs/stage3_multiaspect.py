"""SDXL stage 3 (paper sec. 2.3 and App. I): multi-aspect training on the paper's 40 buckets of ~1024^2,
offset noise 0.05, initialised from stage 2. The paper does not give the step count; 100k is a start.

Launch:
    python train.py --config=configs/stage3_multiaspect.py --workdir=gs://BUCKET/sdxl/stage3 \\
        --config.init_from=gs://BUCKET/sdxl/stage2
Fine-tune the released weights instead:
    python train.py --config=configs/stage3_multiaspect.py --workdir=/ckpt/ft \\
        --config.init_from=/models/stable-diffusion-xl-base-1.0 --config.optim.lr=1e-5
TPU v5e (16 GiB a chip), fsdp 8 and 2 rows per chip: add --config.model.scan_blocks=True. With splash
attention (model.attention "auto" on TPUs) that allocates 14.16 GiB of HBM, compiled ahead of time, and a
step is estimated at 331 ms, against 14.40 GiB and 499 ms with --config.model.attention=chunked
(bench/RESULTS.md, sessions 24, 26 to 29; neither yet run on a TPU).
Smoke (CPU, tiny models, three small buckets, seconds):
    python train.py --config=configs/stage3_multiaspect.py:smoke --workdir=/tmp/sdxl_smoke/stage3
"""

from configs import common

VARIANTS = (None, "smoke")


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.base()
    c.total_steps = 100_000
    c.data.batch_size = 1024  # a batch comes from one bucket; ~1M pixels per image
    c.data.buckets = "sdxl"
    c.data.resolution = 1024
    c.diffusion.offset_noise = 0.05  # SDXL sec. 2.3 / SPEC.md
    c.optim.warmup_steps = 1_000
    c.mesh.fsdp = 8
    c.model.remat = "dots"
    if a.smoke:
        common.smoke(c, resolution=64)
        c.data.buckets = "generated"  # (48, 80), (64, 64), (80, 48): sides on a 16-pixel grid
        c.data.bucket_side_step = 16
        c.data.bucket_min_side = 48
        c.data.bucket_max_side = 96
        c.mesh.fsdp = 1
        c.model.remat = "none"
    return c
