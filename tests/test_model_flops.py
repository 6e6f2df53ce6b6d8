"""The logged mfu's FLOPs (train_step.model_flops / CompiledSteps.flops) are the model's work whatever the
attention kernel and remat policy: XLA's count of the compiled chunked step counts its scan over key blocks
once, and a remat policy's recomputation is not the model's work.

That count (a second lowering of the step) is taken off the compile path: one background thread counts
while training runs (flops() is None meanwhile: mfu not logged), and a JSON cache in the workdir gives a
restart the counts of the run before it."""

import dataclasses
import json
import threading
import time

import jax
import pytest

from configs import stage1_256
from sdxl_jax import metrics as metrics_lib
from sdxl_jax import parallel, train_state, train_step
from sdxl_jax.data import cache
from sdxl_jax.models import unet as unet_lib
from sdxl_jax.train_step import CompiledSteps


@pytest.fixture
def closing():
    """Closes every CompiledSteps a test made, and checks that no count thread outlives the test."""
    made = []
    yield made.append
    for steps in made:
        steps.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("model_flops")]


def _steps(attention, remat="none", *, devices=1, dtype="float32", scan_blocks=False, **kw):
    config = stage1_256.get_config("smoke")
    config.model.update(attention=attention, remat=remat, dtype=dtype, scan_blocks=scan_blocks)
    config.mesh.update(data=devices, fsdp=1)
    setup = train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:devices]))
    logs = []
    return CompiledSteps(setup, config, log=logs.append, **kw), setup, logs


def _batch(setup, side, batch_size=1):
    m = setup.models
    return cache.example_batch(m.conditioner.config, m.latent_channels, m.downsample, batch_size, side, side)


def test_chunked_step_logs_the_xla_steps_flops(closing):
    chunked, setup, logs = _steps("chunked")
    closing(chunked)
    xla, _, _ = _steps("xla")
    # 768 px: 96 x 96 latents, 2304 tokens at the attention level = five key blocks (XLA unrolls a loop of
    # two, which it then counts in full).
    batch = _batch(setup, 768)
    chunked.compile(batch)  # the model's count runs in the background while the xla step compiles
    xla.compile(batch)
    model = xla.flops(batch)  # the compiled xla step's own count
    assert chunked.wait_for_counts(timeout=120)
    assert chunked.flops(batch) == pytest.approx(model, rel=0.01)
    assert chunked.stats[chunked.key(batch)]["flops"] < 0.9 * model  # what the logged mfu used before
    assert any("mfu: the model's" in line and "in the background" in line for line in logs)


def _against_plain(closing, **change):
    """(compiled count, model count, logs) of a run with `change`, after checking that its logged count
    is exactly that of the plain xla step (no remat, unrolled blocks), both lowered, not compiled."""
    steps, setup, logs = _steps("xla", **change)
    closing(steps)
    plain, plain_setup, _ = _steps("xla")
    batch = _batch(setup, 256)
    steps.compile(batch)
    plain.compile(batch)
    assert steps.wait_for_counts(timeout=120)
    assert steps.flops(batch) == train_step.model_flops(plain_setup, plain.config, batch)
    return steps.stats[steps.key(batch)]["flops"], plain.flops(batch), logs


def test_remat_recomputation_is_not_model_flops(closing):
    compiled, model, logs = _against_plain(closing, remat="full")
    assert compiled > 1.1 * model  # the compiled program does the forward again, block by block
    assert any("remat 'full' adds recomputation" in line for line in logs)


def test_scanned_blocks_count_as_the_unrolled_model(closing, monkeypatch):
    # Two blocks per transformer, so that the scan's loop body (which XLA counts once) is half the blocks.
    tiny = unet_lib.PRESETS["tiny"]
    monkeypatch.setitem(unet_lib.PRESETS, "tiny", dataclasses.replace(tiny, transformer_depth=(0, 2),
                                                                      mid_transformer_depth=2))
    compiled, model, logs = _against_plain(closing, scan_blocks=True)
    assert compiled < 0.95 * model  # the loop counted once
    assert any("scanned transformer blocks' loop body counts once" in line for line in logs)


