"""Full SDXL base sampling time with the real pipeline programs (random weights, no checkpoint).

    python bench/sample_sdxl.py --size=1024 --batch=1 --steps=30      # bf16 UNet and VAE, Euler, CFG 5

Times pipeline.Pipeline's guided sampling loop (the jitted vmap over images of samplers.sample with the
[uncond, cond] batch, SPEC.md) plus its VAE decode to uint8, given random conditioning: the text encoders
are not run, as in bench/torch_reference.py's diffusers pipeline (they cost one pass per prompt against
2 x steps UNet passes). Params are created on device by a jitted init in bf16, as diffusers holds them.
One JSON line.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from progress import progress, wait_turn  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--attention", default="chunked", help="sdxl_jax.models.layers.ATTENTION_KERNELS")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--preset", default="sdxl_base", help="UNet preset (tiny + --vae=tiny: a CPU smoke run)")
    p.add_argument("--vae", default="sdxl")
    args = p.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sdxl_jax import conditioning, pipeline
    from sdxl_jax.models import init_rng
    from sdxl_jax.models import unet as unet_lib
    from sdxl_jax.models import vae as vae_lib

    bf16 = dict(dtype="bfloat16", param_dtype="bfloat16")
    ucfg = dataclasses.replace(unet_lib.PRESETS[args.preset], attention=args.attention, **bf16)
    unet = unet_lib.UNet(ucfg)
    vae = vae_lib.AutoencoderKL(dataclasses.replace(vae_lib.PRESETS[args.vae], **bf16))
    h, ctx, adm = args.size // 8, ucfg.context_dim, ucfg.adm_in_channels
    progress("initialising the params (a jitted init each for the UNet and the VAE)")
    t0 = time.time()
    up = jax.jit(lambda r: nn.meta.unbox(unet.init(init_rng.key(r), jnp.zeros((1, 8, 8, 4)),
                                                   jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, ctx)),
                                                   jnp.zeros((1, adm)))["params"]))
    vp = jax.jit(lambda r: nn.meta.unbox(vae.init(init_rng.key(r), jnp.zeros((1, 64, 64, 3)))["params"]))
    stage = pipeline.Stage(unet, up(jax.random.PRNGKey(0)), conditioning.Conditioner(
        conditioning.PRESETS["sdxl_base"]), {})
    b = args.batch
    # The batch splits over the devices (pipeline._shard): as many of this host's as divide it evenly.
    devices = jax.local_devices()[: math.gcd(b, jax.local_device_count())]
    pipe = pipeline.Pipeline(stage, vae, vp(jax.random.PRNGKey(1)), tokenizers=None, devices=devices)
    init_s = time.time() - t0
    progress(f"params on device in {init_s:.1f} s; compiling and running the first call")
    rng = np.random.default_rng(0)
    cond = {"crossattn": rng.standard_normal((b, 77, ctx)).astype(np.float32),
            "vector": rng.standard_normal((b, adm)).astype(np.float32)}  # fmt: skip
    uncond = jax.tree.map(np.zeros_like, cond)
    noise = pipe._shard(rng.standard_normal((b, h, h, 4)).astype(np.float32))
    keys = pipe._shard(jax.random.split(jax.random.PRNGKey(2), b))
    from sdxl_jax.diffusion import schedule

    sigmas = schedule.legacy_ddpm_sigmas(args.steps)

    def once():
        z = pipe._run("base", noise, sigmas, cond, uncond, 5.0, args.sampler, keys, from_noise=True)
        return np.asarray(pipe._decode(pipe._vae_params, z))

    t0 = time.time()
    once()
    compile_s = time.time() - t0
    progress(f"first call (compile + run) in {compile_s:.1f} s")
    turn_wait_s = wait_turn()
    timed_from = time.time()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        images = once()
    dt = (time.perf_counter() - t0) / args.repeats
    progress(f"timed: {dt:.3f} s a batch")
    out = {"bench": "sample_sdxl", "device": jax.devices()[0].device_kind, "size": args.size, "batch": b,
           "devices": len(devices), "steps": args.steps, "sampler": args.sampler, "attention": args.attention,
           "batch_s": round(dt, 4),
           "images_per_s": round(b / dt, 4), "init_s": round(init_s, 1), "first_call_s": round(compile_s, 1),
           "images_shape": list(images.shape), "turn_wait_s": round(turn_wait_s, 1),
           "timed_window": [round(timed_from, 1), round(time.time(), 1)]}  # fmt: skip
    from sdxl_jax.models import layers

    out["attention_fallbacks"] = layers.attention_fallbacks(jax.default_backend())  # [] when it ran
    try:
        out["peak_gib"] = round(jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**30, 3)
    except Exception:  # backends without memory stats
        pass
    print(json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
