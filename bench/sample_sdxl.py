"""Full SDXL base sampling time with the real pipeline programs (random weights, no checkpoint).

    python bench/sample_sdxl.py --size=1024 --batch=1 --steps=30      # bf16 UNet and VAE, Euler, CFG 5

Times the programs pipeline.Pipeline runs: its guided sampling loop (pipeline._make_loop, the jitted vmap
over images of samplers.sample with the [uncond, cond] batch, SPEC.md) plus its VAE decode to uint8,
given random conditioning: the text encoders are not run, as in bench/torch_reference.py's diffusers
pipeline (they cost one pass per prompt against 2 x steps UNet passes). Params are created on device by
a jitted init in bf16, as diffusers holds them. Every program is compiled before the first call
(compile_s), and under the GPU suite the timing waits for its turn on the device (bench/progress.py).
One JSON line.

    python bench/sample_sdxl.py --compile_only --topology=gpu:h200 --aot=save   # deviceless, for the suite
    python bench/sample_sdxl.py --aot=load                # on the GPU: the programs compiled here, loaded
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
    p.add_argument("--compile_only", action="store_true", help="compile the programs, run nothing")
    p.add_argument("--topology", default="",
                   help="with --compile_only: compile for GPUs that are not here, e.g. gpu:h200 "
                        "(bench/train_step.py's --topology)")
    p.add_argument("--aot", choices=("save", "load"), default=None,
                   help="save: write the compiled programs to --aot_dir; load: take them from there "
                        "(bench/aot.py)")
    p.add_argument("--aot_dir", default=os.path.join(ROOT, "bench_out", "aot"))
    p.add_argument("--roofline", type=int, default=0, metavar="N",
                   help="GPU: also estimate the batch time from the loop's and the decode's optimized HLO "
                        "(bench/roofline.py, as train_step.py --roofline), report roofline_batch_s, and "
                        "print the loop's N costliest groups")
    p.add_argument("--trace_batches", type=int, default=0, metavar="N",
                   help="after the timing, trace N more batches (as train_step.py --trace_steps): their "
                        "measured time and, with --roofline, every kernel's against its estimate, into "
                        "--trace_dir")
    p.add_argument("--trace_dir", default=os.path.join(ROOT, "bench_out", "trace_sample"))
    args = p.parse_args()
    if args.topology and not args.compile_only:
        raise SystemExit("--topology compiles for chips that are not attached: add --compile_only")
    if args.topology:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.roofline:  # the programs' optimized HLO, dumped as XLA compiles them
        import tempfile

        args.dump_dir = tempfile.mkdtemp(prefix="xla_dump_")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump_dir}"
                                   " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*(loop|decode).*")
    import aot

    with aot.programs(args.aot, args.aot_dir):
        run(args)


def compile_programs(args, devices):
    """The bench's programs, lowered for `devices` (a topology's with --topology) and compiled: the UNet's
    and the VAE's init (bf16 params drawn on device), the pipeline's guided sampling loop
    (pipeline._make_loop, the batch split over the devices as Pipeline splits it) and its VAE decode to
    uint8. Returns ({name: compiled}, {name: its abstract inputs})."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from sdxl_jax import parallel, pipeline
    from sdxl_jax.models import init_rng
    from sdxl_jax.models import unet as unet_lib
    from sdxl_jax.models import vae as vae_lib

    bf16 = dict(dtype="bfloat16", param_dtype="bfloat16")
    ucfg = dataclasses.replace(unet_lib.PRESETS[args.preset], attention=args.attention, **bf16)
    unet = unet_lib.UNet(ucfg)
    vae = vae_lib.AutoencoderKL(dataclasses.replace(vae_lib.PRESETS[args.vae], **bf16))
    h, ctx, adm, b = args.size // 8, ucfg.context_dim, ucfg.adm_in_channels, args.batch
    config = pipeline._sampling_config()
    mesh = parallel.make_mesh(config.mesh, devices)
    rep = parallel.replicated(mesh)

    def like(shape, dtype, sharding=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or parallel.batch_sharding(config, mesh,
                                                                                                len(shape)))

    def placed(out_info):  # a program's outputs as the next program's inputs
        return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding), out_info)

    key = like((2,), jnp.uint32, rep)  # jax.random.PRNGKey's
    inputs = {"init_unet": (key,), "init_vae": (key,)}
    compiled = {}

    def init_unet(r):
        x, t, c, y = (jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, ctx)),
                      jnp.zeros((1, adm)))
        return nn.meta.unbox(unet.init(init_rng.key(r), x, t, c, y)["params"])

    def init_vae(r):
        return nn.meta.unbox(vae.init(init_rng.key(r), jnp.zeros((1, 64, 64, 3)))["params"])

    with jax.set_mesh(mesh):
        compiled["init_unet"] = jax.jit(init_unet, out_shardings=rep).lower(key).compile()
        compiled["init_vae"] = jax.jit(init_vae, out_shardings=rep).lower(key).compile()
        progress("init programs compiled; compiling the sampling loop")
        cond = {"crossattn": like((b, 77, ctx), jnp.float32), "vector": like((b, adm), jnp.float32)}
        inputs["loop"] = (placed(compiled["init_unet"].out_info), like((b, h, h, 4), jnp.float32),
                          like((args.steps + 1,), jnp.float32, rep), cond, cond, like((), jnp.float32, rep),
                          like((b, 2), jnp.uint32))  # fmt: skip
        loop = pipeline._make_loop(unet, parallel.batch_axes(config))
        compiled["loop"] = loop.lower(*inputs["loop"], sampler=args.sampler, from_noise=True).compile()
        progress("sampling loop compiled; compiling the decode")
        decode = pipeline._vae_program(pipeline._decode_to_uint8, vae, float(vae.config.scaling_factor), 1)
        inputs["decode"] = (placed(compiled["init_vae"].out_info), placed(compiled["loop"].out_info))
        compiled["decode"] = decode.lower(*inputs["decode"]).compile()
    return compiled, inputs


