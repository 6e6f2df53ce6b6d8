"""The params' compute copy in the train state (config.compute_copy, train_state.TrainState.compute_params):
the UNet's forward from it is the forward from the params, bit for bit where XLA may not skip a cast; the
step computes from it and trains as from the params, keeps it equal to the cast of the updated params, and
every way a state is built or restored makes it; checkpoints never hold it."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage1_256
from sdxl_jax import checkpoint, held, parallel, train_state, train_step
from tests.test_microbatches import _batch


def _config(copy, k=1, optimizer="adamw"):
    config = stage1_256.get_config("smoke")
    config.optim.name = optimizer
    config.model.dtype = "bfloat16"  # the copy differs from the params only where the compute dtype does
    config.optim.microbatches = k
    config.optim.warmup_steps = 0
    config.mesh.update(data=2, fsdp=1)
    config.compute_copy = copy
    return config


def _setup(copy, k=1, optimizer="adamw"):
    config = _config(copy, k, optimizer)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:2])
    return config, train_state.make_setup(config, mesh)


def _perturbed(setup, state):
    """`state` with every param moved (zero-initialised output layers would give most params no gradient),
    its compute copy made again from them."""
    rng = np.random.default_rng(1)

    def moved(p):
        return jax.device_put(np.asarray(p) + 0.02 * rng.standard_normal(p.shape, np.float32), p.sharding)

    state = state.replace(params=jax.tree.map(moved, state.params))
    return train_state.with_compute_copy(state, setup.abstract_state.compute_params)


def _steps(setup, config, state, frozen, batches):
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        step = jax.jit(train_step.make_train_step(setup, config))
        outs = []
        for batch in batches:
            state, out = step(state, frozen, batch)
            outs.append(out)
    return state, outs


def _assert_same(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        name = what + jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def _assert_copy_of(state, like):
    """The state's compute copy is its params cast to `like`'s dtypes, leaf for leaf, and None where
    `like` holds None."""
    def one(p, c, a):
        if a is None:
            assert c is None
            return
        assert c.dtype == a.dtype and c.sharding.is_equivalent_to(a.sharding, c.ndim)
        np.testing.assert_array_equal(np.asarray(c), np.asarray(p.astype(a.dtype)))

    jax.tree.map(one, state.params, state.compute_params, like, is_leaf=lambda x: x is None)


def test_the_copy_holds_the_models_compute_dtypes_and_only_where_asked():
    config, setup = _setup("on")
    like = setup.abstract_state.compute_params
    assert {jnp.dtype(x.dtype) for x in jax.tree.leaves(like)} == {jnp.dtype(jnp.bfloat16)}
    # every param the model computes with in bf16, and only those: the norms' fp32 params stay out
    want = [jax.tree_util.keystr(k) for k, a in jax.tree_util.tree_leaves_with_path(
        held.abstract(setup.models.unet.config)) if a.dtype == jnp.bfloat16]
    assert [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(like)] == want
    left_out = [name for name in (jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(
        setup.abstract_state.params)) if name not in want]
    assert want and left_out and all("norm" in name for name in left_out), left_out
    assert _setup("off")[1].abstract_state.compute_params is None
    assert _setup("auto")[1].abstract_state.compute_params is None  # on CPUs
    gpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
    auto = _config("auto")
    assert train_state.uses_compute_copy(auto, gpu) and not train_state.uses_compute_copy(_config("off"), gpu)
    auto.model.remat = "dots"  # a run that trades speed for memory keeps its memory
    assert not train_state.uses_compute_copy(auto, gpu)
    assert train_state.uses_compute_copy(_config("on"), setup.mesh)


def test_the_unets_forward_from_the_copy_is_that_from_the_params_bit_for_bit():
    """The copy holds what the model's own casts make of the params: the forward from it equals the one
    from the params, to the bit, once XLA may not skip a cast (xla_allow_excess_precision, on by default,
    lets it compute with an fp32 param where the program casts it to bf16 and back: XLA:CPU's dots)."""
    _, setup = _setup("on")
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype),
                          setup.abstract_state.params)
    copy = train_state.compute_copy(params, setup.abstract_state.compute_params)
    weights = train_state.compute_weights(params, copy)
    unet, text = setup.models.unet, setup.models.conditioner.config
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 77, text.context_dim)), jnp.float32)
    vector = jnp.asarray(rng.standard_normal((2, text.vector_dim)), jnp.float32)
    forward = jax.jit(lambda p: unet.apply({"params": p}, x, jnp.asarray([10, 500]), context, vector))
    exact = {"xla_allow_excess_precision": False}
    want = forward.lower(params).compile(compiler_options=exact)(params)
    got = forward.lower(weights).compile(compiler_options=exact)(weights)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(jnp.std(want)) > 0


