"""bf16 gradient accuracy of the chunked and splash attention kernels against materialised attention, all
against fp32.

    .venv/bin/python bench/attention_accuracy.py [--tokens=4096] [--heads=10] [--head_dim=64] [--sharpness=S]
        [--kernels=xla,chunked,splash,splash_unfused]

The chunked backward (sdxl_jax/models/chunked_attention.py) computes delta = rowsum(dO * O) from the bf16
output and casts each block's dS to bf16, as FlashAttention does. This prints, for bf16 inputs, the
relative L2 error of dq, dk, dv of `xla` (materialised) and `chunked` attention against fp32 materialised
attention, one JSON line per kernel. `--sharpness` scales q and k (the logits' spread: a peakier softmax).
tests/test_chunked_attention.py keeps chunked within 1.1x of materialised at 4096 tokens.
`splash` (sdxl_jax/models/tpu_attention.py, run in the Pallas interpreter here) computes dQ in its
fused backward kernel, one bf16 partial per key block summed afterwards; `splash_unfused` uses the
separate dq kernel, which accumulates in fp32.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--sharpness", type=float, default=1.5)
    p.add_argument("--kernels", default="xla,chunked", help="of xla, chunked, splash, splash_unfused")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sdxl_jax.models import chunked_attention, tpu_attention

    def grads(kernel, dtype):
        def loss(q, k, v, g):
            q, k, v = (t.astype(dtype) for t in (q, k, v))
            if kernel == "xla":
                o = jax.nn.dot_product_attention(q, k, v, implementation="xla")
            elif kernel.startswith("splash"):
                o = tpu_attention.splash_attention(q, k, v, fused_backward=kernel == "splash", interpret=True)
            else:
                o = chunked_attention.attention(q, k, v)
            return jnp.sum(o.astype(jnp.float32) * g)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    shape = (1, args.tokens, args.heads, args.head_dim)
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, shape) * args.sharpness
    k = jax.random.normal(kk, shape) * args.sharpness
    v, g = jax.random.normal(kv, shape), jax.random.normal(kg, shape)
    exact = grads("xla", jnp.float32)(q, k, v, g)
    for kernel in args.kernels.split(","):
        t0 = time.time()
        got = grads(kernel, jnp.bfloat16)(q, k, v, g)
        errors = {
            f"d{name}_rel_l2": float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(r, np.float64))
                                     / np.linalg.norm(np.asarray(r, np.float64)))
            for name, a, r in zip("qkv", got, exact, strict=True)
        }  # fmt: skip
        print(json.dumps(dict(bench="attention_accuracy", kernel=kernel, dtype="bfloat16", **vars(args),
                              **{k: round(x, 6) for k, x in errors.items()},
                              seconds=round(time.time() - t0, 2))), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
