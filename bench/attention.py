"""Attention kernels side by side at the SDXL base's shapes: forward + backward time and compiled temp memory.

    .venv/bin/python bench/attention.py                       # xla vs chunked, bf16, batch 1, on this backend
    .venv/bin/python bench/attention.py --kernels=xla,chunked,cudnn --batch=2 --dtype=float32

Shapes (1024^2 image, 128^2 latent): self-attention at the 64x64 level (4096 tokens, 10 heads of 64), at
the 32x32 level (1024 tokens, 20 heads) and cross-attention to the 77 text tokens. Each kernel is timed on
the gradient of sum(attention * w) with respect to q, k, v (one jitted program), after one warm-up call;
memory is XLA's compiled temp size of that program. One JSON line per (shape, kernel).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # name: (query tokens, key tokens, heads, head dim)
    "self_64x64": (4096, 4096, 10, 64),
    "self_32x32": (1024, 1024, 20, 64),
    "cross_64x64": (4096, 77, 10, 64),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="xla,chunked")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from sdxl_jax.models import layers

    dtype = jnp.dtype(args.dtype)
    for shape in args.shapes.split(","):
        lq, lk, h, d = SHAPES[shape]
        keys = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(keys[0], (args.batch, lq, h, d), dtype)
        k = jax.random.normal(keys[1], (args.batch, lk, h, d), dtype)
        v = jax.random.normal(keys[2], (args.batch, lk, h, d), dtype)
        w = jax.random.normal(keys[3], (args.batch, lq, h, d), jnp.float32)
        for kernel in args.kernels.split(","):
            def loss(q, k, v, kernel=kernel, w=w):
                return jnp.sum(layers.dot_product_attention(q, k, v, kernel=kernel).astype(jnp.float32) * w)

            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            t0 = time.perf_counter()
            compiled = grad.lower(q, k, v).compile()
            compile_s = time.perf_counter() - t0
            jax.block_until_ready(compiled(q, k, v))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(q, k, v))
                times.append(time.perf_counter() - t0)
            print(json.dumps({
                "bench": "attention", "shape": shape, "kernel": kernel,
                "device": jax.devices()[0].device_kind, "batch": args.batch, "dtype": args.dtype,
                "fwd_bwd_s": round(min(times), 5),
                "temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
                "compile_s": round(compile_s, 2),
            }), flush=True)


if __name__ == "__main__":
    main()
