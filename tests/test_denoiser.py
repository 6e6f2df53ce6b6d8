"""sdxl_jax.diffusion.denoiser: the scalings of SPEC.md and D(x, sigma) around a network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.diffusion import denoiser, schedule

SIGMA = np.array([0.1, 1.0, 2.0, 14.0], np.float32)


def test_scalings_match_spec():
    s, sd = SIGMA.astype(np.float64), 0.5
    expected = {
        "eps": (np.ones_like(s), -s, 1 / np.sqrt(s**2 + 1), s),
        "v": (1 / (s**2 + 1), -s / np.sqrt(s**2 + 1), 1 / np.sqrt(s**2 + 1), s),
        "edm": (
            sd**2 / (s**2 + sd**2),
            s * sd / np.sqrt(s**2 + sd**2),
            1 / np.sqrt(s**2 + sd**2),
            np.log(s) / 4,
        ),
        "v_edm_noise": (1 / (s**2 + 1), -s / np.sqrt(s**2 + 1), 1 / np.sqrt(s**2 + 1), np.log(s) / 4),
    }
    for name, want in expected.items():
        got = denoiser.scalings(name, SIGMA)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="valid"):
        denoiser.scalings("x0", SIGMA)


def _x(shape=(4, 3, 5, 2), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_eps_denoiser_quantizes_sigma_and_passes_the_index():
    seen = {}

    def net(x_in, c_noise, context):
        seen["c_noise"], seen["x_in"] = c_noise, x_in
        return jnp.tanh(x_in) + context

    table = schedule.discrete_sigmas()
    idx = np.array([0, 250, 500, 999])
    sigma = (table[idx] * 1.001).astype(np.float32)  # off-grid: snaps back to the same index
    x, context = _x(), 0.25
    out = denoiser.make_denoiser(net, "eps")(x, sigma, context)
    assert seen["c_noise"].dtype == jnp.int32
    np.testing.assert_array_equal(seen["c_noise"], idx)
    s_q = table[idx].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(seen["x_in"], x / np.sqrt(s_q**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(
        out, x - s_q * (np.tanh(x / np.sqrt(s_q**2 + 1)) + context), rtol=1e-5, atol=1e-6
    )


def test_scalar_sigma_broadcasts_over_batch():
    d = denoiser.make_denoiser(lambda x_in, c_noise: x_in * c_noise[:, None, None, None], "eps")
    sigma = schedule.discrete_sigmas()[300]
    x = _x()
    np.testing.assert_allclose(d(x, sigma), d(x, np.full((4,), sigma, np.float32)), rtol=0)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_exact_network_recovers_x0(parameterization):
    """An oracle network (true eps, or true v = (eps - sigma x0) / sqrt(1 + sigma^2)) gives D = x0."""
    x0, eps = _x(seed=1), _x(seed=2)
    sigma = schedule.discrete_sigmas()[np.array([10, 200, 600, 990])].astype(np.float32)
    s = sigma.reshape(-1, 1, 1, 1)
    target = eps if parameterization == "eps" else (eps - s * x0) / np.sqrt(1 + s**2)
    d = denoiser.make_denoiser(lambda x_in, c_noise: target, parameterization)
    np.testing.assert_allclose(jax.jit(d)(x0 + s * eps, sigma), x0, atol=2e-5)


def test_edm_denoiser_is_continuous_by_default():
    seen = {}

    def net(x_in, c_noise):
        seen["c_noise"] = c_noise
        return x_in

    sigma = np.array([0.3, 1.7, 5.0, 60.0], np.float32)
    x = _x()
    out = denoiser.make_denoiser(net, "edm")(x, sigma)
    np.testing.assert_allclose(seen["c_noise"], np.log(sigma) / 4, rtol=1e-6)
    s, sd = sigma.reshape(-1, 1, 1, 1), 0.5
    want = x / np.sqrt(s**2 + sd**2) * s * sd / np.sqrt(s**2 + sd**2) + x * sd**2 / (s**2 + sd**2)
    np.testing.assert_allclose(out, want, rtol=1e-5)
    # Explicit quantization snaps sigma to the grid but keeps EDM's continuous c_noise.
    denoiser.make_denoiser(net, "v_edm_noise", quantize=True)(x, sigma)
    snapped = schedule.discrete_sigmas()[np.abs(schedule.discrete_sigmas()[:, None] - sigma).argmin(0)]
    np.testing.assert_allclose(seen["c_noise"], np.log(snapped) / 4, rtol=1e-6)


def test_bf16_network_output_is_combined_in_float32():
    d = denoiser.make_denoiser(lambda x_in, c_noise: x_in.astype(jnp.bfloat16), "eps")
    assert d(_x(), 1.0).dtype == jnp.float32


def test_unknown_parameterization():
    with pytest.raises(ValueError, match="unknown parameterization 'x0'"):
        denoiser.make_denoiser(lambda x, c: x, "x0")
