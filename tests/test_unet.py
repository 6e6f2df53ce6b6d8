"""The Flax SDXL UNet: exact parameter counts on abstract shapes, logical names, shapes, bf16, remat,
dropout and sharded execution on tiny configs. Numerical parity with diffusers: test_convert_unet.py."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from configs import common as config_common
from sdxl_jax.models import unet as unet_lib


@pytest.mark.parametrize("name, expected", [("sdxl_base", 2_567_463_684), ("sdxl_refiner", 2_259_526_660)])
def test_full_size_parameter_counts(name, expected):
    assert unet_lib.count_params(unet_lib.abstract_params(unet_lib.PRESETS[name])) == expected


def _inputs(config, b=2, h=16, w=24, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (b, h, w, config.in_channels))
    t = jnp.array([3, 999][:b], jnp.int32)
    ctx = jax.random.normal(k[1], (b, 9, config.context_dim))
    y = jax.random.normal(k[2], (b, config.adm_in_channels))
    return x, t, ctx, y


def _random_params(config, seed=1):
    """Boxed abstract params (logical names) and random numpy values for every one of them, zero-init
    conv2 / conv_out included so that no path can hide. No init is run (cheap on a busy CPU)."""
    boxed = unet_lib.abstract_params(config)
    rng = np.random.default_rng(seed)
    values = jax.tree.map(
        lambda v: (1.0 if v.ndim == 1 else 0) + rng.normal(0, 0.1 if v.ndim == 1 else 1 / np.sqrt(
            np.prod(v.shape[:-1])), v.shape).astype(np.float32), nn.meta.unbox(boxed))
    return boxed, values


@pytest.fixture(scope="module")
def tiny():
    config = unet_lib.PRESETS["tiny"]
    inputs = _inputs(config)
    boxed, params = _random_params(config)
    out = jax.jit(unet_lib.UNet(config).apply)({"params": params}, *inputs)
    return config, boxed, params, inputs, out


# One level, one block of each kind: the remat / dropout / sharding wiring at a fraction of the compile time.
MICRO = unet_lib.UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, transformer_depth=(1,),
                            mid_transformer_depth=1, head_channels=16, context_dim=16, adm_in_channels=8)


@pytest.fixture(scope="module")
def micro():
    boxed, params = _random_params(MICRO)
    return MICRO, boxed, params, _inputs(MICRO, h=8, w=8)


def test_every_parameter_has_logical_axis_names(tiny):
    _, boxed, _, _, _ = tiny
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
    assert all(len(v.names) == v.value.ndim for v in leaves)
    assert all(v.value.dtype == jnp.float32 for v in leaves)


def test_tiny_forward_shapes_and_timestep_forms(tiny):
    config, _, params, (x, t, ctx, y), out = tiny
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    apply = jax.jit(unet_lib.UNet(config).apply)
    # float timesteps equal the int ones; a different timestep changes the output
    out2 = apply({"params": params}, x, jnp.array([3.0, 500.0]), ctx, y)
    np.testing.assert_allclose(out2[0], out[0], atol=1e-5)
    assert not np.allclose(out2[1], out[1], atol=1e-3)
    with pytest.raises(ValueError, match="divisible by 2"):
        unet_lib.UNet(config).apply({"params": params}, x[:, :15], t, ctx, y)


def test_bf16_compute_close_to_fp32(tiny):
    config, _, params, inputs, ref = tiny
    bf16 = unet_lib.UNet(dataclasses.replace(config, dtype="bfloat16"))
    out = jax.jit(bf16.apply)({"params": params}, *inputs)
    assert out.dtype == jnp.float32
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    # bf16 keeps 8 mantissa bits (rounding 2^-9 per op); over the tiny UNet's ~40 layers we measure ~1%.
    assert 1e-4 < rel < 0.03, rel  # the lower bound proves bf16 really ran


def test_remat_policies_change_memory_not_gradients(micro):
    config, _, params, inputs = micro

    def grads(c):
        loss = lambda p: jnp.mean(unet_lib.UNet(c).apply({"params": p}, *inputs) ** 2)
        return jax.jit(jax.grad(loss))(params)

    ref = grads(config)
    for policy in ("full", "dots"):
        got = grads(dataclasses.replace(config, remat=policy))
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_dropout_only_when_not_deterministic_also_under_remat(micro):
    config, _, params, inputs = micro
    model = unet_lib.UNet(dataclasses.replace(config, dropout=0.5, remat="full"))
    apply = jax.jit(model.apply, static_argnames="deterministic")
    det = apply({"params": params}, *inputs)
    drop = apply({"params": params}, *inputs, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert np.all(np.isfinite(drop)) and not np.allclose(drop, det, atol=1e-3)


def test_sharded_over_a_mesh_matches_single_device(micro):
    """The logical names and activation constraints resolve with the project's rules on a (2, 2, 2) mesh."""
    config, boxed, params, inputs = micro
    model = unet_lib.UNet(config)
    ref = jax.jit(model.apply)({"params": params}, *inputs)
    rules = config_common.base().sharding_rules
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.device_put(params, shardings)
        out = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(sharded, *inputs)
    # fp32 sums split over shards add in another order: on one host CPU 2.06e-5 apart at an output of 0.71
    # (2.9e-5 relative); a wrong sharding is off by O(1).
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_config_validation_says_what_is_wrong():
    with pytest.raises(ValueError, match="one entry per level"):
        unet_lib.UNetConfig(transformer_depth=(0, 1))
    with pytest.raises(ValueError, match="remat"):
        unet_lib.UNetConfig(remat="sometimes")
    with pytest.raises(ValueError, match="attention"):
        unet_lib.UNetConfig(attention="flash")


