"""train_step.CompiledSteps.precompile: each distinct batch shape (bucket) compiled exactly once, however
often and in whichever form (host arrays or jax.ShapeDtypeStructs) it is listed; `get` then never compiles
again."""

import collections

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
