"""The parameter-init PRNG (sdxl_jax/models/init_rng.py): the initialisers' distributions, independent
streams per key, the same params on any mesh, and a far smaller init program than threefry's."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import stage1_256
from sdxl_jax import parallel, train_state
from sdxl_jax.models import init_rng


def test_draws_follow_the_initialisers_distributions():
    k = init_rng.key(jax.random.PRNGKey(0))
    normal = np.asarray(jax.random.normal(k, (1 << 20,)))
    assert abs(normal.mean()) < 5e-3 and abs(normal.std() - 1) < 5e-3
    uniform = np.asarray(jax.random.uniform(k, (1 << 20,)))
    assert abs(uniform.mean() - 0.5) < 2e-3 and abs(uniform.var() - 1 / 12) < 1e-3
    counts, _ = np.histogram(uniform, bins=64, range=(0, 1))  # flat: within 5 sd of the binomial's mean
    assert np.abs(counts - len(uniform) / 64).max() < 5 * np.sqrt(len(uniform) / 64)
    trunc = np.asarray(jax.random.truncated_normal(k, -2.0, 2.0, (1 << 20,)))  # lecun_normal's draw
    assert np.abs(trunc).max() <= 2 and abs(trunc.std() - 0.8796) < 5e-3
    assert jax.random.normal(k, (3, 5), jnp.bfloat16).dtype == jnp.bfloat16


def test_split_and_fold_in_give_independent_streams():
    k = init_rng.key(jax.random.PRNGKey(3))
    keys = list(jax.random.split(k, 4)) + [jax.random.fold_in(k, d) for d in (0, 1, 2)] + [k]
    draws = np.stack([np.asarray(jax.random.normal(x, (1 << 16,))) for x in keys])
    corr = np.corrcoef(draws) - np.eye(len(keys))
    assert np.abs(corr).max() < 0.03, corr  # 1/sqrt(65536) = 0.004 per pair
    # same words -> same key, whatever the source's form; another seed -> another stream
    same = init_rng.key(jax.random.key(3))
    assert (jax.random.normal(same, (8,)) == jax.random.normal(k, (8,))).all()
    assert (jax.random.normal(init_rng.key(jax.random.PRNGKey(4)), (8,)) != jax.random.normal(k, (8,))).all()
    # a key of four words (jax's rbg impl as the default) folds into two: a stream of its own
    rbg = init_rng.key(jax.random.key(3, impl="rbg"))
    assert (jax.random.normal(rbg, (8,)) != jax.random.normal(k, (8,))).all()


def _setup(devices, fsdp):
    config = stage1_256.get_config("smoke")
    config.mesh.update(data=devices // fsdp, fsdp=fsdp)
    return config, train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:devices]))


def test_the_state_is_the_same_on_any_mesh():
    """The draw is elementwise over an iota: each shard computes its own part of the same values."""
    config, one = _setup(1, 1)
    _, sharded = _setup(8, 8)
    a = train_state.init_state(one, config)
    b = train_state.init_state(sharded, config)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(b.params))  # fmt: skip
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):  # the same bits; the float
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)  # transform's fusion
    k = init_rng.key(jax.random.PRNGKey(5))  # may round differently (1 ulp); another stream is ~0.05 off
    rows = jax.sharding.NamedSharding(sharded.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    bits = jax.jit(lambda: jax.random.bits(k, (64, 48)), out_shardings=rows)()
    assert len(bits.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(bits), np.asarray(jax.random.bits(k, (64, 48))))
    kernels = [np.asarray(x) for x in jax.tree.leaves(a.params) if x.ndim >= 2 and np.any(x)]
    assert len(kernels) > 20 and len({x.tobytes()[:64] for x in kernels}) == len(kernels)  # all differ


def test_the_init_program_is_a_fraction_of_threefrys(monkeypatch):
    """The reason for the PRNG: XLA compiles a kernel per leaf, and threefry's draw is ~150 instructions.
    Counted in XLA:CPU's optimised program for the tiny UNet's params, both ways: 19,206 against 46,793
    instructions (the initialisers' own transforms are common to both). XLA:GPU's compile of the lighter
    SDXL UNet's params took 15.5 s against 123 s (bench/RESULTS.md, session 20)."""
    config, setup = _setup(1, 1)

    def instructions():
        fn = jax.jit(lambda r: train_state.init_unet(setup.models, config, r))
        with jax.set_mesh(setup.mesh):
            text = fn.lower(jax.ShapeDtypeStruct((2,), jnp.uint32)).compile().as_text()
        return sum(1 for line in text.splitlines() if line.startswith(("  %", "  ROOT")))

    ours = instructions()
    monkeypatch.setattr(init_rng, "key", lambda rng: rng)  # the same init with jax's default PRNG
    threefry = instructions()
    assert ours < threefry / 2, (ours, threefry)
