"""Samplers over a denoiser D(x, sigma), each run compiled as ONE XLA program (lax.scan over steps).

The update rules are those of sgm sgm/modules/diffusionmodules/sampling.py (ported there from
k-diffusion): EulerEDMSampler, HeunEDMSampler, EulerAncestralSampler, DPMPP2SAncestralSampler,
DPMPP2MSampler and LinearMultistepSampler, in the variance-exploding form x = x0 + sigma * eps.

    sigmas = schedule.legacy_ddpm_sigmas(50)                 # descending, final 0
    x = sample(cfg_denoiser(d_batched, 5.0), noise, sigmas, "euler")
    x = start_from(d_refiner, x_base, refiner_sigmas, "euler")   # refiner hand-off, no re-noising

denoise_fn(x, sigma) gets x (B, ...) in float32 and sigma as a (B,) float32 array (every sample at the
same noise level, sgm's `s_in * sigma`). Options are Python numbers (static); the sigmas may be traced,
only their length is static. The solver state is float32 whatever the dtype of the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
_ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}
# Options per sampler with sgm's class defaults (EDMSampler s_tmax is inf; the demo UI shows 999).
SAMPLERS = {
    "euler": _CHURN,
    "heun": _CHURN,
    "euler_ancestral": _ANCESTRAL,
    "dpmpp_2s_ancestral": _ANCESTRAL,
    "dpmpp_2m": {},
    "lms": {"order": 4},
}


def _options(sampler: str, options: dict) -> dict:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {sorted(SAMPLERS)}")
    unknown = set(options) - set(SAMPLERS[sampler])
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for sampler {sampler!r}; valid: {sorted(SAMPLERS[sampler])}"
        )
    opts = {**SAMPLERS[sampler], **options}
    if sampler == "lms" and (int(opts["order"]) != opts["order"] or opts["order"] < 1):
        raise ValueError(f"lms order must be a positive integer, got {opts['order']}")
    return opts


def _is_stochastic(sampler: str, opts: dict) -> bool:
    if sampler in ("euler", "heun"):
        return opts["s_churn"] > 0
    if sampler in ("euler_ancestral", "dpmpp_2s_ancestral"):
        return opts["eta"] > 0 and opts["s_noise"] > 0
    return False


def sample(
    denoise_fn: Callable,
    noise,
    sigmas,
    sampler: str = "euler",
    rng=None,
    *,
    return_trajectory: bool = False,
    **options,
):
    """Samples from unscaled N(0, 1) `noise`: starts at x = noise * sqrt(1 + sigma_0^2) (SPEC.md, sgm
    prepare_sampling_loop) and steps through `sigmas` (descending, usually ending in 0).

    sampler: euler (s_churn, s_tmin, s_tmax, s_noise), heun (same), euler_ancestral (eta, s_noise),
    dpmpp_2s_ancestral (eta, s_noise), dpmpp_2m, lms (order). Stochastic runs (ancestral with eta > 0,
    euler/heun with s_churn > 0) need `rng`. Returns x (float32), or (x, xs) with return_trajectory,
    xs[i] being x after step i.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    x = jnp.asarray(noise, jnp.float32) * jnp.sqrt(1.0 + sigmas[0] ** 2)
    return start_from(denoise_fn, x, sigmas, sampler, rng, return_trajectory=return_trajectory, **options)


def start_from(
    denoise_fn: Callable,
    x,
    sigmas,
    sampler: str = "euler",
    rng=None,
    *,
    return_trajectory: bool = False,
    **options,
):
    """Like `sample`, but continues from `x` as given, with no rescaling: x must already be at noise
    level sigmas[0]. img2img passes encoded_latent + noise * sigmas[0]; the refiner hand-off passes the
    base's latent as is (sgm do_img2img with add_noise=False; see schedule.split_for_refiner).
    """
    opts = _options(sampler, options)
    if rng is None and _is_stochastic(sampler, opts):
        raise ValueError(f"sampler {sampler!r} with options {opts} is stochastic: pass rng=")
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError(f"sigmas must be a 1-D array of at least one sigma, got shape {sigmas.shape}")
    x = jnp.asarray(x, jnp.float32)
    num_steps = sigmas.shape[0] - 1
    batch = x.shape[0]

    def denoise(x, sigma):
        return denoise_fn(x, jnp.full((batch,), sigma, jnp.float32)).astype(jnp.float32)

    init, body = _STEPS[sampler](denoise, sigmas, num_steps, opts, x)
    keys = None if rng is None else jax.random.split(rng, num_steps)

    def scan_body(carry, xs):
        carry = body(carry, *xs)
        return carry, (carry[0] if return_trajectory else None)

    carry, xs = jax.lax.scan(scan_body, init, (jnp.arange(num_steps), keys), length=num_steps)
    return (carry[0], xs) if return_trajectory else carry[0]


