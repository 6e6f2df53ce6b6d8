"""Host memory of converting restored UNet state into the other block layout (checkpoint._in_layout_of):

    .venv/bin/python bench/restore_relayout.py --mode=groups    # one transformer at a time (the code)
    .venv/bin/python bench/restore_relayout.py --mode=whole     # one program over the whole tree (before)

A resume or a stage seed whose model.scan_blocks differs from the workdir's restores the arrays in the
stored layout and converts them on the devices. This builds `--trees` copies of the full base UNet's params
(as params, EMA and the Adam moments are) on this host's CPU device in the unrolled layout, converts them to
the scanned one, and prints one JSON line: the state's bytes, the process's peak RSS before and after the
conversion, and the conversion's seconds. On the CPU backend device memory is host memory, so the peak RSS
growth is the conversion's extra device memory. bench/RESULTS.md 2026-11-28 (session 16).
"""

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sdxl_jax import checkpoint  # noqa: E402
from sdxl_jax.models import unet as unet_lib  # noqa: E402


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("groups", "whole"), default="groups")
    p.add_argument("--unet", default="sdxl_base", choices=sorted(unet_lib.PRESETS))
    p.add_argument("--trees", type=int, default=1, help="state trees (4 in a run: params, EMA, mu, nu)")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    cfg = unet_lib.PRESETS[a.unet]
    abstract = nn.meta.unbox(unet_lib.abstract_params(cfg))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = {f"tree_{i}": jax.tree.map(lambda x, i=i: jnp.full(x.shape, i + 1.0, a.dtype), abstract)
            for i in range(a.trees)}
    jax.block_until_ready(tree)
    state = sum(x.nbytes for x in jax.tree.leaves(tree))
    like = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, a.dtype, sharding=sharding),
                            unet_lib.relayout(abstract, True)) for k in tree}
    before = _peak_rss_gib()
    t0 = time.perf_counter()
    if a.mode == "groups":
        out = checkpoint._in_layout_of(tree, like)
    else:
        shardings = jax.tree.map(lambda x: x.sharding, like)
        out = jax.jit(lambda t: unet_lib.relayout(t, True), out_shardings=shardings)(tree)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - t0
    after = _peak_rss_gib()
    print(json.dumps({"bench": "restore_relayout", "mode": a.mode, "unet": a.unet, "trees": a.trees,
                      "dtype": a.dtype, "state_gib": round(state / 2**30, 3),
                      "peak_rss_before_gib": round(before, 3), "peak_rss_after_gib": round(after, 3),
                      "peak_growth_gib": round(after - before, 3), "seconds": round(seconds, 2)}),
          flush=True)


if __name__ == "__main__":
    main()
