"""The train step's update. Gradient accumulation (config.optim.microbatches): the step over k microbatches
makes the update of the averaged microbatch gradients, holds less activation memory, and bad settings fail
in validation. The EMA every k steps (config.ema.every) inside the compiled step."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import autoencoder, stage1_256
from sdxl_jax import config_lib, metrics, parallel, train_state, train_step
from sdxl_jax.data import cache
from sdxl_jax.models import layers


def _config(k, *, devices=2, dtype="float32"):
    config = stage1_256.get_config("smoke")
    config.model.dtype = dtype
    config.optim.microbatches = k
    config.optim.warmup_steps = 0  # a non-zero learning rate at step 0
    config.mesh.update(data=devices, fsdp=1)
    return config


def _setup(k, *, devices=2, dtype="float32"):
    config = _config(k, devices=devices, dtype=dtype)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:devices])
    return config, train_state.make_setup(config, mesh)


def _batch(setup, b, side=64, seed=0):
    """A cached-input batch whose rows all differ (latents, text, sizes)."""
    m = setup.models
    batch = cache.example_batch(m.conditioner.config, m.latent_channels, m.downsample, b, side, side)
    rng = np.random.default_rng(seed)
    for key in ("latents", "text_l", "text_g", "pooled_g"):
        if key in batch:
            batch[key] = rng.standard_normal(batch[key].shape).astype(np.float32)
    batch["original_size"] = rng.integers(64, 1024, (b, 2)).astype(np.int32)
    return batch


def _state(setup, config):
    """A fresh state with every param perturbed (the UNet's zero-initialised output layers would give most
    params zero gradients)."""
    state = train_state.init_state(setup, config)
    rng = np.random.default_rng(1)  # on the host: per-leaf device ops would each compile a kernel

    def moved(p):
        return jax.device_put(np.asarray(p) + 0.02 * rng.standard_normal(p.shape, np.float32), p.sharding)

    return state.replace(params=jax.tree.map(moved, state.params))


def _run(setup, config, state, frozen, batch):
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        return jax.jit(train_step.make_train_step(setup, config))(state, frozen, batch)


@pytest.fixture(scope="module")
def initial():
    """The 2-device fp32 setup with its perturbed state and frozen params, shared by the tests that run a
    step (the setup does not depend on optim.microbatches; the step does, through the config)."""
    config, setup = _setup(1)
    return setup, _state(setup, config), train_state.init_frozen_params(setup, config)


def test_microbatched_update_is_that_of_the_averaged_microbatch_gradients(initial):
    k = 2
    config = _config(k)
    setup, state, frozen = initial
    # Plain SGD with rate 1 makes the update the gradient itself (AdamW's first update, ~lr * sign(g),
    # would hide the gradient's value).
    setup = dataclasses.replace(setup, tx=optax.sgd(1.0))
    state = state.replace(opt_state=setup.tx.init(state.params))
    batch = _batch(setup, 4)
    new, out = _run(setup, config, state, frozen, batch)
    got = jax.tree.map(lambda before, after: before - after, state.params, new.params)

    # Reference: microbatch i is rows i::k with rng fold_in(step rng, i); the gradients averaged.
    loss_and_grads = jax.jit(train_step.make_loss_and_grads(setup, config))
    rng = jax.random.fold_in(state.rng, state.step)
    losses, grads = [], []
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        for i in range(k):
            part = {key: v[i::k] for key, v in batch.items()}
            loss, _, _, g = loss_and_grads(state.params, frozen, part, jax.random.fold_in(rng, i))
            losses.append(loss)
            grads.append(g)
    want = jax.tree.map(lambda *g: sum(g) / k, *grads)

    assert float(out["loss"]) == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert float(out["grad_norm"]) == pytest.approx(float(optax.tree.norm(want)), rel=1e-4)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
    # The microbatches' gradients differ, so the comparison below sees the averaging and the row split.
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, grads[0], grads[1]))) > 0.1 * float(
        optax.tree.norm(want))  # fmt: skip
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * scale, rtol=0)
    assert int(out["count_sigma_0_0.25"] + out["count_sigma_0.25_0.75"] + out["count_sigma_0.75_2"]
               + out["count_sigma_2_inf"]) == 4  # fmt: skip


def test_one_microbatch_is_the_unaccumulated_step(initial):
    config = _config(1)
    setup, state, frozen = initial
    batch = _batch(setup, 4)
    _, out = _run(setup, config, state, frozen, batch)
    rng = jax.random.fold_in(state.rng, state.step)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        loss, *_ = jax.jit(train_step.make_loss_and_grads(setup, config))(state.params, frozen, batch, rng)
    assert float(out["loss"]) == float(loss)


def test_the_step_moves_the_ema_after_every_kth_step_only(initial):
    """ema.every=2, decay 0.5: after step 0 the EMA is the initial one, bit for bit; after step 1 it is
    0.25 * initial + 0.75 * the params after step 1 (0.5 ** 2 over two steps), in the compiled step."""
    config = _config(1)
    config.ema.update(decay=0.5, every=2)
    setup, state, frozen = initial
    first = jax.tree.map(np.asarray, state.ema_params)
    batch = _batch(setup, 4)
    step = jax.jit(train_step.make_train_step(setup, config))
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        one, _ = step(state, frozen, batch)
        two, out = step(one, frozen, _batch(setup, 4, seed=1))
    assert int(out["nonfinite"]) == 0
    for e, e0 in zip(jax.tree.leaves(one.ema_params), jax.tree.leaves(first), strict=True):
        np.testing.assert_array_equal(np.asarray(e), e0)
    moved = 0
    for e, e0, p in zip(jax.tree.leaves(two.ema_params), jax.tree.leaves(first), jax.tree.leaves(two.params),
                        strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(e), 0.25 * e0 + 0.75 * np.asarray(p), rtol=1e-6, atol=1e-7)
        moved += int(np.any(np.asarray(e) != e0))
    assert moved > 0.9 * len(first), (moved, len(first))


def test_microbatches_lower_the_compiled_activation_memory():
    """The point of accumulation: the compiled step's temporaries shrink with the microbatch."""
    temps = {}
    for k in (1, 4):
        config, setup = _setup(k, devices=1, dtype="bfloat16")
        batch = _batch(setup, 8, side=128)
        steps = train_step.CompiledSteps(setup, config, log=lambda line: None)
        try:
            compiled = steps.compile(batch)
        finally:
            steps.close()
        temps[k] = metrics.compiled_stats(compiled)["temp_size_in_bytes"]
    assert temps[4] < 0.6 * temps[1], temps


