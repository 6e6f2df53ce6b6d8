"""Scores generated `shapes` samples against their prompts with a plain image-statistics classifier.

    python -m sdxl_jax.eval.shapes WORKDIR [--holdout "red circle blue,..."] [--out FILE]

reads every WORKDIR/**/samples.jsonl (one object per image with "prompt" and "file", the file relative to
the jsonl, as sample.py writes them), prints one line per image and the colour / shape / background
accuracy, and writes a JSON summary (default WORKDIR/eval_shapes.json). With --holdout (the training
config's data.shapes_holdout) the accuracies are also split into held-out and seen combinations.

The classifier, in the vocabulary of sdxl_jax/data/shapes.py:
- background: the named colour most of the border pixels are nearest to;
- object: the largest connected region of pixels far from the background colour (CIELAB distance above
  an Otsu threshold); its colour is the named colour most of its pixels are nearest to;
- shape: the object mask, cropped to its bounding box and resized to a small grid, is compared with the
  renderer's own shapes normalised the same way; the best intersection-over-union wins. Normalising to
  the bounding box makes the match independent of position, scale and mild stretching.
Distances are in CIELAB (roughly perceptual), so e.g. a dull orange is not called red.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import re
import sys

import numpy as np
import scipy.ndimage as ndi
from PIL import Image

from sdxl_jax.data import shapes

WORK_SIDE = 128  # images are box-downsampled to this long side: speed, and it averages away pixel noise
GRID = 24  # side of the bounding-box-normalised grid the shape templates are compared on
MIN_DELTA_E = 15.0  # smallest CIELAB distance from the background that can count as object
MIN_OBJECT_PIXELS = 6  # in the working copy; smaller regions are noise, not an object


def _srgb_to_lab(rgb) -> np.ndarray:
    """sRGB in [0, 255] (..., 3) -> CIELAB (D65 white)."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


COLOR_NAMES = tuple(shapes.COLORS)
_PALETTE_LAB = _srgb_to_lab(np.array([shapes.COLORS[n] for n in COLOR_NAMES]))

_COLOR_RE = "|".join(COLOR_NAMES)
_SHAPE_RE = "|".join(shapes.SHAPES)
_OBJECT = re.compile(rf"\b({_COLOR_RE})\s+({_SHAPE_RE})s?\b")
_BACKGROUND = re.compile(rf"\b({_COLOR_RE})\s+background\b")


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a shapes caption such as "a red circle on a blue background"."""
    text = prompt.lower()
    obj, bg = _OBJECT.search(text), _BACKGROUND.search(text)
    if obj is None or bg is None:
        raise ValueError(
            f"prompt {prompt!r} is not a shapes caption: expected '<colour> <shape> ... <colour> background' "
            f"with colours {COLOR_NAMES} and shapes {shapes.SHAPES}"
        )
    return obj.group(1), obj.group(2), bg.group(1)


def _nearest_color(lab: np.ndarray) -> np.ndarray:
    return np.argmin(np.linalg.norm(lab[..., None, :] - _PALETTE_LAB, axis=-1), axis=-1)


def _mode(labels: np.ndarray) -> int:
    return int(np.bincount(labels.ravel(), minlength=len(COLOR_NAMES)).argmax())


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1:][np.argmax(between)])


def _bbox_grid(mask: np.ndarray) -> np.ndarray:
    """The mask cropped to its bounding box and resized to GRID x GRID (float in [0, 1])."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    return np.asarray(Image.fromarray(crop).resize((GRID, GRID), Image.Resampling.BILINEAR))


@functools.cache
def _templates() -> dict[str, np.ndarray]:
    # Rendered by the data module itself, so the templates follow any change to its shapes.
    out = {}
    for name in shapes.SHAPES:
        img = shapes.render(name, "white", "black", 192, 192, size=0.4)
        out[name] = _bbox_grid(img[..., 0] > 128) > 0.5
    return out


def _classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    grid = _bbox_grid(mask) > 0.5
    ious = {n: float((grid & t).sum() / max((grid | t).sum(), 1)) for n, t in _templates().items()}
    return max(ious, key=ious.get), ious


def _working_copy(image) -> np.ndarray:
    img = Image.fromarray(np.asarray(image, np.uint8)) if not isinstance(image, Image.Image) else image
    img = img.convert("RGB")
    scale = WORK_SIDE / max(img.size)
    if scale < 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BOX)
    return np.asarray(img, np.float64)