# MICRO with three blocks per transformer (two in the mid block): scans of real length.
DEEP = dataclasses.replace(MICRO, transformer_depth=(3,), mid_transformer_depth=2)


def test_scanned_blocks_compute_the_unrolled_model():
    """scan_blocks=True: relayout stacks the unrolled params into nn.scan's own shapes and logical names,
    and the scanned model gives the unrolled one's output and gradients (remat dots). relayout is exact
    both ways and leaves a tree already in the layout alone. Fails with the blocks stacked out of order."""
    _, params = _random_params(DEEP)
    scanned = dataclasses.replace(DEEP, scan_blocks=True)
    boxed = unet_lib.abstract_params(scanned)
    stacked = unet_lib.relayout(params, True)
    want = nn.meta.unbox(boxed)
    assert jax.tree.structure(stacked) == jax.tree.structure(want)
    assert [x.shape for x in jax.tree.leaves(stacked)] == [x.shape for x in jax.tree.leaves(want)]
    assert unet_lib.count_params(boxed) == unet_lib.count_params(unet_lib.abstract_params(DEEP))
    blocks = stacked["down_blocks_0"]["attentions_0"]["transformer_blocks"]["block"]
    assert blocks["attn1"]["to_q"]["kernel"].shape[0] == 3
    assert isinstance(blocks["ff"]["net_2"]["bias"], np.ndarray)  # numpy in, numpy out
    spec = nn.get_partition_spec(boxed)["mid_block"]["attentions_0"]["transformer_blocks"]["block"]
    assert spec["attn1"]["to_q"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "heads")
    assert unet_lib.is_scanned(stacked) and not unet_lib.is_scanned(params)
    again = unet_lib.relayout(stacked, True)  # already scanned: unchanged
    assert jax.tree.structure(again) == jax.tree.structure(stacked)
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stacked), strict=True))
    assert unet_lib.relayout(params, False) == params
    back = unet_lib.relayout(stacked, False)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)

    inputs = _inputs(DEEP, h=8, w=8)

    def run(config, p):
        loss = lambda p: jnp.mean(unet_lib.UNet(config).apply({"params": p}, *inputs) ** 2)
        return jax.jit(jax.value_and_grad(loss))(p)

    ref_loss, ref_grads = run(DEEP, params)
    loss, grads = run(dataclasses.replace(scanned, remat="dots"), stacked)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    grads = unet_lib.relayout(grads, False)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)

    shuffled = jax.tree.map(lambda x: x[::-1], stacked["down_blocks_0"]["attentions_0"]["transformer_blocks"])
    wrong = {**stacked, "down_blocks_0": {**stacked["down_blocks_0"], "attentions_0": {
        **stacked["down_blocks_0"]["attentions_0"], "transformer_blocks": shuffled}}}
    assert abs(float(run(scanned, wrong)[0]) - float(ref_loss)) > 1e-3 * abs(float(ref_loss))


_SHORT_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "i32": "int32", "u32": "uint32"}