def test_the_microbatch_loop_costs_less_than_its_accumulator():
    """fsdp weights are all-gathered inside the microbatch loop, not hoisted out of it (loop-invariant
    code motion keeps the whole gathered model alive for the loop: 9.84 instead of 7.56 GiB of temporaries
    for a 641M SDXL-shaped UNet on XLA:CPU, fsdp 8), and the weights are carried through the loop rather
    than read from outside it (XLA:TPU then held a bf16 copy of every weight through the loop; here it
    cost 1.8 MiB more temporaries).
    Measured here: k=1 at 2 rows 11.8 MiB of temporaries; k=2 at 4 rows 14.1 MiB, less than k=1 plus the
    per-device fp32 gradient accumulator (3.2 MiB); 16.0 MiB with the weights read from outside the loop,
    24.4 MiB without the barrier."""

    def temp(k, rows):
        config = _config(k, devices=2, dtype="bfloat16")
        config.mesh.update(data=1, fsdp=2)
        setup = train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:2]))
        steps = train_step.CompiledSteps(setup, config, log=lambda line: None)
        try:
            compiled = steps.compile(_batch(setup, rows))
        finally:
            steps.close()
        params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state.params))
        return metrics.compiled_stats(compiled)["temp_size_in_bytes"], params

    (one, params), (two, _) = temp(1, 2), temp(2, 4)
    accumulator = params / 2  # fp32, sharded like the params over fsdp 2
    assert two < one + accumulator, (one, two, accumulator)


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(microbatches=3), "does not divide"),
        (dict(microbatches=0), "positive integer"),
    ],
)
def test_bad_microbatch_settings_fail_in_validation(override, match):
    config = stage1_256.get_config("smoke")
    config.data.batch_size = 8
    config.mesh.update(data=2, fsdp=1)
    config.optim.update(**override)
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(config, num_devices=2)
    config.optim.microbatches = 4  # 4 rows per shard: fine
    config_lib.validate(config, num_devices=2)


