"""Shared defaults for every sdxl_jax config.

Each config file in configs/ defines `get_config(arg=None)` and starts from `base()` here. Every key a
run reads is defined here or in the stage file; overriding an unknown key (`--config.optim.lrr=1`) is an
error. Stage files change values, never invent new top-level sections.
"""

import ml_collections as mlc

# The paper's stage-3 multi-aspect buckets (SDXL App. I), (height, width), ~1024^2 area.
from sdxl_jax.data.buckets import SDXL_BUCKETS  # noqa: E402,F401  (re-exported for configs)


def parse_arg(arg, **defaults):
    """`arg` is "smoke" or "key=value,key2=value2" (big_vision style); returns a ConfigDict of flags."""
    out = mlc.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(out.keys())}")
        out[key] = type(defaults[key])(value) if value else True
    return out


def model():
    return mlc.ConfigDict(
        dict(
            unet="sdxl_base",  # sdxl_jax.models.unet.PRESETS key
            vae="sdxl",  # sdxl_jax.models.vae.PRESETS key
            text="sdxl_base",  # sdxl_jax.conditioning presets: sdxl_base (CLIP-L + bigG) | sdxl_refiner
            dtype="bfloat16",  # compute dtype; params are stored in param_dtype
            param_dtype="float32",
            vae_dtype="float32",  # SPEC.md: the reference runs the VAE in fp32
            # auto: the platform's flash kernel, cuDNN on GPUs and splash on TPUs, chunked elsewhere (CPU);
            # | chunked | xla | cudnn | splash (layers.dot_product_attention). Estimated, the base at
            # 1024^2: an H200's step 124 ms with cuDNN, 249 with chunked; a v5e's 331 / 499 (RESULTS.md).
            attention="auto",
            remat="none",  # rematerialisation policy per block: none | full | dots | dots_no_batch
            # Scan each SpatialTransformer's blocks over params stacked on a leading axis (models/unet.py):
            # a third of the program, several times faster compiles; use with remat. Costs memory where the
            # weights are not sharded, and time on GPUs (an H200 at 4 rows, remat dots: 151 against 133 ms
            # estimated; bench/RESULTS.md). Checkpoints of either layout restore into either.
            scan_blocks=False,
            latent_scale=0.13025,
        )
    )


def data():
    return mlc.ConfigDict(
        dict(
            source="shapes",  # shapes | folder | webdataset | array_record | tfds
            path="",
            tfds_image_key="image",
            tfds_caption_key="caption",
            split="train",
            batch_size=2048,  # global batch; must divide evenly over the mesh's batch axes
            buckets="square",  # square | sdxl (SDXL_BUCKETS) | generated
            resolution=256,  # square side, or the base resolution of generated buckets
            bucket_side_step=64,
            bucket_min_side=256,
            bucket_max_side=2048,
            random_crop=True,
            random_flip=False,
            # Resize to cover cover_scale x the bucket, then crop the bucket: 2.0 crops a quarter of the image
            # at twice the pixel scale (LDM autoencoders train on such crops); 1.0 for diffusion stages.
            cover_scale=1.0,
            min_image_side=0,  # smaller images are skipped and counted
            max_aspect_ratio=4.0,  # more extreme images are skipped and counted
            max_image_pixels=178_956_970,  # decompression-bomb guard (PIL's default)
            num_workers=4,  # grain decoding processes; 0 = in-process
            prefetch=2,
            shuffle=True,
            aesthetic_score=6.0,  # refiner conditioning when the source gives none (SPEC.md: 6.0 conditional)
            tfds_data_dir="",  # data.source=tfds: TFDS data dir (data.path is the dataset name)
            shapes_num_examples=10_000,  # data.source=shapes: size of the procedural dataset
            shapes_min_side=64,  # shapes' original long side: log-uniform in [min, max] (small ones upscale)
            shapes_max_side=512,
            shapes_holdout="",  # "red circle blue,yellow square green": (colour shape background) kept out
        )
    )