# The background count and its cache, with a step program that compiles in a second and a fake count:
# remat "full" makes every bucket one whose compiled count is not the model's.


def _identity_step(setup, config):
    return lambda state, frozen, batch: (state, {"loss": batch["latents"].mean()})


class _FakeCount:
    """Stands in for train_step.model_flops: counts its calls; blocks until `release` when `block`."""

    def __init__(self, value=123e12, block=False, error=None):
        self.value, self.error, self.calls = value, error, 0
        self.release, self.started, self.finished = threading.Event(), threading.Event(), threading.Event()
        if not block:
            self.release.set()

    def __call__(self, setup, config, batch):
        self.calls += 1
        self.started.set()
        self.release.wait(timeout=5)  # bounded: the old synchronous code must not hang the test
        self.finished.set()
        if self.error:
            raise self.error
        return self.value


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(train_step, "make_train_step", _identity_step)

    def install(**kw):
        f = _FakeCount(**kw)
        monkeypatch.setattr(train_step, "model_flops", f)
        return f

    return install


def test_compile_returns_before_the_count_finishes(fake, closing):
    count = fake(block=True)
    steps, setup, logs = _steps("chunked", remat="full")
    closing(steps)
    batch = _batch(setup, 64)
    steps.compile(batch)
    assert count.started.wait(timeout=5) and not count.finished.is_set(), "compile waited for the count"
    assert steps.flops(batch) is None  # being counted: mfu not logged (the compiled count is wrong)
    assert not any("mfu: the model's" in line for line in logs)
    count.release.set()
    assert steps.wait_for_counts(timeout=10)
    assert steps.flops(batch) == 123e12 and count.calls == 1
    line = next(line for line in logs if "mfu: the model's 123.000 TFLOPs" in line)
    assert "counted in" in line and "remat 'full' adds recomputation" in line


def test_a_backend_without_a_compiled_count_gets_the_models_count(fake, closing, monkeypatch):
    """XLA:GPU's deviceless compile (and any backend without cost analysis) gives the compiled program no
    FLOPs: the xla / no-remat step, whose compiled count is otherwise used, then takes the model's."""
    count = fake()
    real = metrics_lib.compiled_stats
    monkeypatch.setattr(metrics_lib, "compiled_stats", lambda c: {**real(c), "flops": float("nan")})
    steps, setup, logs = _steps("xla")
    closing(steps)
    batch = _batch(setup, 64)
    steps.compile(batch)
    assert steps.wait_for_counts(timeout=10)
    assert steps.flops(batch) == 123e12 and count.calls == 1  # before: NaN, and no mfu
    assert any("no cost analysis on this backend" in line for line in logs)


def test_only_process_0_counts(fake, closing, monkeypatch, tmp_path):
    """The other hosts log no metrics: they neither count nor read the cache (their CPU feeds data)."""
    count = fake()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    steps, setup, logs = _steps("chunked", remat="full")
    closing(steps)
    steps.cache_path = str(tmp_path / "model_flops.json")
    batch = _batch(setup, 64)
    steps.compile(batch)
    assert steps.wait_for_counts(timeout=10)
    assert count.calls == 0 and steps.flops(batch) is None
    assert not (tmp_path / "model_flops.json").exists()


def test_a_restart_reads_the_count_from_the_cache_file(fake, closing, tmp_path):
    path = str(tmp_path / "model_flops.json")
    count = fake()
    first, setup, _ = _steps("chunked", remat="full", cache_path=path)
    closing(first)
    batch = _batch(setup, 64)
    first.compile(batch)
    assert first.wait_for_counts(timeout=10) and count.calls == 1
    entries = json.loads(open(path).read())["counts"]
    assert [e["flops"] for e in entries.values()] == [123e12]

    logs = []
    restarted = CompiledSteps(setup, first.config, log=logs.append, cache_path=path)
    closing(restarted)
    restarted.compile(batch)
    assert restarted.flops(batch) == 123e12  # at once, not counted again
    assert count.calls == 1
    assert any("read from" in line and path in line for line in logs)


