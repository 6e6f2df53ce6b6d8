"""Sampling throughput: the tiny pipeline, ours vs diffusers' PyTorch pipeline on this CPU in one run,
and the FLOPs per image of the full SDXL base (no weights are created: cost analysis on abstract shapes).

    python bench/sample.py                         # tiny: 4 images 128^2, 20 Euler steps, guidance 5
    python bench/sample.py --skip_tiny --compiled  # SDXL FLOPs from the compiled (not just lowered) programs

Both tiny pipelines load the same diffusers folder (random weights) and run in fp32 on one CPU device with
the same batch, size, steps and guidance; compile time is reported separately from the timed runs. The
SDXL figure counts one guided denoiser evaluation (the UNet on the doubled [uncond, cond] batch) times the
number of evaluations of the sampler, plus one VAE decode; XLA's cost analysis counts a loop body once,
so the whole-loop program is not used for the total.
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

EVALS_PER_STEP = {
    "euler": 1,
    "euler_ancestral": 1,
    "dpmpp_2m": 1,
    "lms": 1,
    "heun": 2,
    "dpmpp_2s_ancestral": 2,
}


def _timed(fn, repeats):
    fn()  # warm-up (compiles ours)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def bench_tiny(args):
    import jax
    import numpy as np
    import torch

    from bench import torch_reference  # the tiny diffusers SDXL builder shared with the parity test
    from sdxl_jax import pipeline

    prompts = [f"a red circle number {i}" for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        torch_pipe = torch_reference.build_diffusers_sdxl(folder)
        torch_pipe.set_progress_bar_config(disable=True)
        pipe = pipeline.load(folder, devices=jax.local_devices()[:1])
    noise = np.random.default_rng(0).standard_normal((args.batch, args.size // 8, args.size // 8, 4))
    noise = noise.astype(np.float32)
    kw = dict(
        height=args.size, width=args.size, steps=args.steps, guidance=5.0, sampler="euler", latents=noise
    )

    t0 = time.perf_counter()
    pipe.generate(prompts, **kw)
    compile_s = time.perf_counter() - t0
    ours = _timed(lambda: pipe.generate(prompts, **kw), args.repeats)

    def run_torch():
        with torch.no_grad():
            torch_pipe(
                prompt=prompts,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                guidance_scale=5.0,
                latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                output_type="np",
            )

    theirs = _timed(run_torch, args.repeats)
    print(
        f"tiny SDXL, {args.batch} images {args.size}^2, {args.steps} Euler steps, guidance 5, fp32, CPU "
        f"({jax.devices()[0].device_kind}, torch {torch.get_num_threads()} threads):"
    )
    print(
        f"  sdxl_jax:  {args.batch / ours:8.2f} images/s  ({ours:.3f} s per batch; first call incl. "
        f"compile {compile_s:.1f} s)"
    )
    print(f"  diffusers: {args.batch / theirs:8.2f} images/s  ({theirs:.3f} s per batch)")
    print(f"  ratio ours / diffusers: {theirs / ours:.2f}x")


def bench_sdxl_flops(args):
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from sdxl_jax import pipeline
    from sdxl_jax.diffusion import denoiser, samplers
    from sdxl_jax.models import unet as unet_lib
    from sdxl_jax.models import vae as vae_lib

    ucfg = dataclasses.replace(unet_lib.PRESETS["sdxl_base"], dtype=args.dtype)
    unet = unet_lib.UNet(ucfg)
    params = nn.meta.unbox(unet_lib.abstract_params(ucfg))
    h, w = args.sdxl_size // 8, args.sdxl_size // 8
    sds = jax.ShapeDtypeStruct
    x = sds((1, h, w, 4), jnp.float32)
    sigma = sds((1,), jnp.float32)
    cond = {
        "crossattn": sds((2, 77, ucfg.context_dim), jnp.float32),
        "vector": sds((2, ucfg.adm_in_channels), jnp.float32),
    }

    def guided_eval(params, x, sigma, cond):
        d = denoiser.make_denoiser(lambda x, t, c, y: unet.apply({"params": params}, x, t, c, y), "eps")
        return samplers.cfg_denoiser(lambda x2, s2: d(x2, s2, cond["crossattn"], cond["vector"]), 5.0)(
            x, sigma
        )

    def flops(fn, *shapes):
        lowered = jax.jit(fn).lower(*shapes)
        cost = lowered.compile().cost_analysis() if args.compiled else lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost["flops"])

    t0 = time.perf_counter()
    step = flops(guided_eval, params, x, sigma, cond)
    vcfg = dataclasses.replace(vae_lib.PRESETS["sdxl"], dtype="float32")
    vae = vae_lib.AutoencoderKL(vcfg)
    vparams = nn.meta.unbox(
        jax.eval_shape(vae.init, jax.random.key(0), sds((1, 64, 64, 3), jnp.float32))["params"]
    )
    decode = flops(lambda p, z: vae_lib.decode_batched(vae, p, z, 1), vparams, x)
    evals = EVALS_PER_STEP[args.sampler] * args.sdxl_steps
    if args.sampler == "heun":
        evals -= 1  # no second-order correction at sigma_next = 0
    total = evals * step + decode
    kind = "compiled" if args.compiled else "lowered"
    print(
        f"SDXL base {args.sdxl_size}^2, {args.sdxl_steps} {args.sampler} steps with guidance ({kind} cost "
        f"analysis, UNet {args.dtype}, VAE fp32, {time.perf_counter() - t0:.0f} s):"
    )
    print(f"  one guided denoiser evaluation (UNet at batch 2): {step / 1e12:8.2f} TFLOP")
    print(f"  VAE decode:                                      {decode / 1e12:8.2f} TFLOP")
    print(f"  per image ({evals} evaluations + decode):          {total / 1e12:8.2f} TFLOP")
    del pipeline  # imported for the side effect of checking the package imports cleanly


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_tiny", action="store_true")
    p.add_argument("--skip_sdxl", action="store_true")
    p.add_argument("--sdxl_size", type=int, default=1024)
    p.add_argument("--sdxl_steps", type=int, default=30)
    p.add_argument("--sampler", default="euler", choices=sorted(EVALS_PER_STEP))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--compiled", action="store_true", help="cost analysis of the compiled programs (slow)")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.skip_tiny:
        bench_tiny(args)
    if not args.skip_sdxl:
        bench_sdxl_flops(args)


if __name__ == "__main__":
    main()