def base():
    """Top-level defaults shared by all stages."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.total_steps = 100_000
    c.log_every = 50
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.sample_every = 5_000
    # A device trace of `steps` train steps, taken once per run after its first `skip` steps (compiles and
    # warm-up), into <workdir>/profile (TensorBoard's profile plugin or xprof): 0 steps, none.
    c.profile = mlc.ConfigDict(dict(steps=0, skip=10))
    c.init_from = ""  # previous stage's workdir, or official weights (diffusers folder / single file)
    c.vae_from = ""  # an autoencoder workdir or VAE weights; empty: from init_from / random (tiny)
    c.text_from = ""  # text encoder weights; empty: from init_from / random (tiny)
    # What the run trains: "diffusion" (the UNet) or "autoencoder" (the VAE, sdxl_jax/autoencoder/trainer.py).
    c.task = "diffusion"
    # XLA's persistent compilation cache: a restarted or re-launched run skips recompiling its steps.
    c.compilation_cache_dir = "~/.cache/sdxl_jax/xla"
    # Memory layouts of the train state on the devices: "compiler" (XLA picks each leaf's layout for the
    # step; on GPUs the convolution kernels' state then stays in cuDNN's filter order) | "default"
    # (row-major) | "auto": "compiler" on GPUs, "default" elsewhere (TPUs: not measured yet). Checkpoints
    # are the same either way.
    c.state_layout = "auto"
    # The train state also holds the UNet's params in their compute dtype (bf16), updated with them and
    # never saved: "on" | "off" | "auto": "on" on GPUs with model.remat "none", where the step's forward
    # then casts no weight (the SDXL base at 1024^2, 4 rows, on an H200: -764 kernels, -1.8 ms of its
    # roofline, +0.56 GiB at its peak), "off" elsewhere (2 bytes a param more state: remat trades speed
    # for memory; XLA:TPU already casts each fsdp shard before gathering it, so on a v5e the copy saves
    # only those casts, for 0.60 GiB of the 16: bench/RESULTS.md, session 25). The same arithmetic.
    c.compute_copy = "auto"

    c.model = model()
    c.data = data()

    c.optim = mlc.ConfigDict(
        dict(
            name="adamw",
            lr=1e-4,  # sgm base_learning_rate for the SDXL configs
            warmup_steps=10_000,
            schedule="constant",  # constant | cosine | linear (decay after warm-up)
            end_lr_fraction=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-2,
            grad_clip=1.0,
            max_nonfinite_in_a_row=20,
            # Gradient accumulation: the global batch runs as this many microbatches (rows i::k), their
            # gradients averaged before one update: the same update, 1/k of the activation memory.
            microbatches=1,
            # dtype of the first moment (AdamW's mu, SGD's momentum): "bfloat16" halves that state (the
            # full base: 0.60 GiB per chip at fsdp 8) with the update still computed in fp32. The second
            # moment stays fp32: with b2 = 0.999 a step moves it by ~0.1%, under bf16's resolution (~0.4%),
            # where b1 = 0.9 moves the first by ~10%.
            mu_dtype="float32",
        )
    )
    # every=k: update the EMA after every k-th step only, with decay ** k (optim.ema_step): the same
    # average within k steps of lag, for 1/k of its state traffic (8 bytes per parameter per step).
    c.ema = mlc.ConfigDict(dict(decay=0.9999, warmup_steps=0, every=1))

    # SPEC.md: the discrete 1000-step eps objective.
    c.diffusion = mlc.ConfigDict(
        dict(
            parameterization="eps",  # eps | v | edm
            weighting="eps",  # eps | edm | v | unit
            loss_type="l2",  # l2 | l1
            sigma_sampling="discrete",  # discrete | edm
            min_index=0,
            max_index=1000,  # the refiner uses [0, 200)
            offset_noise=0.0,
            ucg_rate=0.1,  # conditioning dropout per embedder and sample
        )
    )

    # Mesh axis sizes; -1 means "all remaining devices".
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Logical axis name -> mesh axes. The only place besides sdxl_jax/parallel.py that names mesh axes.
    c.sharding_rules = (
        ("activation_batch", ("data", "fsdp")),
        ("activation_height", None),
        ("activation_width", None),
        ("activation_length", None),
        ("activation_embed", "tensor"),
        ("activation_heads", "tensor"),
        ("activation_mlp", "tensor"),
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("conv_in", None),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", None),
        ("length", None),
        ("norm", None),
        ("layers", None),  # the stacked axis of scanned transformer blocks
    )

    # config.task="autoencoder": the LDM / SDXL autoencoder objective (sdxl_jax/autoencoder/losses.py),
    # weights as the sgm kl-f8 autoencoder configs. perceptual_weight > 0 needs lpips_path (safetensors).
    c.autoencoder = mlc.ConfigDict(
        dict(
            l1_weight=1.0,
            l2_weight=0.0,
            kl_weight=1e-6,
            perceptual_weight=0.0,
            lpips_path="",
            discriminator="",  # "" (none) | a sdxl_jax.autoencoder.discriminator PRESETS key
            disc_weight=0.5,
            disc_factor=1.0,
            disc_start=50_001,  # the discriminator and its loss start at this step
            preview_images=8,  # images reconstructed every sample_every steps (held out for shapes data)
        )
    )

    c.sample = mlc.ConfigDict(
        dict(
            prompts=(
                "a red circle on a blue background",
                "a yellow square on a green background",
            ),
            height=1024,
            width=1024,
            steps=30,
            guidance=5.0,
            sampler="euler",
            seed=0,
        )
    )
    return c


def smoke(c, *, resolution=64, refiner=False):
    """The `:smoke` variant of a stage: tiny models, the built-in shapes data, CPU, a few steps, seconds.

    Same code paths as the real stage (VAE encode + conditioner inside the step, checkpoints, resume).
    """
    c.model.unet = "tiny"  # context and vector widths follow the tiny conditioner
    c.model.vae = "tiny"
    c.model.text = "tiny_refiner" if refiner else "tiny_base"
    c.model.dtype = "float32"
    c.data.source = "shapes"
    c.data.path = ""
    c.data.resolution = resolution
    c.data.buckets = "square"  # a stage with several buckets sets its own small ones after this
    c.data.num_workers = 0
    c.data.prefetch = 0
    c.optim.warmup_steps = 2
    c.optim.lr = 1e-3
    c.ema.decay = 0.9
    c.sample.height = resolution
    c.sample.width = resolution
    return smoke_steps(c)


def smoke_steps(c):
    """The `:smoke` run length alone: batch 8, 4 steps, a log line each, checkpoints at 2 and 4, one preview.

    For a stage already on tiny models and CPU-sized data (configs/shapes.py) that keeps its own optimizer.
    """
    c.data.batch_size = 8
    c.total_steps = 4
    c.log_every = 1
    c.checkpoint_every = 2
    c.keep_checkpoints = 2
    c.sample_every = 4
    c.sample.steps = 2
    return c