def _count_and_hit(closing, path, batch_size=1):
    """A count into the cache file `path`, and a second run of the same config that reads it from there."""
    steps, setup, _ = _steps("chunked", remat="full", cache_path=path)
    closing(steps)
    batch = _batch(setup, 64, batch_size)
    steps.compile(batch)
    assert steps.wait_for_counts(timeout=10) and train_step.model_flops.calls == 1
    same = CompiledSteps(setup, steps.config, log=lambda line: None, cache_path=path)
    closing(same)
    same.compile(batch)
    assert same.flops(batch) == 123e12 and train_step.model_flops.calls == 1  # the control: a cache hit
    return steps, setup, batch


def _counted(closing, config_change, path, batch_size=1):
    """A count into `path`, then one with `config_change` (kwargs of _steps): (new calls, its flops)."""
    f = train_step.model_flops
    _, _, batch = _count_and_hit(closing, path, batch_size)
    calls = f.calls
    changed, _, _ = _steps(**{"attention": "chunked", "remat": "full", **config_change}, cache_path=path)
    closing(changed)
    changed.compile(batch)
    assert changed.wait_for_counts(timeout=10)
    return f.calls - calls, changed.flops(batch)


@pytest.mark.parametrize("change", [{"dtype": "bfloat16"}, {"devices": 2}])
def test_a_count_changing_config_is_counted_again(fake, tmp_path, change, closing):
    fake()
    assert _counted(closing, change, str(tmp_path / "model_flops.json"), batch_size=2) == (1, 123e12)


def test_remat_and_attention_share_the_count(fake, tmp_path, closing):
    # model_flops lowers the step with xla attention and no remat whatever the config says: same count.
    fake()
    path = str(tmp_path / "model_flops.json")
    assert _counted(closing, {"remat": "dots", "attention": "xla"}, path) == (0, 123e12)
    assert _counted(closing, {"scan_blocks": True}, path) == (0, 123e12)


def test_another_jax_version_is_counted_again(fake, tmp_path, closing, monkeypatch):
    fake()
    path = str(tmp_path / "model_flops.json")
    steps, setup, batch = _count_and_hit(closing, path)
    monkeypatch.setattr(jax, "__version__", "0.0.1")
    again = CompiledSteps(setup, steps.config, log=lambda line: None, cache_path=path)
    closing(again)
    again.compile(batch)
    assert again.wait_for_counts(timeout=10) and train_step.model_flops.calls == 2


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": 1, "counts": 5}'])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(fake, tmp_path, closing, text):
    count = fake()
    path = tmp_path / "model_flops.json"
    path.write_text(text)
    steps, setup, logs = _steps("chunked", remat="full", cache_path=str(path))
    closing(steps)
    batch = _batch(setup, 64)
    steps.compile(batch)
    assert steps.wait_for_counts(timeout=10)
    assert steps.flops(batch) == 123e12 and count.calls == 1
    assert sum("ignoring the model FLOPs cache" in line for line in logs) == 1
    assert [e["flops"] for e in json.loads(path.read_text())["counts"].values()] == [123e12]


def test_a_failed_count_leaves_mfu_unlogged_and_training_unaffected(fake, tmp_path, closing, monkeypatch):
    count = fake(error=RuntimeError("lowering exploded"))
    path = tmp_path / "model_flops.json"
    steps, setup, logs = _steps("chunked", remat="full", cache_path=str(path))
    closing(steps)
    batch = _batch(setup, 64)
    compiled = steps.get(batch)  # the failure stays in the background thread
    assert steps.wait_for_counts(timeout=10)
    assert steps.get(batch) is compiled and count.calls == 1
    assert steps.flops(batch) is None and not path.exists()
    assert sum("lowering exploded" in line for line in logs) == 1
    # What train_lib._log does with it: the step is logged, without mfu (which a chip's peak would give).
    monkeypatch.setattr(metrics_lib, "peak_flops_per_device", lambda: 1e15)
    writer = metrics_lib.MetricWriter(str(tmp_path / "run"), 10, tensorboard=False)
    writer.start(0)
    time.sleep(0.01)
    writer.write(1, {"loss": 0.5}, batch_size=1, flops=steps.flops(batch) or None)
    writer.close()
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert rec["loss"] == 0.5 and "images_per_sec" in rec and "mfu" not in rec
