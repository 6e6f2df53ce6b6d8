"""The denoiser D(x, sigma) around a network, with the preconditioning of Karras et al. 2022 (EDM).

SPEC.md "Diffusion objective": D(x, sigma) = net(x * c_in, c_noise, cond) * c_out + x * c_skip.
SDXL is an eps model on the discrete 1000-step schedule: sgm DiscreteDenoiser quantizes sigma to the
nearest training sigma and hands the network its integer index as the timestep.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from sdxl_jax.diffusion import schedule

PARAMETERIZATIONS = ("eps", "v", "edm", "v_edm_noise")
# The network of these takes a timestep index 0..999 (sgm EpsScaling / VScaling + DiscreteDenoiser).
DISCRETE_PARAMETERIZATIONS = ("eps", "v")


def _check(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; valid: {PARAMETERIZATIONS}")


def scalings(parameterization: str, sigma, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of sgm denoiser_scaling.py, elementwise in `sigma`.

    eps (EpsScaling), v (VScaling), edm (EDMScaling, sigma_data) and v_edm_noise
    (VScalingWithEDMcNoise: v's c_skip/c_out/c_in with EDM's c_noise = ln(sigma) / 4). For eps and v
    c_noise is sigma itself; make_denoiser replaces it by the timestep index when quantizing.
    """
    _check(parameterization)
    sigma = jnp.asarray(sigma, jnp.float32)
    if parameterization == "edm":
        sd2 = sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sd2)
        c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
        return c_skip, c_out, c_in, 0.25 * jnp.log(sigma)
    c_in = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    if parameterization == "eps":
        return jnp.ones_like(sigma), -sigma, c_in, sigma
    c_skip = 1.0 / (sigma**2 + 1.0)
    c_out = -sigma * c_in
    c_noise = sigma if parameterization == "v" else 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def make_denoiser(
    net_fn: Callable, parameterization: str, quantize: bool | None = None, sigma_data: float = 0.5
) -> Callable:
    """Returns D(x, sigma, *cond) = net_fn(x * c_in, c_noise, *cond) * c_out + x * c_skip.

    `sigma` is a scalar or per-sample (B,) and is broadcast over the trailing (H, W, C) axes of x.
    quantize (default: True for the discrete "eps" / "v" models, False otherwise): snap sigma to the
    nearest of the 1000 training sigmas before scaling (sgm DiscreteDenoiser). For "eps" / "v" c_noise
    is then the int32 timestep index the UNet expects; for "edm" / "v_edm_noise" it stays ln(sigma)/4
    of the snapped sigma (sgm DiscreteDenoiser with quantize_c_noise=False).
    The network's output is combined in float32 (or x's dtype if wider), whatever its compute dtype.
    """
    _check(parameterization)
    if quantize is None:
        quantize = parameterization in DISCRETE_PARAMETERIZATIONS

    def denoise(x, sigma, *cond):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        if quantize:
            index = schedule.sigma_to_index(sigma)
            sigma = schedule.index_to_sigma(index)
        c_skip, c_out, c_in, c_noise = scalings(parameterization, sigma, sigma_data)
        if quantize and parameterization in DISCRETE_PARAMETERIZATIONS:
            c_noise = index
        per_sample = (-1,) + (1,) * (x.ndim - 1)
        c_skip, c_out, c_in = (c.reshape(per_sample) for c in (c_skip, c_out, c_in))
        out = net_fn(x * c_in.astype(x.dtype), c_noise, *cond)
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        return out.astype(dtype) * c_out + x.astype(dtype) * c_skip

    return denoise
