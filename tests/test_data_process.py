"""sdxl_jax.data.process and decode: SDXL's size/crop conditioning values, resize-crop-flip, decoding."""

import io

import numpy as np
import pytest
from PIL import Image

from sdxl_jax.data import decode, process


@pytest.mark.parametrize(
    "bucket, resized, crop, crop_flipped",
    [
        # 1600 x 1200 (w x h) photo; scale to cover = max(bh/1200, bw/1600).
        ((1024, 1024), (1024, 1365), (0, 170), (0, 171)),  # 1024/1200 -> 1365.33 wide, (1365-1024)//2
        ((896, 1152), (896, 1195), (0, 21), (0, 22)),  # 896/1200 -> 1194.67 wide, (1195-1152)//2
    ],
)
def test_conditioning_for_a_1600x1200_image(bucket, resized, crop, crop_flipped):
    rng = np.random.default_rng(0)
    p = process.crop_params(1200, 1600, *bucket, random_crop=False, flip=False, rng=rng)
    assert p["resized"] == resized and (p["top"], p["left"]) == crop and not p["flip"]
    assert p["original_size"] == (1200, 1600)
    assert p["crop_coords_top_left"] == crop
    assert p["target_size"] == bucket
    # With a flip the crop is mirrored: left' = resized_w - bucket_w - left; top is unchanged.
    flipped = [
        process.crop_params(1200, 1600, *bucket, random_crop=False, flip=True, rng=np.random.default_rng(s))
        for s in range(8)
    ]
    assert {f["flip"] for f in flipped} == {True, False}
    for f in flipped:
        assert f["crop_coords_top_left"] == (crop_flipped if f["flip"] else crop)
        assert (f["top"], f["left"]) == crop  # the pixels are cropped at the same place, then mirrored


def test_random_crop_stays_inside_and_covers_both_axes():
    tops, lefts = set(), set()
    for s in range(400):
        p = process.crop_params(300, 200, 128, 128, random_crop=True, flip=True, rng=np.random.default_rng(s))
        rh, rw = p["resized"]
        assert (rh, rw) == (192, 128)
        assert 0 <= p["top"] <= rh - 128 and p["left"] == 0
        top, left = p["crop_coords_top_left"]
        assert top == p["top"] and left == 0  # nothing to mirror when the width fits exactly
        tops.add(p["top"])
    assert min(tops) == 0 and max(tops) == 64
    for s in range(400):
        p = process.crop_params(200, 300, 128, 128, random_crop=True, flip=True, rng=np.random.default_rng(s))
        lefts.add(p["crop_coords_top_left"][1])
    assert min(lefts) == 0 and max(lefts) == 64


def test_cover_scale_crops_at_a_larger_pixel_scale():
    """cover_scale=2: a 100x150 image covers 64x96 before a 32x32 crop (autoencoder crops), so objects
    keep the pixel size they have in 64 px diffusion images; the crop stays inside both axes."""
    tops, lefts = set(), set()
    for s in range(200):
        p = process.crop_params(100, 150, 32, 32, random_crop=True, flip=False, rng=np.random.default_rng(s),
                                cover_scale=2.0)
        assert p["resized"] == (64, 96) and p["target_size"] == (32, 32)
        assert 0 <= p["top"] <= 32 and 0 <= p["left"] <= 64
        tops.add(p["top"])
        lefts.add(p["left"])
    assert min(tops) == 0 and max(tops) == 32 and min(lefts) == 0 and max(lefts) == 64
    img = Image.fromarray(_gradient(100, 150))
    p = process.crop_params(100, 150, 32, 32, random_crop=False, flip=False, cover_scale=2.0)
    want = np.asarray(img.resize((96, 64), process.RESAMPLE))[16:48, 32:64]
    np.testing.assert_allclose(np.asarray(process.render_crop(img, p), np.float32), want, atol=2)


def _gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], -1).astype(np.uint8)


