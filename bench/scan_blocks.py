"""Compile time and memory of the SDXL base UNet's gradient with each SpatialTransformer's blocks unrolled
or scanned (UNetConfig.scan_blocks, models/unet.py):

    .venv/bin/python bench/scan_blocks.py --mode=unrolled --remat=dots
    .venv/bin/python bench/scan_blocks.py --mode=scanned --remat=dots

The gradient of a sum of squares of the UNet's output with respect to every param, bf16 compute, batch 1,
compiled ahead of time on abstract shapes for this host's backend (no arrays). `unrolled`: 70 blocks in the
base, each its own HLO. `scanned`: each SpatialTransformer runs one block in an nn.scan over params stacked
on a leading axis. Prints one JSON line: lowering and compile seconds, XLA's FLOPs (a scan body counts
once, so not comparable between the modes) and the compiled temp memory. bench/RESULTS.md 2026-11-27
(session 13: a prototype of the scan, same figures as the model's) and 2026-11-28 (sessions 14 and 15).

The temp memory depends on what consumes the gradients: `--output=grad` returns them, so gradients that
leave the scan in bf16 (layers._cast_outside) sit in temp until they are converted into the fp32 outputs;
`--output=update` applies them to the donated params. XLA:CPU converts the bf16 gradients late in both,
so on this host the scan's bf16 gradients read as more memory (session 15); what counts is the full train
step compiled for the accelerator: bench/train_step.py --set model.scan_blocks=True.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sdxl_jax.models import layers  # noqa: E402
from sdxl_jax.models import unet as unet_lib  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("unrolled", "scanned"), default="unrolled")
    p.add_argument("--side", type=int, default=32, help="latent side (32 = 256^2 images)")
    p.add_argument("--remat", default="dots", choices=sorted(unet_lib.REMAT_POLICIES))
    p.add_argument("--attention", default="xla", choices=layers.ATTENTION_KERNELS)
    p.add_argument("--output", choices=("grad", "update"), default="grad",
                   help="grad: the gradient is the program's output; update: the program returns "
                        "params - 1e-4 * grad into the donated params, as a train step consumes it")
    a = p.parse_args()
    cfg = unet_lib.UNetConfig(dtype="bfloat16", attention=a.attention, remat=a.remat,
                              scan_blocks=a.mode == "scanned")
    model = unet_lib.UNet(cfg)
    params = nn.meta.unbox(unet_lib.abstract_params(cfg))
    args = (jax.ShapeDtypeStruct((1, a.side, a.side, cfg.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
            jax.ShapeDtypeStruct((1, 77, cfg.context_dim), jnp.float32),
            jax.ShapeDtypeStruct((1, cfg.adm_in_channels), jnp.float32))

    def loss(params, *args):
        return jnp.sum(jnp.square(model.apply({"params": params}, *args)))

    def update(params, *args):
        return jax.tree.map(lambda p, g: p - 1e-4 * g, params, jax.grad(loss)(params, *args))

    program = jax.jit(update, donate_argnums=0) if a.output == "update" else jax.jit(jax.grad(loss))
    t0 = time.time()
    lowered = program.lower(params, *args)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(json.dumps({
        "mode": a.mode, "output": a.output, "side": a.side, "remat": a.remat, "attention": a.attention,
        "backend": jax.default_backend(), "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
        "hlo_lines": len(lowered.as_text().splitlines()), "xla_tflops": round(cost.get("flops", 0) / 1e12, 3),
        "temp_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 2),
        "params": sum(x.size for x in jax.tree.leaves(params)),
    }))


if __name__ == "__main__":
    main()
