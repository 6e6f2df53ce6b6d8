"""Compile-only memory and FLOPs of the full SDXL base train step (no weights are created).

    python bench/compile_memory.py                       # 8 fake CPU devices, 1024^2, batch 1 per device
    python bench/compile_memory.py --mesh=data=2,fsdp=4 --remat=full --dtype=bfloat16

Builds the stage-3 config (bf16 compute, fp32 params/optimizer/EMA, VAE encoder and both text encoders in
the step), lowers the train step on abstract shapes and prints XLA's per-device memory analysis and FLOPs.
On CPU the numbers describe the CPU program (no TPU/GPU-specific fusions) but params, optimizer state,
EMA and the batch are laid out exactly as on an accelerator mesh.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (ignored on accelerators)")
    p.add_argument("--mesh", default="data=1,fsdp=8,tensor=1")
    p.add_argument("--size", default="1024x1024", help="HxW of the bucket")
    p.add_argument("--per_device_batch", type=int, default=1)
    p.add_argument("--remat", default="dots")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--config", default="stage3_multiaspect")
    args = p.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

    import importlib

    import jax
    import numpy as np

    from sdxl_jax import parallel, train_state
    from sdxl_jax.train_step import CompiledSteps

    config = importlib.import_module(f"configs.{args.config}").get_config()
    for part in args.mesh.split(","):
        k, v = part.split("=")
        config.mesh[k] = int(v)
    config.model.remat = args.remat
    config.model.dtype = args.dtype
    config.compilation_cache_dir = ""
    n = jax.device_count()
    config.data.batch_size = args.per_device_batch * n
    h, w = (int(x) for x in args.size.split("x"))
    mesh = parallel.make_mesh(config.mesh)
    t0 = time.time()
    setup = train_state.make_setup(config, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_frozen))
    print(f"{config.model.unet}: {n_params:,} trained params, {n_frozen:,} frozen (VAE + text); mesh "
          f"{dict(mesh.shape)}; batch {config.data.batch_size} at {h}x{w}; remat {args.remat}; {args.dtype}")
    batch = train_state.example_batch(config, config.data.batch_size, h, w)
    steps = CompiledSteps(setup, config)
    steps.get(batch)
    stats = next(iter(steps.stats.values()))
    print(f"total {time.time() - t0:.0f} s; FLOPs per device {stats['flops']:.4g}, "
          f"x{n} devices = {stats['flops'] * n:.4g} per step")


if __name__ == "__main__":
    main()