@pytest.mark.parametrize("k", [1, 2])
def test_steps_from_the_copy_train_as_from_the_params(k):
    """Two steps (k microbatches each) from the same state, with and without the copy: the same loss,
    gradient norm, params, optimizer state and EMA, up to XLA's freedom with the casts inside the program
    (above) and its fusions' summation order; the copy stays the cast of the params, bit for bit."""
    runs = {}
    for copy in ("off", "on"):
        # SGD: a param's move is its gradient's (AdamW's first moves are lr * sign(g), which a tiny
        # difference in a near-zero gradient can flip)
        config, setup = _setup(copy, k, "sgd")
        state = _perturbed(setup, train_state.init_state(setup, config))
        frozen = train_state.init_frozen_params(setup, config)
        batches = [_batch(setup, 4, seed=s) for s in (0, 1)]
        runs[copy] = (setup, state, *_steps(setup, config, state, frozen, batches))
    (_, _, off, off_out), (setup, start, on, on_out) = runs["off"], runs["on"]
    assert off.compute_params is None
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([float(o[key]) for o in on_out], [float(o[key]) for o in off_out],
                                   rtol=1e-2, err_msg=key)
    assert [int(o["nonfinite"]) for o in on_out] == [0, 0] and float(on_out[-1]["grad_norm"]) > 0
    for what in ("params", "ema_params"):
        for a, b in zip(jax.tree.leaves(getattr(on, what)), jax.tree.leaves(getattr(off, what)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=what)
    _assert_copy_of(on, setup.abstract_state.compute_params)
    moved = [bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(on.params), jax.tree.leaves(start.params),
                                                   strict=True)]
    assert sum(moved) > len(moved) // 2  # the steps changed the params, so the copy followed them


def test_the_step_computes_from_the_copy():
    """A copy that is not the params' cast changes the loss: the forward reads the copy, not the params."""
    config, setup = _setup("on")
    state = _perturbed(setup, train_state.init_state(setup, config))
    frozen = train_state.init_frozen_params(setup, config)
    batch = _batch(setup, 4)
    _, (right,) = _steps(setup, config, state, frozen, [batch])
    stale = state.replace(compute_params=jax.tree.map(lambda c: c * 0.5, state.compute_params))
    _, (wrong,) = _steps(setup, config, stale, frozen, [batch])
    assert float(right["loss"]) != float(wrong["loss"])


def test_built_and_restored_states_hold_the_copy_and_checkpoints_do_not(tmp_path):
    config, setup = _setup("on")
    like = setup.abstract_state.compute_params
    state = train_state.init_state(setup, config)
    _assert_copy_of(state, like)
    built = train_state.state_from_params(setup, config, _perturbed(setup, state).params)
    _assert_copy_of(built, like)
    assert not jnp.array_equal(jax.tree.leaves(built.params)[0], jax.tree.leaves(state.params)[0])

    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(3, built, None, config, force=True)
    ckpt.close()
    saved = sorted(p.name for p in (tmp_path / "checkpoints" / "3").iterdir() if p.is_dir())
    assert "compute_params" not in saved and "params" in saved
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    restored, _, step = ckpt.restore_latest(setup.abstract_state)
    ckpt.close()
    assert step == 3
    _assert_same(built.params, restored.params, "params")
    _assert_copy_of(restored, like)
    # a run without the copy restores the same checkpoint without one
    off = _setup("off")[1]
    plain_ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    plain, _, _ = plain_ckpt.restore_latest(off.abstract_state)
    plain_ckpt.close()
    assert plain.compute_params is None
    _assert_same(built.params, plain.params, "params")
