"""sdxl_jax.metrics.MetricWriter: evaluation scalars (scalars) next to the training step's (write)."""

import json

import numpy as np

from sdxl_jax import metrics as metrics_lib


class _Board:
    def __init__(self):
        self.scalars, self.flushes = [], 0

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        pass


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scalars_go_to_their_own_jsonl_and_to_tensorboard_under_the_prefix(tmp_path):
    writer = metrics_lib.MetricWriter(str(tmp_path), 10, tensorboard=False)
    writer._tb = board = _Board()
    writer.scalars(4, {"l1_raw": np.float32(0.25), "psnr_ema": 30.0}, prefix="eval", jsonl="eval.jsonl")
    writer.scalars(8, {"l1_raw": 0.125, "psnr_ema": 31.5}, prefix="eval", jsonl="eval.jsonl")
    writer.write(8, {"loss": 0.5})
    writer.close()
    assert _lines(tmp_path / "eval.jsonl") == [
        {"step": 4, "l1_raw": 0.25, "psnr_ema": 30.0}, {"step": 8, "l1_raw": 0.125, "psnr_ema": 31.5}]
    # The training log keeps only the training step's scalars.
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [8]
    assert board.scalars[:4] == [("eval/l1_raw", 0.25, 4), ("eval/psnr_ema", 30.0, 4),
                                 ("eval/l1_raw", 0.125, 8), ("eval/psnr_ema", 31.5, 8)]
    assert ("loss", 0.5, 8) in board.scalars


def test_scalars_appends_across_writers_and_is_silent_without_a_file(tmp_path):
    """A resumed run opens a new writer: earlier evaluation lines stay; without jsonl only TensorBoard."""
    for step in (1, 2):
        writer = metrics_lib.MetricWriter(str(tmp_path), 10, tensorboard=False)
        writer.scalars(step, {"x": step}, jsonl="eval.jsonl")
        writer.scalars(step, {"y": step})
        writer.close()
    assert _lines(tmp_path / "eval.jsonl") == [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "metrics.jsonl"]
