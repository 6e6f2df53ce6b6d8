"""train_state's init programs: the state drawn ahead of time in a compiled step's formats (compile_init),
the state built around given weights without a random draw (state_from_params, init_from), and the
frozen params drawn part by part."""

import jax
import numpy as np
import pytest

from configs import stage1_256
from sdxl_jax import parallel, train_state


@pytest.fixture(scope="module")
def setup():
    config = stage1_256.get_config("smoke")
    config.mesh.update(data=1, fsdp=1)
    return config, train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_compile_init_draws_the_state_in_the_steps_formats_without_compiling_again(setup):
    config, setup = setup
    setup.jitted.clear()
    plain = train_state.init_state(setup, config)
    formats = jax.tree.map(lambda x: x.format, plain)
    train_state.compile_init(setup, config, formats)
    compiled = [v for v in setup.jitted.values() if isinstance(v, jax.stages.Compiled)]
    assert len(compiled) == 2  # the state's (in these formats) and the frozen params'
    ahead = train_state.init_state(setup, config, formats)
    assert jax.tree.map(lambda x: x.format, ahead) == formats
    _equal(plain, ahead)


def test_state_from_params_is_the_fresh_state_with_those_weights_and_draws_nothing(setup, monkeypatch):
    config, setup = setup
    fresh = train_state.init_state(setup, config)
    params = jax.tree.map(lambda x: x + 1.0, fresh.params)
    ema = jax.tree.map(lambda x: x - 1.0, fresh.params)

    def no_draw(*args, **kwargs):
        raise AssertionError("state_from_params drew random params")

    monkeypatch.setattr(train_state, "init_unet", no_draw)
    built = train_state.state_from_params(setup, config, params, ema)
    assert int(built.step) == 0
    _equal(built.params, params)
    _equal(built.ema_params, ema)
    _equal(built.opt_state, fresh.opt_state)  # fresh moments and counts
    _equal(built.rng, fresh.rng)  # the seed's, as init_state's
    assert jax.tree.map(lambda x: x.sharding, built) == setup.state_shardings
    copied = train_state.state_from_params(setup, config, params)  # EMA = the weights
    _equal(copied.ema_params, params)


def test_frozen_parts_are_drawn_alone_with_the_values_of_the_full_draw(setup):
    config, setup = setup
    full = train_state.init_frozen_params(setup, config)
    assert sorted(full) == ["text", "vae"]
    text = train_state.init_frozen_params(setup, config, ("text",))
    assert sorted(text) == ["text"]
    _equal(text["text"], full["text"])