def test_the_autoencoder_step_refuses_microbatches():
    config = autoencoder.get_config("smoke")
    config.optim.microbatches = 2
    with pytest.raises(config_lib.ConfigError, match="diffusion step only"):
        config_lib.validate(config, num_devices=1)


_XLA_OOM = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of "
            "memory in memory space hbm. Used 15.75G of 15.75G hbm. Exceeded hbm capacity by 5.15M.")


def test_a_step_that_does_not_fit_says_what_to_change(monkeypatch):
    config, setup = _setup(1, devices=2)
    config.model.attention = "xla"
    batch = _batch(setup, 4)

    def oom(self, *a, **kw):
        raise jax.errors.JaxRuntimeError(_XLA_OOM)

    monkeypatch.setattr(jax.stages.Lowered, "compile", oom)
    steps = train_step.CompiledSteps(setup, config, log=lambda line: None)
    with pytest.raises(train_step.DeviceMemoryError) as info:
        steps.compile(batch)
    steps.close()
    text = str(info.value)
    assert "Ran out of memory in memory space hbm" in text
    assert "2 rows per batch shard in 1 microbatch" in text
    for fix in ("--config.model.remat=dots", "--config.model.attention=chunked",
                "--config.optim.microbatches=2", "--config.optim.mu_dtype=bfloat16",
                "bench/train_step.py --compile_only"):  # fmt: skip
        assert fix in text, fix
    # Only applicable fixes: with remat, chunked attention and a bf16 first moment set, and 2 rows per
    # shard in 2 microbatches, none of those nor another halving is offered.
    config.model.update(remat="dots", attention="chunked")
    config.optim.update(microbatches=2, mu_dtype="bfloat16")
    text = train_step.memory_advice(config, setup.mesh, batch, RuntimeError(_XLA_OOM))
    assert "--config.model.remat" not in text and "--config.model.attention" not in text
    assert "--config.optim.mu_dtype" not in text
    assert "microbatches=4" not in text and "config.mesh.fsdp" in text
    # Splash under remat dots with unrolled blocks: scanning them keeps its log-sum-exp compact. Scanned,
    # splash needs less than chunked, which is then not offered.
    config.model.attention = "splash"
    text = train_step.memory_advice(config, setup.mesh, batch, "OOM")
    assert "--config.model.scan_blocks=True" in text and "--config.model.attention=chunked" in text
    config.model.scan_blocks = True
    text = train_step.memory_advice(config, setup.mesh, batch, "OOM")
    assert "--config.model.scan_blocks" not in text and "--config.model.attention" not in text
    config.model.update(attention="chunked", scan_blocks=False)
    # Other compile errors pass through unchanged.
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *a, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError) as info:
        train_step.CompiledSteps(setup, config, log=lambda line: None).compile(batch)
    assert not getattr(info.value, "__notes__", None)
    # With a vendor kernel on its own platform ("auto" on a GPU: cuDNN) they also say how to avoid it.
    config.model.attention = "auto"

    def gpu_error(self, *a, **kw):
        monkeypatch.setattr(layers, "target_platform", lambda: "gpu")  # as if the program were for a GPU
        raise jax.errors.JaxRuntimeError("INTERNAL: cuDNN error")

    monkeypatch.setattr(jax.stages.Lowered, "compile", gpu_error)
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        train_step.CompiledSteps(setup, config, log=lambda line: None).compile(batch)
    (note,) = info.value.__notes__
    assert "'auto': cudnn" in note and "--config.model.attention=chunked" in note
