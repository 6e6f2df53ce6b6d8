"""sdxl_jax.diffusion.loss: sigma sampling, weightings, offset noise and the standard diffusion loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.diffusion import denoiser, loss, schedule


def _x0(shape=(8, 16, 16, 4), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 0.8, jnp.float32)


def test_eps_weighting_is_the_classic_eps_mse():
    """SPEC.md: with eps scaling, w = sigma^-2 turns w (D - x0)^2 into (eps_pred - eps)^2."""
    x0 = _x0()
    seen = {}

    def net(x_in, t):  # some eps prediction that depends on the input and the timestep
        seen["x_in"], seen["t"] = x_in, t
        eps_pred = jnp.sin(3 * x_in) + 1e-3 * t[:, None, None, None]
        seen["eps_pred"] = eps_pred
        return eps_pred

    @jax.jit
    def run(x0, rng):
        d = denoiser.make_denoiser(net, "eps")
        out = loss.diffusion_loss(d, x0, rng, parameterization="eps", weighting="eps", offset_noise=0.05)
        return out, dict(seen)  # the network's traced inputs and output leave jit as outputs

    (per_sample, aux), seen = run(x0, jax.random.key(1))
    sigma = np.asarray(aux["sigma"]).reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(seen["t"], schedule.sigma_to_index(aux["sigma"]))
    x_noisy = np.asarray(seen["x_in"]) * np.sqrt(sigma**2 + 1)  # undo c_in
    eps = (x_noisy - np.asarray(x0)) / sigma
    classic = np.mean((np.asarray(seen["eps_pred"]) - eps) ** 2, axis=(1, 2, 3))
    assert per_sample.shape == (8,)
    np.testing.assert_allclose(per_sample, classic, rtol=2e-4)


def test_loss_of_identity_denoiser_measures_the_noise():
    """D(x) = x_noisy: eps weighting gives mean(noise^2) ~ 1 + offset^2, unit weighting sigma^2 times it."""
    x0 = _x0((4, 64, 64, 4))

    @jax.jit  # one program for all variants: compiling dominates this test's time
    def run(rng):
        def f(weighting, loss_type="l2", offset_noise=0.0):
            return loss.diffusion_loss(
                lambda x, s: x, x0, rng, parameterization="eps", weighting=weighting, loss_type=loss_type,
                offset_noise=offset_noise,
            )  # fmt: skip

        return f("eps"), f("unit"), f("eps", offset_noise=0.5), f("eps", loss_type="l1")

    (eps_loss, aux), (unit, _), (offset_loss, _), (l1, _) = run(jax.random.key(2))
    np.testing.assert_allclose(eps_loss, 1.0, rtol=0.07)
    np.testing.assert_allclose(unit, eps_loss * aux["sigma"] ** 2, rtol=1e-5)
    # The same draws plus an offset of std 0.5 (only 16 draws of it: a loose bound).
    np.testing.assert_allclose(offset_loss.mean(), 1 + 0.5**2, rtol=0.2)
    # E|N(0,1)| = sqrt(2/pi), and eps weighting multiplies sigma * |noise| by sigma^-2.
    np.testing.assert_allclose(l1 * aux["sigma"], np.sqrt(2 / np.pi), rtol=0.03)


def test_perfect_denoiser_has_zero_loss_and_is_jittable():
    x0 = _x0()

    @jax.jit
    def f(x0, rng):
        return loss.diffusion_loss(
            lambda x, s: x0, x0, rng, parameterization="edm", weighting=None, sigma_sampling="edm"
        )

    per_sample, aux = f(x0, jax.random.key(0))
    np.testing.assert_array_equal(per_sample, 0.0)
    assert aux["sigma"].shape == (8,)


def test_sample_sigmas_discrete_and_edm():
    table = schedule.discrete_sigmas().astype(np.float32)
    s = np.asarray(loss.sample_sigmas(jax.random.key(0), 20000))
    assert np.isin(s, table).all()
    idx = np.searchsorted(table, s)
    assert idx.min() < 10 and idx.max() > 990 and abs(idx.mean() - 499.5) < 10  # uniform over [0, 1000)
    # The refiner trains on the first 200 noise levels (SPEC.md).
    s = np.asarray(loss.sample_sigmas(jax.random.key(1), 5000, min_index=0, max_index=200))
    assert s.max() == table[199] and s.min() == table[0]
    log_s = np.log(np.asarray(loss.sample_sigmas(jax.random.key(2), 20000, "edm")))
    assert abs(log_s.mean() + 1.2) < 0.03 and abs(log_s.std() - 1.2) < 0.03
    with pytest.raises(ValueError, match="valid"):
        loss.sample_sigmas(jax.random.key(0), 4, "cosine")
    with pytest.raises(ValueError, match="max_index"):
        loss.sample_sigmas(jax.random.key(0), 4, max_index=1001)


def test_loss_weighting_values():
    s = np.array([0.1, 1.0, 3.0], np.float32)
    np.testing.assert_allclose(loss.loss_weighting("eps", s), s**-2.0, rtol=1e-6)
    np.testing.assert_allclose(loss.loss_weighting("edm", s), (s**2 + 0.25) / (0.5 * s) ** 2, rtol=1e-6)
    np.testing.assert_allclose(loss.loss_weighting("v", s), (s**2 + 1) / s**2, rtol=1e-6)
    np.testing.assert_allclose(loss.loss_weighting("unit", s), 1.0)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss.loss_weighting("snr", s)


def test_offset_noise_statistics():
    shape = (512, 8, 8, 4)
    add = jax.jit(loss.add_offset_noise, static_argnums=2)
    offset = np.asarray(add(jax.random.key(0), jnp.zeros(shape), 0.05))
    # A per-(sample, channel) constant over H and W, of std `level`, independent across B and C.
    np.testing.assert_array_equal(offset, np.broadcast_to(offset[:, :1, :1, :], shape))
    per_bc = offset[:, 0, 0, :]
    assert abs(per_bc.std() - 0.05) < 0.003 and abs(per_bc.mean()) < 0.004
    assert abs(np.corrcoef(per_bc.T)[0, 1]) < 0.15
    noise = jax.random.normal(jax.random.key(1), shape)
    np.testing.assert_array_equal(add(jax.random.key(0), noise, 0.0), noise)
    np.testing.assert_allclose(add(jax.random.key(0), noise, 0.05), noise + offset, atol=1e-7)


def test_bad_arguments():
    x0 = _x0((2, 4, 4, 4))
    with pytest.raises(ValueError, match="unknown loss type"):
        loss.diffusion_loss(lambda x, s: x, x0, jax.random.key(0), parameterization="eps", weighting="eps",
                            loss_type="huber")  # fmt: skip
    with pytest.raises(ValueError, match="unknown parameterization"):
        loss.diffusion_loss(lambda x, s: x, x0, jax.random.key(0), parameterization="x0", weighting="eps")
