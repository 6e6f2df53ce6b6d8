"""Learning-rate schedules, the weight-decay mask, gradient clipping and the EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from sdxl_jax import optim


def _optim(**kw):
    c = common.base().optim
    c.update(kw)
    return c


def test_warmup_then_schedules():
    c = _optim(lr=1.0, warmup_steps=10, schedule="constant")
    lr = optim.learning_rate_schedule(c, 110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(100)], [0.0, 0.5, 1.0, 1.0], atol=1e-6)
    lr = optim.learning_rate_schedule(
        _optim(lr=1.0, warmup_steps=10, schedule="linear", end_lr_fraction=0.1), 110
    )
    np.testing.assert_allclose([lr(10), lr(60), lr(110)], [1.0, 0.55, 0.1], atol=1e-6)
    lr = optim.learning_rate_schedule(_optim(lr=1.0, warmup_steps=0, schedule="cosine"), 100)
    np.testing.assert_allclose([lr(0), lr(50), lr(100)], [1.0, 0.5, 0.0], atol=1e-6)


def test_weight_decay_skips_norms_and_biases():
    params = {
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
        "norm": {"scale": jnp.ones((2,))},
    }
    tx, _ = optim.make_optimizer(_optim(lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0.0), 10)
    zero = {
        "dense": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))},
        "norm": {"scale": jnp.zeros((2,))},
    }
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
    np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)


def test_weight_decay_skips_stacked_norms_and_biases_of_scanned_blocks():
    # scan_blocks stacks each block's params on a leading axis: a bias becomes 2-D, a kernel 3-D.
    block = {"ff": {"kernel": jnp.ones((3, 2, 2)), "bias": jnp.ones((3, 2))},
             "norm1": {"norm": {"scale": jnp.ones((3, 2))}}}
    params = {"proj_in": {"kernel": jnp.ones((2, 2))}, "transformer_blocks": {"block": block}}
    mask = optim.decay_mask(params)
    assert mask["proj_in"]["kernel"]
    assert mask["transformer_blocks"]["block"] == {"ff": {"kernel": True, "bias": False},
                                                   "norm1": {"norm": {"scale": False}}}


def test_gradient_clipping_bounds_the_global_norm():
    tx, _ = optim.make_optimizer(_optim(name="sgd", lr=1.0, warmup_steps=0, b1=0.0, grad_clip=1.0), 10)
    params = {"w": jnp.zeros((4,))}
    updates, _ = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)


def _many_leaves(n=300, seed=0):
    """Leaves of every kind global_norm treats apart: of one axis (their own partial sums) and of several
    (summed over all but the last), fp32 and bf16; more than NORM_GROUP."""
    rng = np.random.default_rng(seed)
    shapes = [(64, 640), (4097,), (3, 3, 8, 96), (1280,), (7,), (2, 4096 + 512), (33, 3)]
    tree = {}
    for i in range(n):
        x = rng.standard_normal(shapes[i % len(shapes)]) * (1 + i % 5)
        tree[f"leaf{i:03d}"] = jnp.asarray(x, jnp.bfloat16 if i % 11 == 0 else jnp.float32)
    return tree


def _norm64(tree):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))


def test_global_norm_is_the_norm_of_every_element():
    tree = _many_leaves()
    assert len(tree) > 2 * optim.NORM_GROUP
    want = _norm64(tree)
    np.testing.assert_allclose(float(jax.jit(optim.global_norm)(tree)), want, rtol=1e-6)
    np.testing.assert_allclose(float(optim.global_norm({"one": tree["leaf001"]})), _norm64(tree["leaf001"]),
                               rtol=1e-6)
    assert float(optim.global_norm({})) == 0.0


def test_global_norm_groups_its_sums_behind_barriers():
    """One optimization barrier per NORM_GROUP leaves (what keeps XLA from splitting the group's sum back
    into one reduction per leaf)."""
    tree = _many_leaves()
    jaxpr = str(jax.make_jaxpr(optim.global_norm)(tree))
    assert jaxpr.count("optimization_barrier") == -(-len(tree) // optim.NORM_GROUP)


def test_global_norm_over_sharded_leaves_sums_each_block_once():
    """On a 2 x 4 mesh: leaves split over fsdp, over both axes, on a second dimension, and replicated. The
    shard_map sums each device's own blocks: no leaf is gathered, and a replicated leaf is not counted
    once per device."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    tree = _many_leaves(n=20)
    specs = {}
    for i, (k, x) in enumerate(tree.items()):
        if x.shape[0] % 8 == 0 and i % 3 == 0:
            specs[k] = P(("data", "fsdp"))
        elif x.shape[0] % 4 == 0 and i % 3 == 1:
            specs[k] = P("fsdp")
        elif x.ndim > 1 and x.shape[1] % 4 == 0:
            specs[k] = P(None, "fsdp")
        else:
            specs[k] = P()
    assert len({tuple(s) for s in specs.values()}) == 4
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    placed = jax.device_put(tree, shardings)
    fn = jax.jit(lambda t: optim.global_norm(t, shardings))
    np.testing.assert_allclose(float(fn(placed)), _norm64(tree), rtol=1e-6)
    hlo = fn.lower(placed).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    with pytest.raises(ValueError, match="20 leaves but 19 shardings"):
        optim.global_norm(tree, dict(list(shardings.items())[:19]))


