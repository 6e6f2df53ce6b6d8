"""`shapes`: the embedded, procedural, captioned dataset (no files, fully deterministic).

Example i is "a <color> <shape> on a <background> background", drawn at a random position and scale on
an image of random aspect ratio and original size (long side log-uniform in [min_side, max_side], so
small images that must be upscaled occur, which is what size conditioning is for).

Evaluation (issue 9) reuses the vocabulary and the renderer:
    shapes.COLORS  {name: (r, g, b)}      shapes.SHAPES  (names)
    shapes.render(shape, color, background, height, width, center=(0.5, 0.5), size=0.3) -> uint8 (H, W, 3)
    shapes.caption(shape, color, background) -> str
Held-out combinations (config `data.shapes_holdout`, e.g. "red circle blue,yellow square green": colour,
shape, background) never appear in training; `parse_holdout` turns the string into triples.
"""

import math

import numpy as np

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")

# Content is a property of the dataset, not of the training run: the run's seed only orders it.
DATASET_SEED = 20230704


def caption(shape, color, background):
    return f"a {color} {shape} on a {background} background"


def _mask(shape, yy, xx, r):
    ay, ax = np.abs(yy), np.abs(xx)
    if shape == "circle":
        return yy * yy + xx * xx <= r * r
    if shape == "square":
        return np.maximum(ay, ax) <= r * 0.85
    if shape == "diamond":
        return ay + ax <= r
    if shape == "triangle":  # apex up, base at +r/2 below the centre
        return (yy <= r * 0.5) & (yy >= -r) & (ax <= (yy + r) / math.sqrt(3))
    if shape == "cross":
        t = r / 3
        return ((ax <= t) & (ay <= r)) | ((ay <= t) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(shape, color, background, height, width, center=(0.5, 0.5), size=0.3):
    """uint8 (height, width, 3): `shape` of radius size*min(h, w) centred at center (fractions of h, w)."""
    for name in (color, background):
        if name not in COLORS:
            raise ValueError(f"unknown colour {name!r}; known: {sorted(COLORS)}")
    yy = np.arange(height, dtype=np.float32)[:, None] + 0.5 - center[0] * height
    xx = np.arange(width, dtype=np.float32)[None, :] + 0.5 - center[1] * width
    mask = _mask(shape, yy, xx, size * min(height, width))
    out = np.empty((height, width, 3), np.uint8)
    out[...] = np.array(COLORS[background], np.uint8)
    out[mask] = np.array(COLORS[color], np.uint8)
    return out


def parse_holdout(spec):
    """Parses e.g. "red circle blue,yellow square green" into a frozenset of (color, shape, background)."""
    out = set()
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        words = part.split()
        if len(words) != 3 or words[0] not in COLORS or words[1] not in SHAPES or words[2] not in COLORS:
            raise ValueError(
                f"bad data.shapes_holdout entry {part!r}: expected 'colour shape background' with colours "
                f"from {sorted(COLORS)} and shapes from {SHAPES}"
            )
        out.add(tuple(words))
    return frozenset(out)


def example_params(index, *, min_side, max_side, holdout=frozenset()):
    """The deterministic description of example `index` (a dict, everything `render` needs)."""
    rng = np.random.default_rng([DATASET_SEED, index])
    names = list(COLORS)
    while True:  # rejection keeps held-out triples out while staying a pure function of the index
        color = names[rng.integers(len(names))]
        background = names[rng.integers(len(names))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if color != background and (color, shape, background) not in holdout:
            break
    long_side = math.exp(rng.uniform(math.log(min_side), math.log(max_side)))
    aspect = math.exp(rng.uniform(-math.log(2.5), math.log(2.5)))  # w / h
    if aspect >= 1:
        height, width = long_side / aspect, long_side
    else:
        height, width = long_side, long_side * aspect
    size = float(rng.uniform(0.15, 0.4))
    # Keep the shape inside the frame: its extent is `size` of the short side.
    margin_y = size * min(height, width) / height
    margin_x = size * min(height, width) / width
    center = (float(rng.uniform(margin_y, 1 - margin_y)), float(rng.uniform(margin_x, 1 - margin_x)))
    return dict(
        shape=shape,
        color=color,
        background=background,
        height=max(8, int(round(height))),
        width=max(8, int(round(width))),
        center=center,
        size=size,
    )


class ShapesSource:
    """Random-access source of `num_examples` shapes examples (see sources.py for the interface)."""

    def __init__(self, num_examples, *, min_side=64, max_side=512, holdout=""):
        if num_examples <= 0:
            raise ValueError(f"data.shapes_num_examples must be positive, got {num_examples}")
        self.num_examples = int(num_examples)
        self.min_side, self.max_side = int(min_side), int(max_side)
        self.holdout = parse_holdout(holdout) if isinstance(holdout, str) else frozenset(holdout)

    def __len__(self):
        return self.num_examples

    def params(self, index):
        return example_params(index, min_side=self.min_side, max_side=self.max_side, holdout=self.holdout)

    def probe(self, index):
        p = self.params(index)
        return dict(size=(p["height"], p["width"]), caption=caption(p["shape"], p["color"], p["background"]))

    def load(self, index):
        p = self.params(index)
        image = render(
            p["shape"], p["color"], p["background"], p["height"], p["width"], p["center"], p["size"]
        )
        return dict(image=image, caption=caption(p["shape"], p["color"], p["background"]))