def estimate(args, device, compiled) -> dict:
    """bench/roofline.py's estimate of one batch: the sampling loop's kernels (every step's) plus the
    decode's, at the GPU's peak FLOP/s and memory bandwidth; {"roofline_error": why} where it has none."""
    import shutil

    import aot
    from roofline import format_roofline, roofline
    from train_step import chip_roofline

    try:
        chip = chip_roofline(device)
        for name, program in (("loop", "jit_loop"), ("decode", "jit__decode_to_uint8")):
            if aot.summary().get(program) == "loaded":  # a loaded program has no compile to dump
                aot.write_optimized_hlo(compiled[name], args.dump_dir, program)
        keep = bool(args.trace_batches)  # the trace's ops are set against them
        loop = roofline(args.dump_dir, *chip, module="jit_loop", platform="gpu", keep_kernels=keep)
        decode = roofline(args.dump_dir, *chip, module="jit__decode_to_uint8", platform="gpu",
                          keep_kernels=keep)
    except (ValueError, FileNotFoundError) as e:  # a CPU, or no dump: the measurement stands alone
        if args.compile_only and args.topology:
            raise
        return {"roofline_error": str(e)}
    finally:
        shutil.rmtree(args.dump_dir, ignore_errors=True)
    print(format_roofline(loop, args.roofline), flush=True)
    args.kernel_list = loop.get("kernel_list")  # the loop's (decode's names may repeat them)
    return {"roofline_batch_s": round(loop["step_s"] + decode["step_s"], 5),
            "roofline_loop_s": round(loop["step_s"], 5), "roofline_decode_s": round(decode["step_s"], 5),
            "roofline_kernels": loop["kernels"] + decode["kernels"]}