def test_clip_by_global_norm_is_optax_s_and_takes_the_callers_norm():
    tree = jax.tree.map(lambda x: x.astype(jnp.float32) * 3, _many_leaves(n=12))
    norm = _norm64(tree)
    ours, theirs = optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert jax.tree.structure(ours.init(tree)) == jax.tree.structure(theirs.init(tree))
    got, _ = ours.update(tree, ours.init(tree))
    want, _ = theirs.update(tree, theirs.init(tree))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    # a norm passed in is the one used: twice the true norm halves the clipped updates
    got, _ = ours.update(tree, ours.init(tree), grad_norm=jnp.float32(2 * norm))
    np.testing.assert_allclose(float(optax.tree.norm(got)), 0.5, rtol=1e-5)
    small = jax.tree.map(lambda x: x / (2 * norm), tree)
    got, _ = ours.update(small, ours.init(small), grad_norm=jnp.float32(0.5))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(small), strict=True):
        np.testing.assert_array_equal(g, w)
    # the chain passes grad_norm on to the clip (and the optimizers that do not take it ignore it)
    for name in optim.OPTIMIZERS:
        tx, _ = optim.make_optimizer(_optim(name=name, lr=1.0, warmup_steps=0, b1=0.0, weight_decay=0.0,
                                            grad_clip=1.0), 10)
        state = tx.init(tree)
        a, _ = tx.update(tree, state, tree, grad_norm=jnp.float32(norm))
        b, _ = tx.update(tree, state, tree, grad_norm=jnp.float32(2 * norm))
        assert not np.allclose(a["leaf000"], b["leaf000"]), name


def test_ema_copies_during_warmup_then_decays():
    ema_c = common.base().ema
    ema_c.update(decay=0.9, warmup_steps=2)
    e, p = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    np.testing.assert_allclose(optim.ema_update(e, p, optim.ema_decay(ema_c, 1))["w"], 1.0)
    np.testing.assert_allclose(optim.ema_update(e, p, optim.ema_decay(ema_c, 2))["w"], 0.1, rtol=1e-6)


def test_ema_every_k_steps_updates_after_each_kth_step_with_decay_to_the_k():
    """ema.every=3, warm-up 2, decay 0.9: steps 0 and 1 copy the params; then the EMA moves only after
    steps 4, 7, 10 (the 3rd, 6th, 9th after the warm-up), each time by 0.9 ** 3; a non-finite step that is
    due (7) leaves it alone. Written out by hand, not through optim."""
    ema_c = common.base().ema
    ema_c.update(decay=0.9, warmup_steps=2, every=3)
    step_fn = jax.jit(lambda e, p, s, ok: optim.ema_step(ema_c, e, p, s, ok))
    e, expected = {"w": jnp.full(2, -5.0)}, -5.0
    for s in range(12):
        p = {"w": jnp.full(2, float(s))}
        ok = s != 7
        e = step_fn(e, p, s, ok)
        if s < 2:
            expected = float(s)
        elif s in (4, 10):
            expected = 0.729 * expected + 0.271 * s
        np.testing.assert_allclose(e["w"], expected, rtol=1e-6, err_msg=f"after step {s}")


def test_ema_every_step_is_the_update_kept_where_the_step_is_finite():
    ema_c = common.base().ema
    ema_c.update(decay=0.75, warmup_steps=0)
    assert ema_c.every == 1  # the default
    e, p = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    np.testing.assert_allclose(optim.ema_step(ema_c, e, p, 5, jnp.bool_(True))["w"], 0.25)
    np.testing.assert_allclose(optim.ema_step(ema_c, e, p, 5, jnp.bool_(False))["w"], 0.0)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_bf16_first_moment_is_stored_in_bf16_and_tracks_the_fp32_one(name):
    """optim.mu_dtype="bfloat16" halves the first moment's state; optax computes each update from the fp32
    moment before rounding it for storage, so after 50 steps of random gradients the params differ from
    the fp32 run's by ~1% of how far they moved."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32), "b": jnp.zeros((32,))}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
             for _ in range(50)]  # fmt: skip
    finals = {}
    for mu_dtype in ("float32", "bfloat16"):
        tx, _ = optim.make_optimizer(_optim(name=name, lr=1e-2, warmup_steps=0, mu_dtype=mu_dtype), 50)
        state, p = tx.init(params), params
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim}
        second = set() if name == "sgd" else {jnp.dtype(jnp.float32)}  # Adam's nu stays fp32
        assert dtypes == {jnp.dtype(mu_dtype)} | second
        finals[mu_dtype] = p
    moved = np.abs(np.asarray(finals["float32"]["w"] - params["w"])).mean()
    drift = np.abs(np.asarray(finals["bfloat16"]["w"] - finals["float32"]["w"])).mean()
    assert 0 < drift < 0.03 * moved, (drift, moved)  # measured: 1.2% (adam, adamw)
