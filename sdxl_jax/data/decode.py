"""Image and caption decoding with every failure turned into a counted skip reason.

Policies (stated here because "bad input never stops training", issue 6):
- EXIF orientation is applied, so sizes and pixels are those of the upright image.
- Modes: L/LA/P/CMYK/YCbCr/1 -> RGB; alpha (RGBA, LA, P with transparency) is composited on white;
  16-bit and 32-bit integer images are scaled to 8 bits (PIL's own convert clips them instead).
- Images over `max_pixels` are refused before decoding (decompression-bomb guard).
- Captions are UTF-8 text, stripped; a missing, empty or non-UTF-8 caption skips the example.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Reasons an example is skipped; the iterator reports counts under these names.
SKIP_REASONS = (
    "empty_file",
    "not_an_image",  # unreadable header: corrupt or unsupported format
    "decode_error",  # header fine, pixels not (e.g. truncated); found while training, row substituted
    "too_many_pixels",
    "too_small",
    "extreme_aspect",
    "missing_caption",
    "empty_caption",
    "caption_not_utf8",
    "missing_file",
)

_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


class Skip(Exception):
    """An example that must be skipped; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason, detail=""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open(data, max_pixels):
    """Lazily opens a path or bytes; reads only the header."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise Skip("empty_file")
        fp = io.BytesIO(data)
    else:
        try:
            if os.path.getsize(data) == 0:
                raise Skip("empty_file", str(data))
        except OSError as e:
            raise Skip("missing_file", str(data)) from e
        fp = data
    # Our own limit is checked below; PIL's global one would warn or raise first and differently.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise Skip("too_many_pixels", str(e)) from e
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise Skip("not_an_image", str(e)) from e
    w, h = img.size
    if w <= 0 or h <= 0 or (max_pixels and w * h > max_pixels):
        img.close()  # the file PIL opened for a path
        if w <= 0 or h <= 0:
            raise Skip("not_an_image", f"size {w}x{h}")
        raise Skip("too_many_pixels", f"{w}x{h} > {max_pixels} pixels (data.max_image_pixels)")
    return img


def _orientation(img):
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block is ignored, not fatal
        return 1


def probe(data, max_pixels):
    """(height, width) of the upright image from its header alone; raises Skip."""
    with _open(data, max_pixels) as img:  # closes the file it opened (a probe reads headers by the million)
        w, h = img.size
        transposed = _orientation(img) in _TRANSPOSED_ORIENTATIONS
    return (w, h) if transposed else (h, w)


def decode(data, max_pixels, min_size=None):
    """Decodes to an upright RGB PIL image; raises Skip.

    min_size (h, w): the smallest upright size the caller will resample from; JPEGs are then decoded with
    DCT scaling (PIL draft) to the smallest 1/2, 1/4 or 1/8 scale still at least that large, which is
    much faster for large photos and loses nothing the following downscale would keep.
    """
    img = _open(data, max_pixels)
    try:
        orientation = _orientation(img)
        if min_size is not None and img.format == "JPEG":
            mh, mw = min_size
            if orientation in _TRANSPOSED_ORIENTATIONS:
                mh, mw = mw, mh
            img.draft(None, (max(1, int(mw)), max(1, int(mh))))
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Skip:
        raise
    except Exception as e:  # PIL raises many types for truncated/corrupt pixel data
        img.close()  # load() closes the file only when it succeeds
        raise Skip("decode_error", str(e)) from e


def to_rgb(img):
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)
        arr = (np.clip(arr, 0, 65535) // 257).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def caption_text(raw):
    """bytes/str/None -> stripped caption; raises Skip for missing, non-UTF-8 or empty captions."""
    if raw is None:
        raise Skip("missing_caption")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Skip("caption_not_utf8", str(e)) from e
    text = " ".join(str(raw).split())
    if not text:
        raise Skip("empty_caption")
    return text
