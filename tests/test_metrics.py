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


# --------------------------------------------------------------------------- remote workdir (gs://, faked)


def _remote_lines(fs, name):
    return [json.loads(line) for line in fs.objects()[name].decode().splitlines()]


def test_remote_jsonl_keeps_earlier_lines_and_uploads_without_waiting_for_close(fake_gcs, monkeypatch):
    """On GCS, open(mode="a") overwrites (gcsfs) and an object appears only at close: a resumed run must
    keep the earlier lines, and lines must reach the bucket while the run goes on, not only at exit."""
    clock = [1000.0]
    monkeypatch.setattr(metrics_lib.time, "monotonic", lambda: clock[0])
    name = "gs://bucket/run/metrics.jsonl"
    for run, steps in enumerate(((1, 2, 3), (4, 5))):  # a preempted run, then its resumption
        writer = metrics_lib.MetricWriter("gs://bucket/run", 10, tensorboard=False, upload_every=30)
        writer.write(steps[0], {"loss": 1.0})
        # The first line is uploaded at once (with what the object held before).
        assert [r["step"] for r in _remote_lines(fake_gcs, name)] == [1, 2, 3][: 3 * run] + [steps[0]]
        for step in steps[1:]:
            clock[0] += 10  # within upload_every of the last upload: kept for the next one
            writer.write(step, {"loss": 1.0})
        assert [r["step"] for r in _remote_lines(fake_gcs, name)][-1] == steps[0]
        writer.scalars(steps[-1], {"psnr": 30.0}, jsonl="eval.jsonl")
        writer.close()
    assert [r["step"] for r in _remote_lines(fake_gcs, name)] == [1, 2, 3, 4, 5]
    assert _remote_lines(fake_gcs, "gs://bucket/run/eval.jsonl") == [
        {"step": 3, "psnr": 30.0}, {"step": 5, "psnr": 30.0}]
    assert fake_gcs.appends_overwritten == 0


def test_remote_jsonl_uploads_again_after_upload_every(fake_gcs, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(metrics_lib.time, "monotonic", lambda: clock[0])
    log = metrics_lib.JsonLines("gs://bucket/a.jsonl", upload_every=30)
    for t, line in ((0, "1\n"), (20, "2\n"), (31, "3\n"), (40, "4\n")):
        clock[0] = t
        log.write(line)
    assert fake_gcs.objects()["gs://bucket/a.jsonl"] == b"1\n2\n3\n"
    log.close()
    assert fake_gcs.objects()["gs://bucket/a.jsonl"] == b"1\n2\n3\n4\n"


class _EventFile:
    opened = []

    def __init__(self, logdir, filename_suffix=""):
        self.logdir, self.suffix, self.events, self.closed = logdir, filename_suffix, [], False
        _EventFile.opened.append(self)

    def add_scalar(self, key, value, step):
        self.events.append(("scalar", key, step))

    def add_images(self, key, images, step, dataformats):
        self.events.append(("images", key, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def _event_files(workdir, monkeypatch, tmp_path):
    import tensorboardX

    _EventFile.opened = []
    monkeypatch.setattr(tensorboardX, "SummaryWriter", _EventFile)
    writer = metrics_lib.MetricWriter(workdir, 10, tb_rotate_every=3)
    for step in range(1, 6):
        writer.write(step, {"loss": 1.0})
    writer.images("samples", np.zeros((1, 8, 8, 3), np.uint8), 5)
    writer.write(6, {"loss": 1.0})
    writer.close()
    return _EventFile.opened


def test_remote_tensorboard_starts_a_new_event_file_after_images_and_every_n_flushes(
    fake_gcs, monkeypatch, tmp_path
):
    """tensorboardX's GCS writer uploads the whole event file at every flush: without new files, each
    preview's images would be uploaded again at every later log step."""
    files = _event_files("gs://bucket/run", monkeypatch, tmp_path)
    assert [[e[2] for e in f.events] for f in files] == [[1, 2, 3], [4, 5, 5], [6]]
    assert [f.suffix for f in files] == [".1", ".2", ".3"]
    assert {f.logdir for f in files} == {"gs://bucket/run/tensorboard"}
    assert all(f.closed for f in files)


def test_local_tensorboard_keeps_one_event_file(monkeypatch, tmp_path):
    files = _event_files(str(tmp_path), monkeypatch, tmp_path)
    assert len(files) == 1 and len(files[0].events) == 7


def test_compiled_stats_reports_the_compilers_own_peak_where_there_is_one():
    """TPU reports peak_memory_in_bytes, which can be well under args + out + temp - alias (session 7:
    14.67 GiB of allocations against 15.84 GiB); the CPU reports 0, and then nothing is added."""
    import types

    def compiled(peak):
        mem = types.SimpleNamespace(argument_size_in_bytes=10, output_size_in_bytes=4, temp_size_in_bytes=7,
                                    alias_size_in_bytes=4, generated_code_size_in_bytes=1,
                                    peak_memory_in_bytes=peak)  # fmt: skip
        return types.SimpleNamespace(cost_analysis=lambda: {"flops": 3.0}, memory_analysis=lambda: mem)

    stats = metrics_lib.compiled_stats(compiled(15))
    assert stats["peak_bytes"] == 17 and stats["compiler_peak_bytes"] == 15 and stats["flops"] == 3.0
    assert "compiler's peak 0.000 GiB" in metrics_lib.format_stats("step", stats)
    assert "compiler_peak_bytes" not in metrics_lib.compiled_stats(compiled(0))
