"""train_step.CompiledSteps.precompile: each distinct batch shape (bucket) compiled exactly once, however
often and in whichever form (host arrays or jax.ShapeDtypeStructs) it is listed; `get` then never compiles
again."""

import collections
import threading

import jax
import pytest

from configs import stage1_256
from sdxl_jax import parallel, train_state, train_step
from sdxl_jax.data import cache

SIDES = [(64, 64), (32, 64), (64, 32)]  # pixels: 8x8, 4x8 and 8x4 latents, three buckets


def _abstract(batch):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def _identity_step(setup, config):
    """A step program that compiles in a second: XLA:CPU takes ~30 s of CPU per shape for the tiny model's
    real step (tests/test_train_lib.py runs that one); what is counted here is which shapes get compiled."""
    return lambda state, frozen, batch: (state, {"loss": batch["latents"].mean()})


def _counted_steps():
    """CompiledSteps on one device (stage1 smoke: tiny models) whose compile calls are counted per shape,
    and a cached-latents batch of each of SIDES."""
    config = stage1_256.get_config("smoke")
    config.mesh.update(data=1, fsdp=1)
    setup = train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
    steps = train_step.CompiledSteps(setup, config, log=lambda line: None)
    calls = collections.Counter()
    compile_one = steps.compile

    def compile_counted(batch):
        calls[steps.key(batch)] += 1
        return compile_one(batch)

    steps.compile = compile_counted  # precompile and get both call self.compile
    m = setup.models
    batches = [
        cache.example_batch(m.conditioner.config, m.latent_channels, m.downsample, 2, h, w) for h, w in SIDES
    ]
    return steps, calls, batches


@pytest.mark.parametrize("program", ["identity", pytest.param("train_step", marks=pytest.mark.slow)])
def test_precompile_compiles_each_shape_once_and_get_reuses_it(program, monkeypatch):
    if program == "identity":
        monkeypatch.setattr(train_step, "make_train_step", _identity_step)
    steps, calls, batches = _counted_steps()
    a, b, c = batches
    # Duplicates, and one shape as arrays and as abstract structs (train_lib passes both kinds).
    steps.precompile([a, _abstract(b), a, c, _abstract(a), b])
    keys = {steps.key(x) for x in batches}
    assert len(keys) == 3
    assert dict(calls) == {k: 1 for k in keys}, "a bucket was compiled twice or skipped"
    assert set(steps.stats) == keys and steps.compile_seconds > 0
    compile_seconds = steps.compile_seconds

    compiled = [steps.get(x) for x in batches]  # host arrays, as the loop passes them
    assert [steps.get(_abstract(x)) for x in batches] == compiled
    steps.precompile(batches)  # nothing left to do
    assert dict(calls) == {k: 1 for k in keys}, "get or a second precompile recompiled a precompiled shape"
    assert set(steps.stats) == keys and steps.compile_seconds == compile_seconds


def test_precompile_leaves_the_model_flops_counts_to_one_background_thread(monkeypatch):
    """Where XLA's count is not the model's (here remat), precompile returns with the buckets compiled but
    not counted: model_flops runs afterwards, one bucket at a time, on one worker thread."""
    monkeypatch.setattr(train_step, "make_train_step", _identity_step)
    release, lock, threads = threading.Event(), threading.Lock(), set()
    running, most, finished = [0], [0], [0]

    def slow_count(setup, config, batch):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            threads.add(threading.current_thread().name)
        release.wait(timeout=5)  # bounded: the old synchronous code must not hang the test
        with lock:
            running[0] -= 1
            finished[0] += 1
        return float(batch["latents"].shape[1] * batch["latents"].shape[2])

    monkeypatch.setattr(train_step, "model_flops", slow_count)
    config = stage1_256.get_config("smoke")
    config.model.remat = "full"
    config.mesh.update(data=1, fsdp=1)
    setup = train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
    steps = train_step.CompiledSteps(setup, config, log=lambda line: None)
    try:
        m = setup.models
        cond = m.conditioner.config
        batches = [cache.example_batch(cond, m.latent_channels, m.downsample, 2, h, w) for h, w in SIDES]
        steps.precompile(batches)
        assert finished[0] == 0, "precompile waited for model_flops"
        assert [steps.flops(b) for b in batches] == [None] * 3 and not steps.wait_for_counts(timeout=0.1)
        release.set()
        assert steps.wait_for_counts(timeout=10)
        assert [steps.flops(b) for b in batches] == [64.0, 32.0, 32.0]
        assert most[0] == 1 and len(threads) == 1 and next(iter(threads)).startswith("model_flops")
    finally:
        release.set()
        steps.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("model_flops")]
