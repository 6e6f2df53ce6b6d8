"""The SDXL autoencoder (SDXL sec. 2.4): the LDM AutoencoderKL retrained with batch 256 and an EMA of the
weights; the LDM objective (L1 + LPIPS, KL 1e-6, PatchGAN hinge loss with adaptive weight from step 50001;
sgm kl-f8 configs). Its EMA VAE is what the diffusion stages load with --config.vae_from=WORKDIR.

Pod (LPIPS weights are never downloaded: convert the lpips package's VGG weights to safetensors first):
    python train.py --config=configs/autoencoder.py --workdir=gs://BUCKET/sdxl/autoencoder \\
        --config.data.source=webdataset --config.data.path='gs://BUCKET/data/{00000..09999}.tar' \\
        --config.autoencoder.perceptual_weight=1.0 --config.autoencoder.lpips_path=/path/lpips_vgg.safetensors
Shapes (the first step of the embedded default; tiny VAE, ~4 min on a 2-core CPU):
    python train.py --config=configs/autoencoder.py:shapes --workdir=/tmp/sdxl_shapes/autoencoder
Smoke (seconds):
    python train.py --config=configs/autoencoder.py:smoke --workdir=/tmp/sdxl_smoke/autoencoder
Export the EMA VAE: python -m sdxl_jax.autoencoder.export WORKDIR OUT [--format diffusers|sgm]
"""

from configs import common, shapes

VARIANTS = (None, "smoke", "shapes")


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False, shapes=False)
    c = common.base()
    c.task = "autoencoder"
    c.total_steps = 500_000  # not published for SDXL; the LDM f8 autoencoders trained for a few 100k
    c.data.batch_size = 256  # SDXL sec. 2.4 (the original LDM autoencoder: 9)
    c.data.buckets = "square"
    c.data.resolution = 256  # LDM autoencoders train on 256^2 crops; the model is fully convolutional
    c.data.min_image_side = 256  # no upscaled images: the autoencoder must learn real high-frequency detail
    c.model.vae = "sdxl"
    c.optim.name = "adam"  # taming: Adam, betas (0.5, 0.9), no weight decay
    c.optim.b1, c.optim.b2 = 0.5, 0.9
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1_000
    c.ema.decay = 0.9999
    c.autoencoder.discriminator = "default"
    c.autoencoder.disc_start = 50_001
    c.sample_every = 5_000
    if a.smoke or a.shapes:
        common.smoke(c, resolution=64)
        c.task = "autoencoder"
        c.data.min_image_side = 0
        c.autoencoder.discriminator = "tiny"
        c.autoencoder.disc_start = 2  # exercised within the 4 smoke steps
        c.autoencoder.preview_images = 4
    if a.shapes:
        # The embedded default's data (configs/shapes.py, held-out combinations included) at the pixel scale
        # the diffusion stages see it (images resized to cover 64 px), in random 32x32 crops: the VAE is
        # fully convolutional and a 32 px step costs a quarter of a 64 px one on a laptop CPU. The previews
        # check it where the diffusion stages use it: whole 64x64 held-out images.
        c.data.shapes_holdout = shapes.HOLDOUT
        c.data.shapes_min_side, c.data.shapes_max_side = 32, 128
        c.data.resolution = 32
        c.data.cover_scale = shapes.RESOLUTION / 32
        c.sample.height = c.sample.width = shapes.RESOLUTION
        c.data.batch_size = 16
        c.total_steps = 600
        c.log_every = 50
        c.checkpoint_every = c.sample_every = 600
        # A short run: plain Adam with a cosine decay learns flat colours faster than taming's GAN-tuned
        # betas (0.5, 0.9) with clipping (measured, issue 9 note); the L1 sum's gradient norm is ~1e3.
        c.optim.lr = 2e-3
        c.optim.b1, c.optim.b2 = 0.9, 0.99
        c.optim.schedule = "cosine"
        c.optim.grad_clip = 0.0
        c.optim.warmup_steps = 30
        c.ema.decay = 0.98
        c.autoencoder.discriminator = ""  # flat colours and sharp edges: L1 alone reconstructs them
        c.autoencoder.preview_images = 16
    return c
