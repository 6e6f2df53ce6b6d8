"""The labelled sample grid: layout, labels from the eval summary, and the command line."""

import json

import numpy as np
from PIL import Image

from sdxl_jax.data import shapes
from sdxl_jax.eval import grid
from sdxl_jax.eval import shapes as ev


def _samples(tmp_path, n=5):
    lines = []
    for i in range(n):
        img = shapes.render(shapes.SHAPES[i % 5], "red", "blue", 64, 64, size=0.3)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        prompt = shapes.caption(shapes.SHAPES[i % 5], "red", "blue")
        lines.append(dict(prompt=prompt, file=f"{i}.png", seed=i))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_grid_layout_and_labels(tmp_path):
    _samples(tmp_path)
    plain = np.asarray(grid.make_grid(str(tmp_path), cols=2, cell=32))
    label_h = grid.LABEL_LINES * grid.LINE_HEIGHT + 4
    assert plain.shape == (3 * (32 + label_h), 2 * 32, 3)
    # Nearest-neighbour scaling keeps the exact palette: the first cell's corner is the blue background.
    assert tuple(plain[0, 0]) == shapes.COLORS["blue"]
    assert ev.main([str(tmp_path), "--holdout", "red circle blue"]) == 0
    scored = np.asarray(grid.make_grid(str(tmp_path), cols=2, cell=32))
    # With eval_shapes.json the third label line shows the verdict, green for a full match.
    third = scored[32 + 2 + 2 * grid.LINE_HEIGHT: 32 + label_h, :32]
    assert (np.abs(third.astype(int) - grid.OK).sum(-1) < 30).any()
    assert not (np.abs(third.astype(int) - grid.BAD).sum(-1) < 30).any()


def test_command_line(tmp_path, capsys):
    _samples(tmp_path, n=3)
    assert grid.main([str(tmp_path)]) == 0
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (3 * 128, 128 + grid.LABEL_LINES * grid.LINE_HEIGHT + 4)
    assert grid.main([str(tmp_path / "nothing")]) == 2
    assert "run sample.py" in capsys.readouterr().err
