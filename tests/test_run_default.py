"""run_default.sh, the README's main job: its held-out combinations match the training config, and (slow)
the whole chain runs end to end with every stage cut to a few steps (SMOKE=1)."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import shapes as shapes_config
from sdxl_jax.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "run_default.sh")


def _script():
    with open(SCRIPT) as f:
        return f.read()


def test_holdout_matches_the_training_config():
    found = re.findall(r'^HOLDOUT="([^"]*)"', _script(), re.M)
    assert found == [shapes_config.HOLDOUT]
    held = shapes.parse_holdout(shapes_config.HOLDOUT)
    for variant in shapes_config.VARIANTS:
        assert shapes_config.get_config(variant).data.shapes_holdout == shapes_config.HOLDOUT
    # Every colour is tested as object and as background, every shape at least once.
    assert {c for c, _, _ in held} == {b for _, _, b in held} == set(shapes.COLORS)
    assert {s for _, s, _ in held} == set(shapes.SHAPES)


def test_training_never_shows_a_held_out_combination():
    c = shapes_config.get_config()
    src = shapes.ShapesSource(2000, min_side=c.data.shapes_min_side, max_side=c.data.shapes_max_side,
                              holdout=c.data.shapes_holdout)
    held = shapes.parse_holdout(shapes_config.HOLDOUT)
    seen = {(p["color"], p["shape"], p["background"]) for p in map(src.params, range(len(src)))}
    assert not seen & held and len(seen) > 200  # nearly all of the 280 allowed triples occur


def test_script_is_valid_bash_and_names_each_stage():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    text = _script()
    for needle in ("configs/autoencoder.py", "configs/shapes.py", "sample.py", "sdxl_jax.eval.shapes",
                   "sdxl_jax.eval.grid", "--config.init_from", "--config.vae_from",
                   "sdxl_jax.data.prepare --encode", "--config.data.path="):
        assert needle in text


@pytest.mark.slow
def test_smoke_chain_end_to_end(tmp_path):
    """Minutes on 2 CPU cores (compilation dominates): every stage for a few steps, then sampling,
    scoring and the grid. Accuracy is not checked here: a 4-step model draws noise."""
    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run has
    out = subprocess.run(["bash", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "+ " + sys.executable + " sample.py" in out.stdout  # each command is printed before it runs
    with open(tmp_path / "samples" / "samples.jsonl") as f:
        entries = [json.loads(line) for line in f]
    assert len(entries) == 2 * len(shapes.parse_holdout(shapes_config.HOLDOUT))
    summary = json.loads((tmp_path / "samples" / "eval_shapes.json").read_text())
    assert summary["held_out"]["num_images"] == len(entries) // 2 and not summary["skipped"]
    assert (tmp_path / "samples" / "grid.png").exists()
