"""sdxl_jax.diffusion.schedule against the numbers in SPEC.md and the sgm reference behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.diffusion import schedule


def test_discrete_sigmas_match_spec():
    sigmas = schedule.discrete_sigmas()
    assert sigmas.shape == (1000,) and sigmas.dtype == np.float64
    np.testing.assert_allclose(sigmas[0], 0.0291672, rtol=2e-6)
    np.testing.assert_allclose(sigmas[999], 14.614641, rtol=1e-7)
    assert np.all(np.diff(sigmas) > 0)
    acp = schedule.alphas_cumprod()
    assert acp.dtype == np.float64
    np.testing.assert_allclose(sigmas, np.sqrt((1 - acp) / acp), rtol=0)
    # The cached tables cannot be corrupted through the returned copies.
    sigmas[0] = 123.0
    assert schedule.discrete_sigmas()[0] != 123.0


def test_legacy_ddpm_50_steps_match_spec():
    t = schedule.legacy_ddpm_timesteps(50)
    np.testing.assert_array_equal(t, np.arange(999, 0, -20))  # 999, 979, ..., 19
    sigmas = schedule.legacy_ddpm_sigmas(50)
    assert sigmas.shape == (51,) and sigmas[-1] == 0.0
    np.testing.assert_allclose(
        sigmas[:3], [14.6146, 12.9663, 11.5428], atol=5e-5
    )  # SPEC.md rounds to 4 places
    np.testing.assert_allclose(sigmas[:-1], schedule.discrete_sigmas()[t], rtol=0)
    assert np.all(np.diff(sigmas) < 0)


@pytest.mark.parametrize("n", [1, 7, 25, 1000])
def test_legacy_ddpm_other_lengths(n):
    t = schedule.legacy_ddpm_timesteps(n)
    sigmas = schedule.legacy_ddpm_sigmas(n)
    assert len(t) == n and len(sigmas) == n + 1 and t[0] == 999 and sigmas[-1] == 0
    assert np.all(np.diff(t) < 0) and t[-1] >= 0
    # sgm generate_roughly_equally_spaced_steps, written out independently.
    expected = np.arange(1000)[::-1] if n == 1000 else np.linspace(999, 0, n, endpoint=False).astype(int)
    np.testing.assert_array_equal(t, expected)


@pytest.mark.parametrize("n", [0, 1001])
def test_legacy_ddpm_rejects_bad_lengths(n):
    with pytest.raises(ValueError, match="sampling steps"):
        schedule.legacy_ddpm_sigmas(n)


def test_edm_sigmas():
    sigmas = schedule.edm_sigmas(10, 0.002, 80.0, rho=7.0)
    assert sigmas.shape == (11,) and sigmas[-1] == 0
    np.testing.assert_allclose(sigmas[[0, 9]], [80.0, 0.002], rtol=1e-12)
    # Karras eq. 5: equally spaced in sigma^(1/rho).
    np.testing.assert_allclose(np.diff(sigmas[:-1] ** (1 / 7)), np.diff(sigmas[:2] ** (1 / 7))[0], rtol=1e-9)
    with pytest.raises(ValueError, match="sigma_min"):
        schedule.edm_sigmas(10, 1.0, 0.5)


def test_sigma_index_round_trip():
    table = schedule.discrete_sigmas()
    idx = jax.jit(schedule.sigma_to_index)(table)
    assert idx.dtype == jnp.int32
    np.testing.assert_array_equal(idx, np.arange(1000))
    np.testing.assert_allclose(schedule.index_to_sigma(jnp.arange(1000)), table, rtol=1e-6)
    # Nearest in absolute distance: just below / above the midpoint of t=500 and t=501.
    mid = (table[500] + table[501]) / 2
    eps = 1e-4 * (table[501] - table[500])
    np.testing.assert_array_equal(schedule.sigma_to_index(np.array([mid - eps, mid + eps])), [500, 501])
    np.testing.assert_array_equal(schedule.sigma_to_index(np.array([[0.0], [100.0]])), [[0], [999]])


def test_split_for_refiner_reference_numbers():
    """SPEC.md: 50 steps, strength 0.15 -> base 44 steps to sigma(t=119) ~= 0.3866, refiner 6 steps."""
    sigmas = schedule.legacy_ddpm_sigmas(50)
    base, refiner = schedule.split_for_refiner(sigmas, 0.15)
    assert len(base) - 1 == 44 and len(refiner) - 1 == 6
    np.testing.assert_allclose(base[-1], schedule.discrete_sigmas()[119], rtol=0)
    np.testing.assert_allclose(base[-1], 0.3866, atol=1e-4)
    np.testing.assert_array_equal(base, sigmas[:45])
    np.testing.assert_array_equal(refiner, sigmas[-7:])
    assert refiner[0] == base[-1] and refiner[-1] == 0


@pytest.mark.parametrize("n", [10, 30, 50])
@pytest.mark.parametrize("strength", [0.0, 0.01, 0.15, 0.3, 0.5, 0.99, 1.0])
def test_split_for_refiner_windows_meet(n, strength):
    sigmas = schedule.legacy_ddpm_sigmas(n)
    base, refiner = schedule.split_for_refiner(sigmas, strength)
    assert base[-1] == refiner[0]
    assert (len(base) - 1) + (len(refiner) - 1) == n
    np.testing.assert_array_equal(np.concatenate([base[:-1], refiner]), sigmas)


def test_img2img_sigmas():
    sigmas = schedule.legacy_ddpm_sigmas(50)
    np.testing.assert_array_equal(schedule.img2img_sigmas(sigmas, 1.0), sigmas)
    # sgm Img2ImgDiscretizationWrapper keeps max(int(strength * 51), 1) sigmas: 0.75 -> 38.
    np.testing.assert_array_equal(schedule.img2img_sigmas(sigmas, 0.75), sigmas[-38:])
    np.testing.assert_array_equal(schedule.img2img_sigmas(sigmas, 0.0), [0.0])
    with pytest.raises(ValueError, match="strength"):
        schedule.img2img_sigmas(sigmas, 1.5)
