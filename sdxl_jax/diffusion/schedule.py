"""Noise schedules: the legacy DDPM discretization SDXL was trained with, EDM (Karras) sigmas, and the
img2img / refiner hand-off windows.

SPEC.md "Diffusion objective": betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2 in float64,
sigma_t = sqrt((1 - acp_t) / acp_t), 0.0291672 (t=0) .. 14.614641 (t=999). The host-side schedule
functions return float64 numpy arrays (exact; jnp.asarray turns them into float32 constants); the
sigma <-> index maps are jnp and run inside jit.

Sampling schedules (every `sigmas` list here) are descending and end with a final 0, so n sigmas + 1
describe n steps, as sgm's `Discretization(n, do_append_zero=True)`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

NUM_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012


@functools.cache
def _alphas_cumprod() -> np.ndarray:
    # sgm make_beta_schedule("linear"): linspace of the square roots, squared, in float64.
    betas = np.linspace(LINEAR_START**0.5, LINEAR_END**0.5, NUM_TIMESTEPS, dtype=np.float64) ** 2
    out = np.cumprod(1.0 - betas)
    out.flags.writeable = False
    return out


def alphas_cumprod() -> np.ndarray:
    """The 1000 cumulative alpha products of SDXL's scaled-linear beta schedule (float64, t = 0..999)."""
    return _alphas_cumprod().copy()


@functools.cache
def _discrete_sigmas() -> np.ndarray:
    acp = _alphas_cumprod()
    out = np.sqrt((1.0 - acp) / acp)
    out.flags.writeable = False
    return out


def discrete_sigmas() -> np.ndarray:
    """The 1000 training sigmas, ascending, indexed by timestep t = 0..999 (float64)."""
    return _discrete_sigmas().copy()


def legacy_ddpm_timesteps(n: int) -> np.ndarray:
    """The n timesteps the n-step schedule visits, descending (999 first), int64.

    sgm generate_roughly_equally_spaced_steps: reverse(int(linspace(999, 0, n, endpoint=False))), so
    for n = 50: 999, 979, ..., 19 (diffusers calls this "trailing" spacing).
    """
    if not 1 <= n <= NUM_TIMESTEPS:
        raise ValueError(f"number of sampling steps must be in [1, {NUM_TIMESTEPS}], got {n}")
    if n == NUM_TIMESTEPS:
        return np.arange(NUM_TIMESTEPS - 1, -1, -1)
    return np.linspace(NUM_TIMESTEPS - 1, 0, n, endpoint=False).astype(np.int64)


def legacy_ddpm_sigmas(n: int) -> np.ndarray:
    """n sampling sigmas of the training schedule, descending, plus a final 0 (length n + 1, float64)."""
    return np.append(_discrete_sigmas()[legacy_ddpm_timesteps(n)], 0.0)


def edm_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: n sigmas from sigma_max down to sigma_min, plus a final 0 (float64)."""
    if n < 1:
        raise ValueError(f"number of sampling steps must be >= 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float64)
    max_inv, min_inv = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return np.append((max_inv + ramp * (min_inv - max_inv)) ** rho, 0.0)


def sigma_to_index(sigma) -> jnp.ndarray:
    """Index (int32, shape of `sigma`) of the nearest of the 1000 training sigmas.

    Nearest in absolute distance, as sgm DiscreteDenoiser.sigma_to_idx (not in log space).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    table = jnp.asarray(_discrete_sigmas(), jnp.float32)
    return jnp.argmin(jnp.abs(sigma[..., None] - table), axis=-1).astype(jnp.int32)


def index_to_sigma(idx) -> jnp.ndarray:
    """The training sigma (float32) of timestep index `idx` (any integer array)."""
    return jnp.asarray(_discrete_sigmas(), jnp.float32)[jnp.asarray(idx)]


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")


def img2img_sigmas(sigmas, strength: float):
    """The tail of `sigmas` that img2img runs: the last max(int(strength * len(sigmas)), 1) entries.

    Reproduces sgm scripts/demo/streamlit_helpers.py Img2ImgDiscretizationWrapper: flip the schedule
    (incl. its final 0) to ascending, keep the first max(int(strength * len), 1), flip back. For 50 steps
    (51 sigmas) and strength 0.15 that keeps 7 sigmas, t = 119, 99, ..., 19 and 0: 6 steps. Strength 1
    keeps everything. `strength` must be a Python float: it decides the (static) length.

    img2img starts from encoded_latent + noise * sigmas_out[0] (do_img2img, add_noise=True); the
    refiner hand-off continues from the base latent as is (add_noise=False); see samplers.start_from.
    """
    _check_strength(strength)
    keep = max(int(strength * len(sigmas)), 1)
    return sigmas[len(sigmas) - keep :]


def split_for_refiner(sigmas, strength: float):
    """(base_sigmas, refiner_sigmas): the base stops where the refiner takes over; both hold that sigma.

    Reference (sgm scripts/demo/sampling.py, "Finish denoising with refiner", default strength 0.15):
    the base sampler's discretization is wrapped in Txt2NoisyDiscretizationWrapper(strength,
    original_steps=n), which flips the n + 1 sigmas to ascending and drops the first
    prune = max(min(int(strength * (n + 1)) - 1, n), 0), i.e. the base runs sigmas[: n + 1 - prune]
    from sigma_max and stops early. The refiner gets Img2ImgDiscretizationWrapper(strength) (see
    img2img_sigmas) and runs do_img2img(skip_encode=True, add_noise=False): it continues from the base
    latent with no re-noising and no VAE round trip. For n = 50, strength 0.15: prune = 6, the base runs
    44 steps and stops at sigma(t=119) ~= 0.3866; the refiner runs 6 steps over the last 7 sigmas
    (0.3866 ... sigma(t=19), 0). Both windows share the hand-off sigma for every strength.
    """
    _check_strength(strength)
    total = len(sigmas)
    prune = max(min(int(strength * total) - 1, total - 1), 0)
    return sigmas[: total - prune], img2img_sigmas(sigmas, strength)
