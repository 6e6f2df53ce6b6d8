"""The SDXL refiner (paper sec. 2.5): the refiner UNet on the same latent space, trained on the first 200
noise scales only (discrete sigma indices [0, 200)), conditioned on bigG text, size, crop and aesthetic
score, multi-aspect buckets.

Launch:
    python train.py --config=configs/refiner.py --workdir=gs://BUCKET/sdxl/refiner
Fine-tune the released refiner:
    python train.py --config=configs/refiner.py --workdir=/ckpt/refiner_ft \\
        --config.init_from=/models/stable-diffusion-xl-refiner-1.0 --config.optim.lr=1e-5
Smoke (CPU, tiny models, seconds):
    python train.py --config=configs/refiner.py:smoke --workdir=/tmp/sdxl_smoke/refiner
"""

from configs import common

VARIANTS = (None, "smoke")


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.base()
    c.model.unet = "sdxl_refiner"
    c.model.text = "sdxl_refiner"
    c.total_steps = 100_000
    c.data.batch_size = 1024
    c.data.buckets = "sdxl"
    c.data.resolution = 1024
    c.diffusion.min_index = 0
    c.diffusion.max_index = 200  # SDXL sec. 2.5 / SPEC.md: only the first 200 noise scales
    c.optim.warmup_steps = 1_000
    c.mesh.fsdp = 8
    c.model.remat = "dots"
    if a.smoke:
        common.smoke(c, resolution=64, refiner=True)
        c.mesh.fsdp = 1
        c.model.remat = "none"
    return c
