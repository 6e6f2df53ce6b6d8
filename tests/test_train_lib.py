"""The training loop on the stage-1 smoke config (tiny models, shapes data) on the 8 fake CPU devices.

Exact resume after a crash, SIGTERM saves, stage 2 starts from stage 1's workdir, an 8-device
data x fsdp mesh matches one device, bad configs fail before anything compiles. Every run here shares one
compiled program (same config, same mesh) through the persistent compilation cache of the session.
"""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from configs import stage1_256, stage2_512
from sdxl_jax import checkpoint, config_lib, parallel, train_lib, train_state
from sdxl_jax.models import layers
from sdxl_jax.models import unet as unet_lib


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def _config(cache_dir, **kw):
    c = stage1_256.get_config("smoke")
    c.mesh.update(data=2, fsdp=4)
    c.compilation_cache_dir = cache_dir
    c.sample_every = 1000  # previews are exercised by tests/test_train_smoke.py
    c.update(kw)
    return c


def _records(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec  # a resumed run rewrites the steps after its checkpoint
    return out


def _losses(workdir):
    return {step: rec["loss"] for step, rec in _records(workdir).items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
    workdir = str(tmp_path_factory.mktemp("full"))
    # it also traces its second and third steps (config.profile; the same program and losses)
    train_lib.train_and_evaluate(_config(cache_dir, profile=dict(steps=2, skip=1)), workdir)
    return workdir


class _Crash(Exception):
    pass


def test_uninterrupted_run_logs_every_step_and_checkpoints(full_run):
    losses = _losses(full_run)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(v) for v in losses.values())
    assert sorted(checkpoint.Checkpointer(full_run, keep=2).steps()) == [2, 4]
    for step in (2, 4):  # the data position of the steps run: a loop that fetched ahead must not save its own
        with open(os.path.join(full_run, "data_state", f"{step}.p0.json")) as f:
            assert json.load(f)["step"] == step
    assert os.path.exists(os.path.join(full_run, "config.json"))
    rec = json.loads(open(os.path.join(full_run, "metrics.jsonl")).readline())
    assert {"grad_norm", "lr", "skipped_nonfinite", "compile_seconds"} <= set(rec)


def test_the_run_traced_the_steps_config_profile_names(full_run):
    from sdxl_jax import profiling

    (path,) = profiling.trace_files(os.path.join(full_run, "profile"))
    assert os.path.dirname(path) == os.path.join(full_run, "profile", "plugins", "profile", "step_1")
    assert os.path.basename(path).endswith("_p0.xplane.pb")
    device, events = profiling.op_events(path, "step_fn")
    assert device == "/host:CPU device 0"
    counts = [n for _, n in profiling.summarize(events, 2)["per_op"].values()]
    # two steps: each op outside a loop twice, a loop's ops a multiple of two times
    assert len(counts) > 100 and min(counts) == 2 and all(n % 2 == 0 for n in counts)


def test_killed_after_step_3_and_restarted_reproduces_the_losses_exactly(full_run, cache_dir, tmp_path):
    workdir = str(tmp_path)

    def crash(step, state):
        if step == 3:  # after the checkpoint at step 2, before the one at 4: step 3 is lost
            raise _Crash

    with pytest.raises(_Crash):
        train_lib.train_and_evaluate(_config(cache_dir), workdir, after_step=crash)
    assert checkpoint.Checkpointer(workdir, keep=2).steps() == [2]
    train_lib.train_and_evaluate(_config(cache_dir), workdir)
    expected, got = _losses(full_run), _losses(workdir)
    assert [got[s] for s in (3, 4)] == [expected[s] for s in (3, 4)]  # bit-exact, not approximately
    # and the final weights are the same
    a, _ = checkpoint.restore_params(full_run, "params")
    b, _ = checkpoint.restore_params(workdir, "params")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_and_stops(cache_dir, tmp_path, full_run):
    workdir = str(tmp_path)

    def preempt(step, state):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    train_lib.train_and_evaluate(_config(cache_dir), workdir, after_step=preempt)
    # The flag is seen after step 2 (the signal arrives after step 1's checks): step 2 is saved, 3-4 not run.
    assert checkpoint.Checkpointer(workdir, keep=2).steps() == [2]
    assert _losses(workdir) == {s: v for s, v in _losses(full_run).items() if s <= 2}


def test_eight_device_data_fsdp_mesh_matches_one_device(full_run, cache_dir, tmp_path):
    # Same seed and data; the sharded program reduces in another order, so fp32 rounding differs.
    # Losses and gradient norms of all 4 steps (the last two after Adam updates): 1e-5 relative (observed
    # ~1e-7). Raw params are not compared: a few have an exactly-zero true gradient (e.g. the conv biases
    # just before a one-channel-per-group GroupNorm, which removes them), and Adam's m / sqrt(v) turns the
    # rounding noise in such a gradient into a +-lr move, so they differ by ~lr without affecting the loss.
    workdir = str(tmp_path)
    c = _config(cache_dir)
    c.mesh.update(data=1, fsdp=1)
    train_lib.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
    one, eight = _records(workdir), _records(full_run)
    assert sorted(one) == sorted(eight) == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([one[s][key] for s in one], [eight[s][key] for s in one], rtol=1e-5)


def test_a_workdir_resumes_in_the_other_block_layout(full_run, cache_dir, tmp_path):
    """An unrolled workdir resumes with model.scan_blocks=True (the checkpoint is converted as it is
    restored), and the scanned checkpoint it writes restores into the unrolled layout, exactly."""
    workdir = str(tmp_path / "w")
    shutil.copytree(full_run, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if killed between checkpoints 2 and 4
    os.remove(os.path.join(workdir, "data_state", "4.p0.json"))
    c = _config(cache_dir)
    c.model.scan_blocks = True
    train_lib.train_and_evaluate(c, workdir)
    # Another program (a loop over the blocks), so not bit for bit: steps 3 and 4 within 1e-5.
    expected, got = _losses(full_run), _losses(workdir)
    np.testing.assert_allclose([got[s] for s in (3, 4)], [expected[s] for s in (3, 4)], rtol=1e-5)

    saved, step = checkpoint.restore_params(workdir, "params")  # as stored: scanned
    assert step == 4 and unet_lib.is_scanned(saved)
    plain = _config(cache_dir)
    unrolled = train_state.make_setup(plain, parallel.make_mesh(plain.mesh))
    params, _ = checkpoint.restore_params(workdir, "params", unrolled.abstract_state.params)
    state, _, step = checkpoint.Checkpointer(workdir, keep=2).restore_latest(unrolled.abstract_state)
    assert step == 4 and not unet_lib.is_scanned((params, state))
    want = unet_lib.relayout(jax.tree.map(np.asarray, saved), False)
    for tree in (params, state.params):
        assert jax.tree.structure(tree) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(x), y)
    for got, abstract in zip(jax.tree.leaves(state), jax.tree.leaves(unrolled.abstract_state), strict=True):
        assert got.shape == abstract.shape and got.sharding == abstract.sharding


def test_a_state_in_other_memory_layouts_trains_checkpoints_and_resumes(full_run, cache_dir, tmp_path,
                                                                       monkeypatch):
    """config.state_layout "compiler" (on GPUs "auto") lets XLA choose the state's memory layouts; XLA:CPU
    would choose row-major, as every other test runs. Here every leaf is forced column-major (XLA:GPU picks
    other orders for the conv kernels): the loop moves the initial and the restored state into those
    layouts, trains, checkpoints, crashes and resumes. The resume is bit-exact against the same layouts run
    through, and close to the row-major run (another program: the kernels read other strides). The preview
    at the last step samples from the EMA params in those layouts."""
    from jax.experimental.layout import Format, Layout

    from sdxl_jax import train_step

    def column_major(setup, config):
        def one(sharding, abstract):
            return Format(Layout(major_to_minor=tuple(reversed(range(abstract.ndim)))), sharding)

        return jax.tree.map(one, setup.state_shardings, setup.abstract_state)

    monkeypatch.setattr(train_step, "state_formats", column_major)
    monkeypatch.setattr(train_lib, "_CACHE", {})  # not the row-major runs' compiled steps
    seen = []

    def check(step, state, crash_at=None):
        kernel = state.params["conv_in"]["kernel"]  # HWIO, 4-D
        seen.append(kernel.format.layout.major_to_minor)
        if step == crash_at:
            raise _Crash

    through, crashed = str(tmp_path / "through"), str(tmp_path / "crashed")
    # with the preview at the last step: the sampler takes the EMA params in those layouts
    train_lib.train_and_evaluate(_config(cache_dir, sample_every=4), through, after_step=check)
    assert os.listdir(os.path.join(through, "samples"))
    with pytest.raises(_Crash):
        train_lib.train_and_evaluate(_config(cache_dir), crashed, after_step=lambda s, st: check(s, st, 3))
    train_lib.train_and_evaluate(_config(cache_dir), crashed, after_step=check)
    assert seen == [(3, 2, 1, 0)] * (4 + 3 + 2)  # every step ran on the column-major state
    assert _losses(crashed) == _losses(through)
    a, _ = checkpoint.restore_params(through, "params")
    b, _ = checkpoint.restore_params(crashed, "params")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    row_major = _losses(full_run)
    np.testing.assert_allclose([_losses(through)[s] for s in row_major], list(row_major.values()), rtol=1e-5)


def test_state_layout_auto_is_the_compilers_on_gpus_only():
    from types import SimpleNamespace

    from sdxl_jax.train_step import compiler_layouts

    def on(platform):
        device = SimpleNamespace(platform=platform)
        return SimpleNamespace(mesh=SimpleNamespace(devices=np.array([device], dtype=object)))

    config = stage1_256.get_config("smoke")
    assert config.state_layout == "auto"
    assert [compiler_layouts(on(p), config) for p in ("gpu", "tpu", "cpu")] == [True, False, False]
    for mode, want in (("compiler", True), ("default", False)):
        config.state_layout = mode
        assert [compiler_layouts(on(p), config) for p in ("gpu", "tpu")] == [want, want]


def test_stage2_starts_from_stage1_params_and_ema_with_a_fresh_optimizer(full_run, cache_dir):
    c2 = stage2_512.get_config("smoke")
    c2.init_from = full_run
    c2.compilation_cache_dir = cache_dir
    setup = train_state.make_setup(
        c2, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    )
    state, frozen = train_lib.initial_state(setup, c2)
    params1, step1 = checkpoint.restore_params(full_run, "params")
    ema1, _ = checkpoint.restore_params(full_run, "ema_params")
    assert step1 == 4 and int(state.step) == 0
    for got, want in ((state.params, params1), (state.ema_params, ema1)):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for leaf in jax.tree.leaves(state.opt_state):
        if np.ndim(leaf) > 0:  # Adam moments start at zero
            assert not np.any(np.asarray(leaf))
    prev_frozen = checkpoint.load_frozen(full_run)
    for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(prev_frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.optim.__setattr__("lr_typo", 1.0), "unknown config key 'optim.lr_typo'"),
        (
            lambda c: c.data.__setattr__("batch_size", 6),
            "batch_size=6 is not divisible by the 8 batch shards",
        ),
        (
            lambda c: c.__setattr__("init_from", "/nonexistent/stage1"),
            "init_from='/nonexistent/stage1' does not",
        ),
    ],
    ids=["unknown_key", "batch_not_divisible", "missing_init_from"],
)
def test_bad_config_fails_before_anything_is_built(cache_dir, tmp_path, monkeypatch, change, message):
    c = _config(cache_dir)
    with c.unlocked():
        change(c)
    monkeypatch.setattr(train_state, "make_setup", lambda *a: pytest.fail("built models for a bad config"))
    with pytest.raises(config_lib.ConfigError, match=message):
        train_lib.train_and_evaluate(c, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_nonfinite_batch_skips_the_update_and_is_counted(full_run, cache_dir):
    c = _config(cache_dir)
    mesh = parallel.make_mesh(c.mesh)
    setup, steps = train_lib._setup_and_steps(c, mesh)  # the full run's compiled step, reused
    state, frozen = train_lib.initial_state(setup, c)
    before = jax.tree.map(np.asarray, (state.params, state.ema_params))
    local = train_state.example_batch(c, 8, 64, 64)
    local["image"][3] = np.nan  # one corrupt image poisons the loss and every gradient
    batch = parallel.global_batch(local, c, mesh)
    state, out = steps.get(batch)(state, frozen, batch)
    assert int(out["nonfinite"]) == 1 and not np.isfinite(float(out["loss"]))
    assert int(state.step) == 1  # the step counts (data moves on), the weights do not change
    for x, y in zip(jax.tree.leaves((state.params, state.ema_params)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)


_RUNTIME_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 21.43GiB."


@pytest.mark.parametrize("error", [_RUNTIME_OOM, "INTERNAL: cuDNN error"], ids=["out_of_memory", "other"])
def test_an_error_while_a_step_runs_says_what_to_change(cache_dir, tmp_path, monkeypatch, error):
    """A GPU allocates a step's buffers when it runs, so errors reach the loop then, not at compile: out
    of memory becomes the memory advice; another error with the platform's vendor attention kernel carries
    the note naming chunked attention ("auto" on a GPU runs cuDNN), and without it passes through as is."""
    from sdxl_jax import train_step

    def compiled(state, frozen, batch):
        monkeypatch.setattr(layers, "target_platform", lambda: "gpu")  # as if the step ran on a GPU
        raise jax.errors.JaxRuntimeError(error)

    # (compile: nothing compiles; get: the loop's steps may be an earlier test's, kept with their setup)
    monkeypatch.setattr(train_step.CompiledSteps, "compile", lambda self, batch: compiled)
    monkeypatch.setattr(train_step.CompiledSteps, "get", lambda self, batch: compiled)
    for attention in ("auto", "chunked"):
        monkeypatch.setattr(layers, "target_platform", lambda: "cpu")
        c = _config(cache_dir)
        c.model.attention = attention
        expected = train_step.DeviceMemoryError if error == _RUNTIME_OOM else jax.errors.JaxRuntimeError
        with pytest.raises(expected) as info:
            train_lib.train_and_evaluate(c, str(tmp_path / attention))
        notes = getattr(info.value, "__notes__", [])
        if expected is train_step.DeviceMemoryError:
            text = str(info.value)  # the smoke config: 8 rows of 64 x 64 over 8 batch shards
            assert "Out of memory while trying to allocate" in text
            assert "a global batch of 8 x image (64, 64) does not fit" in text and "1 rows per batch" in text
        elif attention == "auto":
            (note,) = notes
            assert "'auto': cudnn" in note and "--config.model.attention=chunked" in note
        else:
            assert not notes