def _scan_outputs(jaxpr):
    """Avals of the outputs of every scan in `jaxpr`, nested ones included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _scan_outputs(sub)


def test_scanned_blocks_in_bf16_keep_no_bf16_weights_and_give_bf16_weight_gradients(capsys):
    """bf16 compute over fp32 params (layers._cast_outside): the stacked weights' gradients leave the loop
    in bf16 like the unrolled blocks' (in fp32 they cost the base 4.8 GiB on one H100, bench/RESULTS.md),
    with remat dots and without remat. Under remat dots the bf16 copy of the stacked weights is redone in
    the backward pass rather than kept from the forward one. Either way the scan keeps what the unrolled
    blocks keep, and the params themselves stay fp32."""
    unrolled = dataclasses.replace(DEEP, dtype="bfloat16", remat="dots")
    scanned = dataclasses.replace(unrolled, scan_blocks=True)
    assert {x.dtype for x in jax.tree.leaves(unet_lib.abstract_params(scanned))} == {jnp.dtype("float32")}
    _, params = _random_params(DEEP)
    stacked = unet_lib.relayout(params, True)
    weights = {x.shape for path, x in jax.tree_util.tree_leaves_with_path(stacked)  # the stacked kernels
               if unet_lib.is_stacked(path) and x.ndim == 3}
    inputs = _inputs(DEEP, h=8, w=8)

    def loss(config):
        model = unet_lib.UNet(config)
        return lambda p: jnp.mean(model.apply({"params": p}, *inputs).astype(jnp.float32) ** 2)

    def residuals(config, p):  # (dtype, shape) of what the forward pass keeps for the backward one
        capsys.readouterr()
        print_saved_residuals(loss(config), p)
        kept = [line for line in capsys.readouterr().out.splitlines() if "from the argument" not in line]
        assert kept
        types = [re.match(r"(\w+)\[([\d,]*)\]", line).groups() for line in kept]
        return [(jnp.dtype(_SHORT_DTYPES.get(d, d)), tuple(int(n) for n in dims.split(",") if n))
                for d, dims in types]

    kept = residuals(scanned, stacked)
    assert not [s for d, s in kept if d == jnp.bfloat16 and s in weights]
    nbytes = lambda kept: sum(d.itemsize * np.prod(s) for d, s in kept)
    # Measured: 2,873,056 bytes scanned vs 2,840,288 unrolled (each transformer's last block output).
    assert nbytes(kept) < 1.05 * nbytes(residuals(unrolled, params))

    grads = jax.make_jaxpr(jax.grad(loss(scanned)))(stacked).jaxpr
    out = [a for a in _scan_outputs(grads) if a.shape in weights]
    assert out and {a.dtype for a in out} == {jnp.dtype("bfloat16")}

    # Without a remat policy the cast copy is kept like the unrolled blocks' casts, with no remat around it
    # (one refusing casts would keep the fp32 inputs of the activation casts: 8,127,712 bytes against the
    # unrolled 7,851,854; measured now 7,851,744), and the gradients still leave the loop in bf16.
    none = dataclasses.replace(unrolled, remat="none")
    assert nbytes(residuals(dataclasses.replace(none, scan_blocks=True), stacked)) <= \
        1.01 * nbytes(residuals(none, params))
    grads = jax.make_jaxpr(jax.grad(loss(dataclasses.replace(none, scan_blocks=True))))(stacked).jaxpr
    out = [a for a in _scan_outputs(grads) if a.shape in weights]
    assert out and {a.dtype for a in out} == {jnp.dtype("bfloat16")}


def test_scanned_blocks_shard_like_their_blocks():
    """The stacked axis ("layers") maps to no mesh axis, so a stacked param shards like each block's
    (what relayout assumes for abstract shardings), and the scanned model runs sharded on a (2, 2, 2) mesh."""
    from sdxl_jax import parallel

    config = config_common.base()
    scanned = dataclasses.replace(DEEP, scan_blocks=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    unrolled = parallel.logical_shardings(unet_lib.abstract_params(DEEP), mesh, config)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(unet_lib.abstract_params(DEEP)), unrolled)
    got = jax.tree.map(lambda a: a.sharding.spec, unet_lib.relayout(abstract, True))
    scanned_shardings = parallel.logical_shardings(unet_lib.abstract_params(scanned), mesh, config)
    want = jax.tree.map(lambda s: s.spec, scanned_shardings)
    assert got == want
    assert got["mid_block"]["attentions_0"]["transformer_blocks"]["block"]["attn1"]["to_q"]["kernel"] == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")

    _, params = _random_params(DEEP)
    inputs = _inputs(DEEP, h=8, w=8)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules(config)):
        run = jax.jit(lambda m, p, *a: m.apply({"params": p}, *a), static_argnums=0)
        out = run(unet_lib.UNet(scanned), jax.device_put(unet_lib.relayout(params, True), scanned_shardings),
                  *inputs)  # fmt: skip
        ref = run(unet_lib.UNet(DEEP), jax.device_put(params, unrolled), *inputs)
    # Against the unrolled model on the same mesh, so the two add their sharded fp32 sums in one order:
    # equal on jax 0.10.2 and 0.12.0.1 (each 2.7e-5 to 3.6e-5 from one device); a block out of place or
    # order is off by O(0.1).
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