def classify_image(image) -> dict:
    """uint8 (H, W, 3) (or a PIL image) -> {"color", "shape", "background", "object_fraction",
    "shape_iou"}; "color" and "shape" are None when no object stands out from the background."""
    lab = _srgb_to_lab(_working_copy(image))
    h, w = lab.shape[:2]
    ring = max(1, round(0.04 * min(h, w)))
    border = np.ones((h, w), bool)
    border[ring:h - ring, ring:w - ring] = False
    border_labels = _nearest_color(lab[border])
    bg_index = _mode(border_labels)
    bg_lab = np.median(lab[border][border_labels == bg_index], axis=0)

    delta = np.linalg.norm(lab - bg_lab, axis=-1)
    mask = delta > max(_otsu(delta), MIN_DELTA_E)
    components, n = ndi.label(mask)
    result = dict(background=COLOR_NAMES[bg_index], color=None, shape=None, object_fraction=0.0, shape_iou={})
    sizes = np.bincount(components.ravel())[1:]
    if n == 0 or sizes.max() < MIN_OBJECT_PIXELS:
        return result
    mask = components == (1 + int(np.argmax(sizes)))
    # Blurred edges mix object and background colours; the interior votes when there is one.
    interior = ndi.binary_erosion(mask)
    votes = lab[interior] if interior.sum() >= 4 else lab[mask]
    shape, ious = _classify_shape(mask)
    result.update(
        color=COLOR_NAMES[_mode(_nearest_color(votes))],
        shape=shape,
        object_fraction=float(mask.mean()),
        shape_iou={k: round(v, 3) for k, v in ious.items()},
    )
    return result


def score_image(image, prompt: str) -> dict:
    """Classifies `image` and compares it with `prompt`: the classify_image fields plus target_color,
    target_shape, target_background and color_ok, shape_ok, background_ok (bools)."""
    color, shape, background = parse_prompt(prompt)
    out = classify_image(image)
    out.update(
        prompt=prompt,
        target_color=color,
        target_shape=shape,
        target_background=background,
        color_ok=out["color"] == color,
        shape_ok=out["shape"] == shape,
        background_ok=out["background"] == background,
    )
    return out


def _accuracies(results: list[dict]) -> dict:
    n = len(results)
    acc = lambda key: (sum(r[key] for r in results) / n) if n else None
    all_ok = [r["color_ok"] and r["shape_ok"] and r["background_ok"] for r in results]
    return dict(
        num_images=n,
        color_accuracy=acc("color_ok"),
        shape_accuracy=acc("shape_ok"),
        background_accuracy=acc("background_ok"),
        all_accuracy=(sum(all_ok) / n) if n else None,
    )


def score_dir(workdir: str, holdout=None) -> dict:
    """Scores every image listed in workdir/**/samples.jsonl. Returns the summary: the accuracies, the
    per-image results ("images"), unusable entries ("skipped": [{"where", "why"}]) and, when `holdout`
    (a data.shapes_holdout string or a set of (colour, shape, background)) is given, "held_out" and
    "seen" accuracies."""
    jsonls = sorted(glob.glob(os.path.join(workdir, "**", "samples.jsonl"), recursive=True))
    if not jsonls:
        raise FileNotFoundError(
            f"no samples.jsonl under {workdir}; run sample.py with --workdir inside it first"
        )
    held = shapes.parse_holdout(holdout) if isinstance(holdout, str) or holdout is None else set(holdout)
    results, skipped = [], []
    for path in jsonls:
        with open(path) as f:
            lines = f.readlines()
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                entry = json.loads(line)
                file = os.path.join(os.path.dirname(path), entry["file"])
                with Image.open(file) as img:
                    r = score_image(img.convert("RGB"), entry["prompt"])
            except (json.JSONDecodeError, KeyError, OSError, ValueError) as e:
                # Bad entries are counted and reported, never fatal (STYLE.md).
                skipped.append(dict(where=where, why=f"{type(e).__name__}: {e}"))
                continue
            r.update(file=os.path.relpath(file, workdir), where=where)
            r["held_out"] = (r["target_color"], r["target_shape"], r["target_background"]) in held
            results.append(r)
    summary = dict(_accuracies(results), skipped=skipped, images=results)
    if held:
        summary["held_out"] = _accuracies([r for r in results if r["held_out"]])
        summary["seen"] = _accuracies([r for r in results if not r["held_out"]])
    return summary


def _fmt(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_jax.eval.shapes", description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="folder searched recursively for samples.jsonl")
    parser.add_argument("--holdout", default="", help='data.shapes_holdout, e.g. "red circle blue,..."')
    parser.add_argument("--out", default=None, help="summary JSON path (default WORKDIR/eval_shapes.json)")
    args = parser.parse_args(argv)
    try:
        summary = score_dir(args.workdir, holdout=args.holdout)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in summary["images"]:
        marks = "".join("+" if r[k] else "-" for k in ("color_ok", "shape_ok", "background_ok"))
        print(f"[{marks}] {r['file']}: {r['prompt']!r} -> {r['color']} {r['shape']} on {r['background']}"
              + (" (held out)" if r["held_out"] else ""))
    for s in summary["skipped"]:
        print(f"skipped {s['where']}: {s['why']}")
    groups = [("all", summary)] + [(k, summary[k]) for k in ("held_out", "seen") if k in summary]
    for name, g in groups:
        print(f"{name}: {g['num_images']} images, colour {_fmt(g['color_accuracy'])}, shape "
              f"{_fmt(g['shape_accuracy'])}, background {_fmt(g['background_accuracy'])}, "
              f"all three {_fmt(g['all_accuracy'])}")
    out = args.out or os.path.join(args.workdir, "eval_shapes.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"summary written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
