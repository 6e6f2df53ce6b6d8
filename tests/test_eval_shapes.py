"""The shapes-sample scorer on rendered ground truth (various sizes, aspects, positions, with mild blur
and noise like decoded samples), on wrong prompts, and end to end through the command line."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdxl_jax.data import shapes
from sdxl_jax.eval import shapes as ev


def degraded(params, rng):
    img = shapes.render(params["shape"], params["color"], params["background"], params["height"],
                        params["width"], params["center"], params["size"])
    img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.8)), np.float32)
    return np.clip(img + rng.normal(0.0, 6.0, img.shape), 0, 255).astype(np.uint8)


def ground_truth(n, seed=0):
    """n examples with every shape and colour, short side 48-256 px, aspect 1/2.5-2.5."""
    rng = np.random.default_rng(seed)
    names = list(shapes.COLORS)
    out = []
    for i in range(n):
        color = names[i % len(names)]
        background = names[(i // len(names) + 1 + i) % len(names)]
        if background == color:
            background = names[(names.index(color) + 3) % len(names)]
        short = int(rng.integers(48, 257))
        aspect = math.exp(rng.uniform(-math.log(2.5), math.log(2.5)))
        h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
        size = float(rng.uniform(0.15, 0.4))
        my, mx = size * min(h, w) / h, size * min(h, w) / w
        out.append(dict(shape=shapes.SHAPES[i % len(shapes.SHAPES)], color=color, background=background,
                        height=h, width=w, size=size,
                        center=(float(rng.uniform(my, 1 - my)), float(rng.uniform(mx, 1 - mx)))))
    return out, rng


def test_accuracy_on_rendered_ground_truth():
    examples, rng = ground_truth(80)
    results = [ev.score_image(degraded(p, rng), shapes.caption(p["shape"], p["color"], p["background"]))
               for p in examples]
    acc = {k: np.mean([r[k] for r in results]) for k in ("color_ok", "shape_ok", "background_ok")}
    assert acc["color_ok"] == 1.0 and acc["background_ok"] == 1.0, acc
    misses = [(r["target_shape"], r["shape"]) for r in results if not r["shape_ok"]]
    assert acc["shape_ok"] >= 0.95, (acc, misses)


def test_wrong_prompt_scores_wrong():
    rng = np.random.default_rng(1)
    img = degraded(dict(shape="triangle", color="orange", background="purple", height=96, width=160,
                        center=(0.5, 0.3), size=0.35), rng)
    right = ev.score_image(img, "a orange triangle on a purple background")
    assert right["color_ok"] and right["shape_ok"] and right["background_ok"]
    wrong = ev.score_image(img, "a red circle on a yellow background")
    assert not (wrong["color_ok"] or wrong["shape_ok"] or wrong["background_ok"])
    assert (wrong["color"], wrong["shape"], wrong["background"]) == ("orange", "triangle", "purple")


def test_blank_image_has_no_object():
    noisy = np.random.default_rng(3).normal(15.0, 6.0, (64, 64, 3))
    for img in (np.full((64, 64, 3), 15, np.uint8), np.clip(noisy, 0, 255).astype(np.uint8)):
        r = ev.score_image(img, "a white square on a black background")
        assert r["background_ok"] and r["color"] is None and not r["color_ok"] and not r["shape_ok"]


def test_parse_prompt():
    assert ev.parse_prompt("A Yellow cross on a green background") == ("yellow", "cross", "green")
    with pytest.raises(ValueError, match="not a shapes caption"):
        ev.parse_prompt("a photo of a cat")


def test_command_line_scores_workdir(tmp_path, capsys):
    rng = np.random.default_rng(2)
    entries = [("circle", "red", "blue"), ("square", "yellow", "green"), ("diamond", "white", "black")]
    sub = tmp_path / "stage4" / "samples"
    os.makedirs(sub)
    lines = []
    for i, (shape, color, bg) in enumerate(entries):
        img = degraded(dict(shape=shape, color=color, background=bg, height=64, width=96,
                            center=(0.5, 0.5), size=0.3), rng)
        Image.fromarray(img).save(sub / f"{i}.png")
        lines.append(dict(prompt=shapes.caption(shape, color, bg), file=f"{i}.png", seed=i))
    lines.append(dict(prompt="a red circle on a blue background", file="missing.png"))
    lines.append(dict(prompt="a dog", file="0.png"))
    (sub / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")

    out = tmp_path / "summary.json"
    assert ev.main([str(tmp_path), "--holdout", "red circle blue", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["num_images"] == 3 and len(summary["skipped"]) == 3
    assert summary["color_accuracy"] == summary["shape_accuracy"] == summary["background_accuracy"] == 1.0
    assert summary["held_out"]["num_images"] == 1 and summary["seen"]["num_images"] == 2
    printed = capsys.readouterr().out
    assert "colour 100.0%" in printed and "(held out)" in printed
    assert ev.main([str(tmp_path / "empty")]) == 2
