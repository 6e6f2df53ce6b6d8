"""The standard diffusion loss (sgm StandardDiffusionLoss) with its sigma samplers and weightings.

SPEC.md "Diffusion objective": x_noisy = x0 + sigma * noise; per-sample loss = mean over H, W, C of
w(sigma) * (D(x_noisy, sigma) - x0)^2. SDXL trains with discrete sigma sampling over all 1000 indices
(the refiner over the first 200) and eps weighting, which turns the loss into the classic eps-MSE.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sdxl_jax.diffusion import schedule
from sdxl_jax.diffusion.denoiser import PARAMETERIZATIONS

SIGMA_SAMPLING = ("discrete", "edm")
WEIGHTINGS = ("eps", "edm", "v", "unit")
LOSS_TYPES = ("l2", "l1")
# The weighting that makes each parameterization's loss its natural target MSE.
DEFAULT_WEIGHTING = {"eps": "eps", "v": "v", "edm": "edm", "v_edm_noise": "v"}


def sample_sigmas(
    rng,
    batch_size: int,
    method: str = "discrete",
    min_index: int = 0,
    max_index: int = schedule.NUM_TIMESTEPS,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> jnp.ndarray:
    """(batch_size,) float32 training sigmas.

    discrete (sgm DiscreteSampling): a training sigma at a uniform index in [min_index, max_index); the
    SDXL refiner trains on [0, 200). edm (sgm EDMSampling): exp(p_mean + p_std * N(0, 1)).
    """
    if method == "discrete":
        if not 0 <= min_index < max_index <= schedule.NUM_TIMESTEPS:
            raise ValueError(
                f"need 0 <= min_index < max_index <= {schedule.NUM_TIMESTEPS}, "
                f"got min_index={min_index}, max_index={max_index}"
            )
        idx = jax.random.randint(rng, (batch_size,), min_index, max_index)
        return schedule.index_to_sigma(idx)
    if method == "edm":
        return jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch_size,), jnp.float32))
    raise ValueError(f"unknown sigma sampling {method!r}; valid: {SIGMA_SAMPLING}")


def loss_weighting(name: str, sigma, sigma_data: float = 0.5) -> jnp.ndarray:
    """w(sigma) of sgm denoiser_weighting.py: eps sigma^-2, edm (s^2+sd^2)/(s*sd)^2, v = edm with sd=1,
    unit 1."""
    sigma = jnp.asarray(sigma, jnp.float32)
    if name == "eps":
        return sigma**-2.0
    if name == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if name == "v":
        return (sigma**2 + 1.0) / sigma**2
    if name == "unit":
        return jnp.ones_like(sigma)
    raise ValueError(f"unknown loss weighting {name!r}; valid: {WEIGHTINGS}")


def add_offset_noise(rng, noise, level: float):
    """noise + level * N(0, 1) of shape (B, C), broadcast over H and W (NHWC).

    SPEC.md / SDXL stage 3 (level 0.05): a per-sample, per-channel constant lets the model change an
    image's mean brightness, which pure i.i.d. noise barely perturbs at high sigma.
    """
    if level == 0.0:
        return noise
    shape = (noise.shape[0],) + (1,) * (noise.ndim - 2) + (noise.shape[-1],)
    return noise + level * jax.random.normal(rng, shape, noise.dtype)


def diffusion_loss(
    denoise_fn: Callable,
    x0,
    rng,
    *,
    parameterization: str,
    weighting: str | None,
    loss_type: str = "l2",
    sigma_sampling: str = "discrete",
    min_index: int = 0,
    max_index: int = schedule.NUM_TIMESTEPS,
    offset_noise: float = 0.0,
):
    """Per-sample loss (B,) and aux {"sigma": (B,)} for clean latents x0 (B, H, W, C).

    denoise_fn(x_noisy, sigma) returns D (the caller closes over the conditioning, e.g. a make_denoiser
    of the same `parameterization`). weighting None picks the parameterization's own (eps -> eps,
    v / v_edm_noise -> v, edm -> edm). The loss is computed in float32.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; valid: {PARAMETERIZATIONS}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; valid: {LOSS_TYPES}")
    weighting = DEFAULT_WEIGHTING[parameterization] if weighting is None else weighting
    sigma_rng, noise_rng, offset_rng = jax.random.split(rng, 3)
    x0 = x0.astype(jnp.float32)
    sigma = sample_sigmas(sigma_rng, x0.shape[0], sigma_sampling, min_index, max_index)
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    noise = add_offset_noise(offset_rng, noise, offset_noise)
    per_sample = (-1,) + (1,) * (x0.ndim - 1)
    x_noisy = x0 + noise * sigma.reshape(per_sample)
    error = denoise_fn(x_noisy, sigma).astype(jnp.float32) - x0
    error = error**2 if loss_type == "l2" else jnp.abs(error)
    w = loss_weighting(weighting, sigma).reshape(per_sample)
    loss = jnp.mean(w * error, axis=tuple(range(1, x0.ndim)))
    return loss, {"sigma": sigma}
