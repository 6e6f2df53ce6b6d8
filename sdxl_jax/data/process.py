"""From a decoded image to a bucket-shaped training row with SDXL's micro-conditioning.

SDXL sec. 2.2 / SPEC.md "Data conditioning": the image is resized to cover its bucket, cropped (random
or center) and optionally flipped; the model is told
- original_size = (h, w) before any resize,
- crop_coords_top_left = (top, left) of the crop in pixels of the resized image,
- target_size = (h, w) of the bucket.
A horizontal flip mirrors the crop's left coordinate (left' = resized_w - bucket_w - left), as if the
image had been flipped before cropping, which is what the diffusers SDXL training script records.
"""

import math

import numpy as np
from PIL import Image

# Antialiased bilinear, as the diffusers SDXL training script resizes (torchvision Resize, BILINEAR, on
# PIL images); bicubic costs ~1.7x more here and the resize is the largest cost after decoding.
RESAMPLE = Image.Resampling.BILINEAR


def cover_size(h, w, bh, bw):
    """Smallest (h, w) with the image's aspect ratio that covers the (bh, bw) bucket."""
    scale = max(bh / h, bw / w)
    return max(bh, int(round(h * scale))), max(bw, int(round(w * scale)))


def crop_params(h, w, bh, bw, *, random_crop, flip, rng=None, cover_scale=1.0):
    """Geometry and conditioning for an (h, w) image in a (bh, bw) bucket.

    Returns dict(resized=(rh, rw), top, left (crop in the unflipped resized image), flip (bool),
    original_size, crop_coords_top_left, target_size). rng: a numpy Generator (needed when random_crop
    or flip). cover_scale > 1 resizes the image to cover that multiple of the bucket before cropping.
    """
    rh, rw = cover_size(h, w, max(bh, round(bh * cover_scale)), max(bw, round(bw * cover_scale)))
    if random_crop:
        top = int(rng.integers(0, rh - bh + 1))
        left = int(rng.integers(0, rw - bw + 1))
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    flipped = bool(flip and rng.random() < 0.5)
    cond_left = rw - bw - left if flipped else left
    return dict(
        resized=(rh, rw),
        top=top,
        left=left,
        flip=flipped,
        original_size=(h, w),
        crop_coords_top_left=(top, cond_left),
        target_size=(bh, bw),
    )


def render_crop(img, params):
    """Resizes `img` (RGB PIL, any size with the original aspect) and crops/flips per `params`.

    Only the crop's source region is resampled (PIL's resize `box`), which gives the same pixels as
    resize-then-crop without resampling the discarded part. `img` may be smaller than the original
    (JPEG draft decoding): the box is scaled accordingly.
    """
    rh, rw = params["resized"]
    bh, bw = params["target_size"]
    sx, sy = img.width / rw, img.height / rh
    top, left = params["top"], params["left"]
    box = (left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)
    # reducing_gap=3: above 3x PIL first box-reduces by an integer factor, which it documents as
    # indistinguishable from full resampling and is much faster for very large sources.
    out = img.resize((bw, bh), RESAMPLE, box=box, reducing_gap=3.0)
    if params["flip"]:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def to_float(img, out=None):
    """uint8 RGB -> float32 in [-1, 1] (SPEC.md: images are in [-1, 1] inside the system).

    out: a float32 array to write into (e.g. the batch's row), saving an allocation and a copy.
    """
    arr = np.asarray(img, dtype=np.uint8)
    if out is None:
        out = np.empty(arr.shape, np.float32)
    np.multiply(arr, np.float32(1 / 127.5), out=out, casting="unsafe")
    out -= np.float32(1.0)
    return out


def max_aspect_ok(h, w, max_aspect_ratio):
    return not max_aspect_ratio or abs(math.log(h / w)) <= math.log(max_aspect_ratio)