def test_render_crop_equals_resize_then_crop_and_flip_mirrors():
    img = Image.fromarray(_gradient(120, 160))
    p = process.crop_params(120, 160, 64, 64, random_crop=False, flip=False)
    out = np.asarray(process.render_crop(img, p), np.float32)
    full = img.resize(p["resized"][::-1], process.RESAMPLE)
    ref = np.asarray(full, np.float32)[p["top"] : p["top"] + 64, p["left"] : p["left"] + 64]
    assert out.shape == (64, 64, 3)
    assert np.abs(out - ref)[2:-2, 2:-2].max() <= 2  # same filter; only border support differs
    pf = dict(p, flip=True)
    assert np.array_equal(
        np.asarray(process.render_crop(img, pf)), np.asarray(process.render_crop(img, p))[:, ::-1]
    )
    x = process.to_float(np.array([[[0, 255, 128]]], np.uint8))
    assert x.dtype == np.float32 and x[0, 0, 0] == -1 and x[0, 0, 1] == 1 and abs(x[0, 0, 2] - 0.00392) < 1e-4


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_modes_to_rgb():
    gray = Image.fromarray(np.full((8, 8), 100, np.uint8), "L")
    rgba = Image.fromarray(np.dstack([np.full((8, 8, 3), 10, np.uint8), np.zeros((8, 8), np.uint8)]), "RGBA")
    pal = gray.convert("P")
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    i16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    cases = {
        "L": (_encode(gray, "PNG"), 100),
        "LA": (_encode(gray.convert("LA"), "PNG"), 100),
        "P": (_encode(pal, "PNG"), 100),
        "RGBA transparent -> white": (_encode(rgba, "PNG"), 255),
        "CMYK": (_encode(cmyk, "JPEG"), 255),
        "16-bit": (_encode(i16, "PNG"), 255),
    }
    for name, (data, value) in cases.items():
        img = decode.decode(data, max_pixels=10**6)
        arr = np.asarray(img)
        assert img.mode == "RGB" and arr.shape == (8, 8, 3), name
        assert abs(int(arr.mean()) - value) <= 2, (name, arr.mean())


def test_exif_orientation_swaps_size_and_pixels():
    arr = _gradient(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(Image.fromarray(arr), "JPEG", exif=exif, quality=95)
    assert decode.probe(data, 10**6) == (40, 20)
    img = decode.decode(data, 10**6)
    assert img.size == (20, 40)  # PIL size is (w, h)
    ref = np.rot90(arr, k=-1)
    assert np.abs(np.asarray(img, np.float32) - ref).mean() < 6


def test_jpeg_draft_decoding_keeps_enough_pixels():
    data = _encode(Image.fromarray(_gradient(800, 1200)), "JPEG", quality=90)
    img = decode.decode(data, 10**7, min_size=(180, 270))
    assert img.size == (300, 200)  # 1/4 scale: the smallest DCT scale still >= the requested size
    assert decode.decode(data, 10**7, min_size=(500, 700)).size == (1200, 800)


def test_decode_failures_are_named_skips():
    png = _encode(Image.fromarray(_gradient(64, 64)), "PNG")
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    jpg = _encode(Image.fromarray(noise), "JPEG")  # big enough that half of it still holds the header
    for data, reason in [
        (b"", "empty_file"),
        (b"not an image at all" * 10, "not_an_image"),
        (png, "too_many_pixels"),
    ]:
        with pytest.raises(decode.Skip) as e:
            decode.decode(data, max_pixels=1000)
        assert e.value.reason == reason
    with pytest.raises(decode.Skip) as e:
        decode.decode(jpg[: len(jpg) // 2], 10**6)
    assert e.value.reason == "decode_error"
    for raw, reason in [
        (None, "missing_caption"),
        (b"  \n", "empty_caption"),
        (b"\xff\xfe caf\xe9", "caption_not_utf8"),
    ]:
        with pytest.raises(decode.Skip) as e:
            decode.caption_text(raw)
        assert e.value.reason == reason
    assert decode.caption_text(b" a  red\ncircle ") == "a red circle"
