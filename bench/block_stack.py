"""Memory of a stack of SDXL transformer blocks' gradient, compiled ahead of time: a one-minute proxy for
the level-3 part of the full train step's peak (bench/train_step.py --compile_only takes 25-45 minutes).

    JAX_PLATFORMS=cpu /work/tpuvenv/bin/python bench/block_stack.py --topology=tpu:v5e:2x4 \
        --remat=dots --depth=10 --per_device_batch=2 --peak_buffers=8

`depth` BasicTransformerBlocks of the SDXL base's level 3 (1280 wide, 20 heads, 1024 tokens = 1024^2
images, 77 text tokens of 2048), bf16 compute, fp32 params sharded over all chips on their first axis
(fsdp), the batch split over the chips; the gradient of a sum of squares with respect to params and
input, each block under the remat policy as in the UNet. Reports the compiled per-chip temp memory and,
with --peak_buffers, the shape groups live at the peak (what each block leaves for the backward: the
full step's peak is at the forward/backward boundary, where every block's saved values are live).
It is a proxy, and twice a wrong one: the full step's compiler sees ~6x more and packs its buffers
differently (remat dots_no_batch: -0.16 GiB here, +0.27 GiB in the full step; a one-block custom VJP
for cross-attention: -0.11 GiB here, +0.32 GiB there, bench/RESULTS.md 2026-11-27 session 6). Use it to
find candidates and to read what each block leaves for the backward; decide with bench/train_step.py.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="", help="tpu:<name> for libtpu's AOT compiler; default: the host's "
                   "CPU with --devices fake devices")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (without --topology)")
    p.add_argument("--remat", default="dots", help="a models.unet.REMAT_POLICIES key")
    p.add_argument("--attention", default="chunked", help="a layers.ATTENTION_KERNELS key")
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--per_device_batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024, help="image tokens (1024 = level 3 at 1024^2)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--peak_buffers", type=int, default=0, help="print the N largest groups live at the peak")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dump = tempfile.mkdtemp(prefix="xla_dump_") if args.peak_buffers else None
    flags = os.environ.get("XLA_FLAGS", "")
    if not args.topology:
        flags += f" --xla_force_host_platform_device_count={args.devices}"
    if dump:
        flags += f" --xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*block_stack.*"
    os.environ["XLA_FLAGS"] = flags
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs import common
    from sdxl_jax import parallel
    from sdxl_jax.models import layers, unet

    if args.topology:
        from train_step import topology_devices

        devices = topology_devices(args.topology)
    else:
        devices = jax.devices()
    n = len(devices)
    # The train step's mesh (all chips on fsdp) and logical rules, under which the splash kernel's
    # shard_map runs each chip's own rows
    config = common.base()
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    mesh = parallel.make_mesh(config.mesh, devices)
    block = unet._remat(layers.BasicTransformerBlock, args.remat)

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x, ctx):
            for i in range(args.depth):
                x = block(args.width // 64, 64, args.attention, dtype=jnp.bfloat16,
                          name=f"transformer_blocks_{i}")(x, ctx)
            return x

    model = Stack()
    sharded, replicated = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    b = n * args.per_device_batch
    x = jax.ShapeDtypeStruct((b, args.tokens, args.width), jnp.bfloat16, sharding=sharded)
    ctx = jax.ShapeDtypeStruct((b, 77, 2048), jnp.bfloat16, sharding=sharded)
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(
        jax.random.key(0), jnp.zeros(x.shape, x.dtype), jnp.zeros(ctx.shape, ctx.dtype))["params"]))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=sharded if a.shape[0] % n == 0 else replicated), params)

    def block_stack(p, x, ctx):
        return jnp.sum(model.apply({"params": p}, x, ctx).astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(block_stack, argnums=(0, 1)),
                   out_shardings=(jax.tree.map(lambda a: a.sharding, params), sharded))
    t0 = time.time()
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules(config)):
        compiled = grad.lower(params, x, ctx).compile()
    ma = compiled.memory_analysis()
    result = {"bench": "block_stack", "device": devices[0].device_kind, "n_devices": n, "remat": args.remat,
              "attention": args.attention, "depth": args.depth, "per_device_batch": args.per_device_batch,
              "tokens": args.tokens, "width": args.width,
              "temp_size_gib": round(ma.temp_size_in_bytes / 2**30, 3),
              "argument_size_gib": round(ma.argument_size_in_bytes / 2**30, 3),
              "compile_s": round(time.time() - t0, 1)}
    print(json.dumps(result), flush=True)
    if dump:
        from peak_buffers import format_peak, peak_buffers

        print(format_peak(peak_buffers(dump, module="block_stack"), args.peak_buffers), flush=True)
        shutil.rmtree(dump, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
