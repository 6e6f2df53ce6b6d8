"""Compile time and memory of the SDXL base UNet's gradient with each SpatialTransformer's blocks
unrolled (the model as it is) or run in a scan over stacked block params (a prototype, not the model):

    .venv/bin/python bench/scan_blocks.py --mode=unrolled --remat=dots
    .venv/bin/python bench/scan_blocks.py --mode=native --remat=dots

The gradient of a sum of squares of the UNet's output with respect to every param, bf16 compute, batch 1,
compiled ahead of time on abstract shapes for this host's backend (no arrays). Modes:
- unrolled: `layers.SpatialTransformer` as in the model (70 blocks in the base, each its own HLO).
- native: `nn.scan` over one block with params stacked on a leading axis (`transformer_blocks/block/...`):
  what a scanned model would store. Not weight-compatible with the converters or checkpoints.
- stacked: the model's param tree unchanged; each SpatialTransformer stacks its blocks' params (cast to
  the compute dtype) inside the step and scans over them.
Prints one JSON line: lowering and compile seconds, XLA's FLOPs (a scan body counts once) and the
compiled temp memory. bench/RESULTS.md 2026-11-27 (session 13). `stack_blocks` maps the model's params to
the native layout; tests/test_bench_tools.py checks that the native model computes the unrolled one with
them (tiny UNet, 2 blocks per transformer).
"""

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sdxl_jax import held  # noqa: E402
from sdxl_jax.models import layers  # noqa: E402
from sdxl_jax.models import unet as unet_lib  # noqa: E402


class _Body(nn.Module):
    """One block as a scan body: (h, context) -> (h, None)."""

    make: object  # () -> the block module

    @nn.compact
    def __call__(self, h, context):
        return self.make()(h, context), None


class _Scanned(layers.SpatialTransformer):
    mode: str = "native"

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        h = layers.GroupNorm(self.num_groups, epsilon=1e-6, name="norm", **kw)(x).reshape(b, hh * ww, c)
        h = layers.dense(c, ("embed", "heads"), name="proj_in", **kw)(h)

        def block(**names):
            return self.block(self.heads, self.head_dim, self.kernel, **names, **kw)

        if self.mode == "native":
            scan = nn.scan(_Body, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=nn.broadcast, length=self.depth, metadata_params={nn.PARTITION_NAME: None})
            h, _ = scan(lambda: block(name="block"), name="transformer_blocks")(h, context)
        elif self.is_initializing():  # stacked: the model's own param tree
            for i in range(self.depth):
                h = block(name=f"transformer_blocks_{i}")(h, context)
        else:  # each block's params cast to their held dtypes (held.py: norms stay fp32), then stacked
            one = block(parent=None)
            like = self.block(self.heads, self.head_dim, self.kernel, dtype=self.dtype,
                              param_dtype=self.dtype, parent=None)
            like = nn.meta.unbox(jax.eval_shape(like.init, jax.random.key(0), h, context)["params"])
            tree = self.variables["params"]
            blocks = [held.cast(tree[f"transformer_blocks_{i}"], like) for i in range(self.depth)]
            h, _ = jax.lax.scan(lambda h, p: (one.apply({"params": p}, h, context), None), h,
                                jax.tree.map(lambda *xs: jnp.stack(xs), *blocks))
        h = layers.dense(c, ("heads", "embed"), name="proj_out", **kw)(h)
        return h.reshape(b, hh, ww, c) + x.astype(self.dtype)


def stack_blocks(tree):
    """The model's params -> the `native` layout: every `transformer_blocks_{i}` sibling group becomes
    `transformer_blocks/block` with the blocks stacked on a leading axis (what a converter would do)."""
    if not isinstance(tree, dict):
        return tree
    names = []
    while f"transformer_blocks_{len(names)}" in tree:
        names.append(f"transformer_blocks_{len(names)}")
    out = {k: stack_blocks(v) for k, v in tree.items() if k not in names}
    if names:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[k] for k in names])
        out["transformer_blocks"] = {"block": stacked}
    return out


def use(mode: str) -> None:
    """Make the UNet build its SpatialTransformers in `mode` (unet.py looks the class up at call time)."""
    layers.SpatialTransformer = _UNROLLED if mode == "unrolled" else functools.partial(_Scanned, mode=mode)


_UNROLLED = layers.SpatialTransformer


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("unrolled", "native", "stacked"), default="unrolled")
    p.add_argument("--side", type=int, default=32, help="latent side (32 = 256^2 images)")
    p.add_argument("--remat", default="dots", choices=sorted(unet_lib.REMAT_POLICIES))
    p.add_argument("--attention", default="xla", choices=layers.ATTENTION_KERNELS)
    a = p.parse_args()
    use(a.mode)
    cfg = unet_lib.UNetConfig(dtype="bfloat16", attention=a.attention, remat=a.remat)
    model = unet_lib.UNet(cfg)
    params = nn.meta.unbox(unet_lib.abstract_params(cfg))
    args = (jax.ShapeDtypeStruct((1, a.side, a.side, cfg.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
            jax.ShapeDtypeStruct((1, 77, cfg.context_dim), jnp.float32),
            jax.ShapeDtypeStruct((1, cfg.adm_in_channels), jnp.float32))

    def loss(params, *args):
        return jnp.sum(jnp.square(model.apply({"params": params}, *args)))

    t0 = time.time()
    lowered = jax.jit(jax.grad(loss)).lower(params, *args)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(json.dumps({
        "mode": a.mode, "side": a.side, "remat": a.remat, "attention": a.attention,
        "backend": jax.default_backend(), "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
        "hlo_lines": len(lowered.as_text().splitlines()), "xla_tflops": round(cost.get("flops", 0) / 1e12, 3),
        "temp_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 2),
        "params": sum(x.size for x in jax.tree.leaves(params)),
    }))


if __name__ == "__main__":
    main()