def run(args):
    import jax
    import numpy as np

    from sdxl_jax.diffusion import schedule

    b = args.batch
    if args.topology:
        from train_step import topology_devices

        devices = topology_devices(args.topology)
    else:
        devices = jax.local_devices()
    # The batch splits over the devices (pipeline._shard): as many of this host's as divide it evenly.
    devices = devices[: math.gcd(b, len(devices))]
    progress("compiling: the UNet's and the VAE's init, the sampling loop, the decode")
    t0 = time.time()
    compiled, inputs = compile_programs(args, devices)
    compile_s = time.time() - t0
    progress(f"compiled in {compile_s:.1f} s")
    out = {"bench": "sample_sdxl", "device": devices[0].device_kind, "size": args.size, "batch": b,
           "devices": len(devices), "steps": args.steps, "sampler": args.sampler, "attention": args.attention,
           "compile_s": round(compile_s, 1)}  # fmt: skip
    if args.aot:
        import aot

        out["aot"] = aot.summary()
    if args.roofline:
        out.update(estimate(args, devices[0], compiled))
    if args.compile_only:
        print(json.dumps(out, sort_keys=True), flush=True)
        return

    def put(value, like):
        return jax.device_put(value, like.sharding)

    t0 = time.time()
    key_in = inputs["init_unet"][0]
    unet_params = compiled["init_unet"](put(jax.random.PRNGKey(0), key_in))
    vae_params = compiled["init_vae"](put(jax.random.PRNGKey(1), key_in))
    jax.block_until_ready((unet_params, vae_params))
    init_s = time.time() - t0
    _, x_in, sigmas_in, cond_in, _, guidance_in, keys_in = inputs["loop"]
    rng = np.random.default_rng(0)
    cond = {k: put(rng.standard_normal(v.shape).astype(np.float32), v) for k, v in cond_in.items()}
    uncond = {k: put(np.zeros(v.shape, np.float32), v) for k, v in cond_in.items()}
    noise = put(rng.standard_normal(x_in.shape).astype(np.float32), x_in)
    keys = put(jax.random.split(jax.random.PRNGKey(2), b), keys_in)
    sigmas = put(np.asarray(schedule.legacy_ddpm_sigmas(args.steps), np.float32), sigmas_in)
    guidance = put(np.float32(5.0), guidance_in)

    def once():
        z = compiled["loop"](unet_params, noise, sigmas, cond, uncond, guidance, keys)
        return np.asarray(compiled["decode"](vae_params, z))

    progress(f"params on device in {init_s:.1f} s; the first call")
    t0 = time.time()
    once()
    first_s = time.time() - t0
    progress(f"first call in {first_s:.1f} s")
    turn_wait_s = wait_turn()
    timed_from = time.time()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        images = once()
    dt = (time.perf_counter() - t0) / args.repeats
    progress(f"timed: {dt:.3f} s a batch")
    out.update({"batch_s": round(dt, 4), "images_per_s": round(b / dt, 4), "init_s": round(init_s, 1),
                "first_call_s": round(first_s, 1), "images_shape": list(images.shape),
                "turn_wait_s": round(turn_wait_s, 1),
                "timed_window": [round(timed_from, 1), round(time.time(), 1)]})  # fmt: skip
    from sdxl_jax.models import layers

    out["attention_fallbacks"] = layers.attention_fallbacks(jax.default_backend())  # [] when it ran
    try:
        out["peak_gib"] = round(jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**30, 3)
    except Exception:  # backends without memory stats
        pass
    print(json.dumps(out, sort_keys=True), flush=True)
    if args.trace_batches:  # after the measurement's line: a failed trace keeps it
        print(json.dumps(trace_batches(once, args), sort_keys=True), flush=True)


def trace_batches(once, args) -> dict:
    """Traces args.trace_batches more batches (the loop's and the decode's ops) into args.trace_dir, as
    train_step.py's trace_steps; errors go into the line."""
    import shutil

    from roofline import trace_fields

    from sdxl_jax import profiling

    out = {"bench": "sample_sdxl_trace", "trace_batches": args.trace_batches}
    shutil.rmtree(args.trace_dir, ignore_errors=True)  # no earlier run's kernels.tsv beside this trace
    try:
        kept = profiling.capture(lambda: [once() for _ in range(args.trace_batches)],
                                 os.path.join(args.trace_dir, "sample.xplane.pb"))
        progress(f"traced {args.trace_batches} batches into {kept}")
        out.update(trace_fields(kept, args.trace_batches, unit="batch"))  # the loop and the decode
        kernel_list = getattr(args, "kernel_list", None)
        if kernel_list:  # the loop's kernels against the estimate
            out.update(trace_fields(kept, args.trace_batches, "jit_loop", kernel_list,
                                    os.path.join(args.trace_dir, "kernels.tsv"), "trace_loop_", "batch"))
    except Exception as e:  # a diagnostic: the measured batch time stands without it
        out["trace_error"] = f"{type(e).__name__}: {e}"
    return out


if __name__ == "__main__":
    main()