def cfg_denoiser(denoise_batched: Callable, scale: float) -> Callable:
    """Classifier-free guidance (sgm VanillaCFG): one doubled batch [uncond, cond], uncond first.

    denoise_batched(x2, sigma2) sees x2 = concat([x, x]) and sigma2 = concat([sigma, sigma]) and closes
    over the matching conditioning (uncond rows first); returns D_u + scale * (D_c - D_u).
    """

    def denoise(x, sigma):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        out = denoise_batched(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]))
        d_u, d_c = jnp.split(out, 2)
        return d_u + scale * (d_c - d_u)

    return denoise


def _normal(key, x):
    return jax.random.normal(key, x.shape, x.dtype)


def _euler_heun(heun: bool):
    def steps(denoise, sigmas, num_steps, opts, x0):
        # sgm EDMSampler: churn gamma = min(s_churn / num_steps, sqrt(2) - 1) inside [s_tmin, s_tmax].
        gamma_max = min(opts["s_churn"] / max(num_steps, 1), math.sqrt(2.0) - 1.0)
        churn = opts["s_churn"] > 0

        def body(carry, i, key):
            (x,) = carry
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            gamma = jnp.where((sigma >= opts["s_tmin"]) & (sigma <= opts["s_tmax"]), gamma_max, 0.0)
            sigma_hat = sigma * (gamma + 1.0)
            if churn:
                # sqrt(sigma_hat^2 - sigma^2) written so that it is exactly 0 at gamma = 0: XLA's fused
                # multiply-add leaves a residue of ~1e-3 sigma in the literal form.
                churn_std = sigma * jnp.sqrt(gamma * (gamma + 2.0))
                x = x + _normal(key, x) * opts["s_noise"] * churn_std
            d = (x - denoise(x, sigma_hat)) / sigma_hat
            dt = sigma_next - sigma_hat
            x_euler = x + d * dt
            if not heun:
                return (x_euler,)

            def correct(_):
                d_new = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
                return x + (d + d_new) / 2.0 * dt

            # Heun's second evaluation is skipped where sigma_next = 0 (division by it), as in sgm.
            return (jax.lax.cond(sigma_next > 0, correct, lambda _: x_euler, None),)

        return (x0,), body

    return steps


def _ancestral_step(sigma, sigma_next, eta):
    # sgm get_ancestral_step: split the step into a deterministic part down to sigma_down and fresh
    # noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.
    variance = jnp.maximum(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)
    sigma_up = jnp.minimum(sigma_next, eta * jnp.sqrt(variance))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def _ancestral(dpmpp_2s: bool):
    def steps(denoise, sigmas, num_steps, opts, x0):
        eta, s_noise = opts["eta"], opts["s_noise"]
        stochastic = _is_stochastic("euler_ancestral", opts)

        def body(carry, i, key):
            (x,) = carry
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
            denoised = denoise(x, sigma)
            x_euler = x + (x - denoised) / sigma * (sigma_down - sigma)
            if dpmpp_2s:

                def second_order(_):
                    # DPM-Solver++(2S): one midpoint evaluation in t = -log(sigma).
                    h = jnp.log(sigma) - jnp.log(sigma_down)
                    sigma_mid = sigma * jnp.exp(-0.5 * h)
                    x2 = (sigma_mid / sigma) * x - jnp.expm1(-0.5 * h) * denoised
                    return (sigma_down / sigma) * x - jnp.expm1(-h) * denoise(x2, sigma_mid)

                x_euler = jax.lax.cond(sigma_down > 0, second_order, lambda _: x_euler, None)
            if stochastic:
                noise = _normal(key, x) * s_noise * sigma_up
                x_euler = jnp.where(sigma_next > 0, x_euler + noise, x_euler)
            return (x_euler,)

        return (x0,), body

    return steps


