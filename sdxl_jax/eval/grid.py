"""A labelled contact sheet of a sample.py output folder.

    python -m sdxl_jax.eval.grid SAMPLES_DIR [--out FILE] [--cols 8] [--cell 128]

reads SAMPLES_DIR/samples.jsonl and writes one PNG (default SAMPLES_DIR/grid.png): every image, scaled to
a `cell`-pixel square with nearest-neighbour (small samples stay crisp), under its prompt. When
SAMPLES_DIR/eval_shapes.json exists (python -m sdxl_jax.eval.shapes SAMPLES_DIR) each label also shows
what the classifier saw, green when colour, shape and background all match, red otherwise, and "*"
marks prompts held out from training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

LABEL_LINES = 3
LINE_HEIGHT = 12
OK, BAD, TEXT = (20, 140, 40), (200, 30, 30), (20, 20, 20)


def _short(prompt: str) -> str:
    # "a red circle on a blue background" -> "red circle / blue": fits a small cell.
    words = prompt.replace(" background", "").split()
    words = [w for w in words if w not in ("a", "an", "on")]
    return f"{' '.join(words[:-1])} / {words[-1]}" if len(words) >= 2 else prompt


def _read_index(samples_dir: str) -> list[dict]:
    path = os.path.join(samples_dir, "samples.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; run sample.py --outdir={samples_dir} first")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_scores(samples_dir: str) -> dict[str, dict]:
    path = os.path.join(samples_dir, "eval_shapes.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        summary = json.load(f)
    # eval.shapes stores files relative to the folder it scored, which is samples_dir here.
    return {r["file"]: r for r in summary.get("images", [])}


def make_grid(samples_dir: str, cols: int = 8, cell: int = 128) -> Image.Image:
    """The labelled sheet as a PIL image (see the module docstring)."""
    entries = _read_index(samples_dir)
    if not entries:
        raise ValueError(f"{samples_dir}/samples.jsonl lists no images")
    scores = _read_scores(samples_dir)
    cols = max(1, min(cols, len(entries)))
    rows = math.ceil(len(entries) / cols)
    label_h = LABEL_LINES * LINE_HEIGHT + 4
    sheet = Image.new("RGB", (cols * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, entry in enumerate(entries):
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        with Image.open(os.path.join(samples_dir, entry["file"])) as img:
            img = img.convert("RGB")
            scale = cell / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            sheet.paste(img.resize(size, Image.Resampling.NEAREST), (x + (cell - size[0]) // 2, y))
        score = scores.get(entry["file"])
        lines = [(_short(entry["prompt"]), TEXT), (f"seed {entry.get('seed', '?')}", TEXT)]
        if score is not None:
            held = "*" if score.get("held_out") else ""
            lines[1] = (f"seed {entry.get('seed', '?')} {held}", TEXT)
            ok = score["color_ok"] and score["shape_ok"] and score["background_ok"]
            seen = f"{score['color']} {score['shape']} / {score['background']}"
            lines.append((f"-> {seen}", OK if ok else BAD))
        for j, (text, color) in enumerate(lines):
            draw.text((x + 3, y + cell + 2 + j * LINE_HEIGHT), text, fill=color, font=font)
    return sheet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxl_jax.eval.grid", description=__doc__.split("\n")[0])
    parser.add_argument("samples_dir", help="a sample.py --outdir folder (holds samples.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default SAMPLES_DIR/grid.png)")
    parser.add_argument("--cols", type=int, default=8)
    parser.add_argument("--cell", type=int, default=128, help="pixels per image in the sheet")
    args = parser.parse_args(argv)
    try:
        sheet = make_grid(args.samples_dir, args.cols, args.cell)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.samples_dir, "grid.png")
    sheet.save(out)
    print(f"wrote {out} ({sheet.width}x{sheet.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
