"""Aspect-ratio buckets: which (height, width) shapes a batch may take.

SDXL trains stage 1 and 2 on one square bucket and stage 3 on the paper's 40 multi-aspect buckets
(SDXL App. I, SPEC.md "Data conditioning"); every batch comes from a single bucket, and an image goes to
the bucket whose aspect ratio is nearest in log space.

    buckets.from_config(config.data) -> ((h, w), ...)   # "square" | "sdxl" | "generated"
    buckets.assign(h, w, table) -> index of the nearest bucket
"""

import math

import numpy as np

# The paper's table (SDXL App. I), (height, width); configs/common.py re-exports it, and
# tests/test_data_buckets.py checks it against SPEC.md's text.
SDXL_BUCKETS = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip

KINDS = ("square", "sdxl", "generated")


def square(resolution):
    return ((int(resolution), int(resolution)),)


def generate(resolution, side_step=64, min_side=256, max_side=2048):
    """Buckets of area <= resolution^2 with sides multiples of side_step in [min_side, max_side].

    For each side s on the grid the other side is the largest grid value keeping the area within
    resolution^2, in both orientations; sorted by aspect ratio h/w. At resolution 1024 this gives 33 of
    the paper's 40 buckets (the paper's table adds seven hand-picked in-between shapes; use "sdxl" for it).
    """
    area = int(resolution) ** 2
    if side_step <= 0 or min_side <= 0 or min_side > max_side:
        raise ValueError(
            f"bad bucket generator settings: side_step={side_step}, min_side={min_side}, "
            f"max_side={max_side}; need side_step > 0 and 0 < min_side <= max_side"
        )
    out = set()
    for s in range(_ceil_to(min_side, side_step), max_side + 1, side_step):
        other = (area // s) // side_step * side_step
        if min_side <= other <= max_side:
            out.add((s, other))
            out.add((other, s))
    if not out:
        raise ValueError(
            f"no bucket of area <= {resolution}^2 has both sides in [{min_side}, {max_side}] on a "
            f"{side_step}-pixel grid; widen data.bucket_min_side / bucket_max_side"
        )
    return tuple(sorted(out, key=lambda hw: (hw[0] / hw[1], hw[0])))


def _ceil_to(x, step):
    return -(-int(x) // step) * step


def from_config(data_config):
    kind = data_config.buckets
    if kind == "square":
        return square(data_config.resolution)
    if kind == "sdxl":
        return tuple(SDXL_BUCKETS)
    if kind == "generated":
        return generate(
            data_config.resolution,
            data_config.bucket_side_step,
            data_config.bucket_min_side,
            data_config.bucket_max_side,
        )
    raise ValueError(f"unknown data.buckets={kind!r}; choose one of {KINDS}")


def log_aspects(table):
    return np.array([math.log(h / w) for h, w in table], np.float64)


def assign(h, w, table):
    """Index of the bucket whose log(h/w) is nearest to the image's (ties: the first in the table)."""
    return int(np.argmin(np.abs(log_aspects(table) - math.log(h / w))))


def assign_many(hs, ws, table):
    """Vectorised `assign` for arrays of heights and widths."""
    la = np.log(np.asarray(hs, np.float64) / np.asarray(ws, np.float64))
    return np.argmin(np.abs(la[:, None] - log_aspects(table)[None, :]), axis=1).astype(np.int64)