def _dpmpp_2m(denoise, sigmas, num_steps, opts, x0):
    def body(carry, i, key):
        x, old_denoised = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        last = sigma_next <= 0
        safe_next = jnp.where(last, 1.0, sigma_next)
        # t = -log(sigma); at sigma_next = 0, h = inf and the update is exactly x = denoised.
        h = jnp.where(last, jnp.inf, jnp.log(sigma) - jnp.log(safe_next))
        ratio = jnp.where(last, 0.0, sigma_next / sigma)
        x_standard = ratio * x - jnp.expm1(-h) * denoised
        # Second order (multistep) except on the first step and where sigma_next = 0 (sgm DPMPP2MSampler).
        advanced = (i > 0) & ~last
        h_last = jnp.log(sigmas[jnp.maximum(i - 1, 0)]) - jnp.log(sigma)
        half_inv_r = jnp.where(advanced, h / (2.0 * jnp.where(advanced, h_last, 1.0)), 0.0)
        denoised_d = (1.0 + half_inv_r) * denoised - half_inv_r * old_denoised
        x_advanced = ratio * x - jnp.expm1(-h) * denoised_d
        return jnp.where(advanced, x_advanced, x_standard), denoised

    return (x0, jnp.zeros_like(x0)), body


def lms_coefficients(sigmas, order: int) -> jnp.ndarray:
    """(num_steps, order) linear multistep weights: coeff[i, j] multiplies the derivative of step i - j.

    sgm linear_multistep_coeff integrates the Lagrange basis polynomial over [sigma_i, sigma_{i+1}] with
    scipy quad; the basis has degree < order, so Gauss-Legendre with `order` nodes is exact, and this
    stays jnp (traced sigmas). The order ramps up as min(i + 1, order); unused weights are 0.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num_steps = sigmas.shape[0] - 1
    i = jnp.arange(num_steps)[:, None, None]
    j = jnp.arange(order)[None, :, None]
    k = jnp.arange(order)[None, None, :]
    cur = jnp.minimum(i + 1, order)
    t_j = sigmas[jnp.maximum(i - j, 0)]  # (n, order, 1)
    t_k = sigmas[jnp.maximum(i - k, 0)]  # (n, 1, order)
    valid = (k != j) & (k < cur)
    denom = jnp.where(valid, t_j - t_k, 1.0)
    nodes, weights = np.polynomial.legendre.leggauss(order)
    start, stop = sigmas[:-1], sigmas[1:]
    half = ((stop - start) / 2.0)[:, None, None, None]
    tau = ((stop + start) / 2.0)[:, None, None, None] + half * jnp.asarray(nodes, jnp.float32)
    factors = jnp.where(valid[..., None], (tau - t_k[..., None]) / denom[..., None], 1.0)
    basis = jnp.prod(factors, axis=2)  # (n, order, nodes)
    coeff = jnp.sum(basis * jnp.asarray(weights, jnp.float32), axis=-1) * half[:, :, 0, 0]
    return jnp.where(j[..., 0] < cur[..., 0], coeff, 0.0)


def _lms(denoise, sigmas, num_steps, opts, x0):
    order = int(opts["order"])
    coeffs = lms_coefficients(sigmas, order)

    def body(carry, i, key):
        x, ds = carry
        sigma = sigmas[i]
        d = (x - denoise(x, sigma)) / sigma
        ds = jnp.concatenate([d[None], ds[:-1]])  # most recent first
        x = x + jnp.tensordot(coeffs[i], ds, axes=1)
        return x, ds

    return (x0, jnp.zeros((order,) + x0.shape, x0.dtype)), body


_STEPS = {
    "euler": _euler_heun(heun=False),
    "heun": _euler_heun(heun=True),
    "euler_ancestral": _ancestral(dpmpp_2s=False),
    "dpmpp_2s_ancestral": _ancestral(dpmpp_2s=True),
    "dpmpp_2m": _dpmpp_2m,
    "lms": _lms,
}
