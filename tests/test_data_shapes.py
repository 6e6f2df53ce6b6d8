"""sdxl_jax.data.shapes: the embedded dataset's vocabulary, renderer, determinism and held-out combos."""

import numpy as np
import pytest

from sdxl_jax.data import shapes


def test_render_draws_the_shape_in_its_colour_on_the_background():
    img = shapes.render("circle", "red", "blue", 64, 96, center=(0.5, 0.5), size=0.3)
    assert img.shape == (64, 96, 3) and img.dtype == np.uint8
    assert tuple(img[32, 48]) == shapes.COLORS["red"]
    assert tuple(img[2, 2]) == shapes.COLORS["blue"]
    area = np.mean(np.all(img == shapes.COLORS["red"], axis=-1)) * 64 * 96
    assert abs(area - np.pi * (0.3 * 64) ** 2) / area < 0.05
    masks = {s: np.all(shapes.render(s, "white", "black", 64, 64) == 245, -1) for s in shapes.SHAPES}
    assert len({m.tobytes() for m in masks.values()}) == len(shapes.SHAPES)  # every shape is distinct
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.render("circle", "mauve", "blue", 8, 8)


def test_examples_are_deterministic_varied_and_captioned():
    src = shapes.ShapesSource(300, min_side=32, max_side=512)
    a, b = src.load(7), src.load(7)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    params = [src.params(i) for i in range(300)]
    assert {p["shape"] for p in params} == set(shapes.SHAPES)
    assert len({p["color"] for p in params}) == len(shapes.COLORS)
    sizes = np.array([(p["height"], p["width"]) for p in params])
    assert sizes.max() > 300 and sizes.min() < 48  # large and small originals
    aspect = sizes[:, 0] / sizes[:, 1]
    assert aspect.min() < 0.6 and aspect.max() > 1.7
    assert all(p["color"] != p["background"] for p in params)
    p = params[3]
    assert src.load(3)["caption"] == f"a {p['color']} {p['shape']} on a {p['background']} background"
    assert src.probe(3)["size"] == (p["height"], p["width"]) == src.load(3)["image"].shape[:2]


def test_holdout_combinations_never_appear():
    held = "red circle blue, yellow square green"
    src = shapes.ShapesSource(2000, holdout=held)
    seen = {(p["color"], p["shape"], p["background"]) for p in map(src.params, range(2000))}
    assert not seen & shapes.parse_holdout(held)
    free = shapes.ShapesSource(2000)
    assert ("red", "circle", "blue") in {
        (p["color"], p["shape"], p["background"]) for p in map(free.params, range(2000))
    }
    with pytest.raises(ValueError, match="shapes_holdout"):
        shapes.parse_holdout("red blob blue")
