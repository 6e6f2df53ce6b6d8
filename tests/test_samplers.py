"""sdxl_jax.diffusion.samplers against diffusers' schedulers, exact Gaussian solutions and sgm behaviour.

The analytic denoisers: for data N(mu, s^2) the exact denoiser is D(x, sigma) = (x s^2 + mu sigma^2) /
(s^2 + sigma^2); a two-component mixture of such Gaussians gives a nonlinear one (posterior-weighted).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.diffusion import samplers, schedule

MU, S = 0.5, 0.5


def gaussian_denoiser(x, sigma):
    sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    return (x * S**2 + MU * sigma**2) / (S**2 + sigma**2)


def mixture_denoiser(x, sigma, xp=jnp):
    """Exact D of the data 0.7 N(-1, 0.5^2) + 0.3 N(1.5, 0.5^2), elementwise; xp = jnp or np."""
    var = 0.25 + sigma**2
    comps = [(-1.0, np.log(0.7)), (1.5, np.log(0.3))]
    logits = [-((x - m) ** 2) / (2 * var) + log_w for m, log_w in comps]
    top = xp.maximum(*logits)
    w = [xp.exp(lg - top) for lg in logits]
    posterior_means = [(x * 0.25 + m * sigma**2) / var for m, _ in comps]
    return (w[0] * posterior_means[0] + w[1] * posterior_means[1]) / (w[0] + w[1])


@pytest.mark.parametrize("n", [25, 50])
@pytest.mark.parametrize("kind", ["euler", "dpmpp_2m"])
def test_matches_diffusers_schedulers(kind, n):
    """Same trajectory as diffusers' EulerDiscreteScheduler / DPMSolverMultistepScheduler (dpmsolver++,
    order 2) with "trailing" spacing, where both use the sgm timesteps t = 999, 999 - 1000/n, ...

    diffusers keeps betas in float32 (sigmas differ from our float64 ones by ~2e-6 relative), so the
    trajectories agree to ~1e-5 relative, not to float32 round-off.
    """
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    common = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="trailing",
    )  # fmt: skip
    if kind == "euler":
        sched = diffusers.EulerDiscreteScheduler(**common)
    else:
        sched = diffusers.DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False,
            final_sigmas_type="zero", lower_order_final=True,
        )  # fmt: skip
    sched.set_timesteps(n)
    np.testing.assert_array_equal(sched.timesteps.numpy(), schedule.legacy_ddpm_timesteps(n))
    sigmas = schedule.legacy_ddpm_sigmas(n)
    np.testing.assert_allclose(sched.sigmas.numpy(), sigmas, rtol=3e-6)

    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours, ours_traj = jax.jit(
        lambda z: samplers.sample(
            lambda x, s: mixture_denoiser(x, s.reshape(-1, 1, 1, 1)), z, sigmas, kind, return_trajectory=True
        )
    )(noise)

    # diffusers' Euler starts from noise * sigma_max for "trailing" spacing (init_noise_sigma); sgm and
    # SPEC.md use sqrt(1 + sigma_max^2), so both start from the same x here. diffusers' DPM-Solver
    # works on x / sqrt(1 + sigma^2) (variance preserving); we compare in our variance-exploding x.
    vp = kind == "dpmpp_2m"
    x = torch.from_numpy((noise * (1.0 if vp else np.sqrt(1 + sigmas[0] ** 2))).astype(np.float32))
    traj = []
    for i, t in enumerate(sched.timesteps):
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        sched.scale_model_input(x, t)  # only marks the call diffusers expects; the model input is unused
        x_ve = x.double().numpy() * (np.sqrt(1 + s**2) if vp else 1.0)
        eps = (x_ve - mixture_denoiser(x_ve, s, np)) / s  # epsilon prediction of the exact denoiser
        x = sched.step(torch.from_numpy(eps.astype(np.float32)), t, x).prev_sample
        traj.append(x.double().numpy() * (np.sqrt(1 + s_next**2) if vp else 1.0))
    traj = np.stack(traj)
    assert ours_traj.shape == traj.shape
    np.testing.assert_allclose(ours_traj, traj, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(ours, traj[-1], rtol=2e-5, atol=2e-5)


# Steps per sampler: first-order samplers need more for the same accuracy (their error halves per
# doubling, measured: Euler std error 10%/5%/2.6% at 20/40/80 EDM steps, Euler ancestral
# 19%/10%/4.8%/2.6%/1.7% at 20/40/80/160/320; Heun 2.2%/0.5%/0.1% at 20/40/80).
GAUSSIAN_CASES = {
    "euler": ("euler", 160, {}),
    "heun": ("heun", 40, {}),
    # EDM's stochastic Heun (Karras et al. 2022 alg. 2), gamma = 0.25 per step inside [0.05, 50].
    "heun_churn": ("heun", 80, {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    "euler_ancestral": ("euler_ancestral", 640, {}),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", 80, {}),
    "dpmpp_2m": ("dpmpp_2m", 40, {}),
    "lms": ("lms", 40, {}),
}


@pytest.mark.parametrize("case", list(GAUSSIAN_CASES))
def test_gaussian_data_mean_and_std(case):
    """Every sampler with the exact denoiser of N(0.5, 0.5^2) returns samples of that mean and std.

    The run starts from the exact marginal N(mu, s^2 + sigma_0^2) (start_from) and uses EDM sigmas down
    to 0.002, so what remains is the solver's own error: the plain N(0, 1 + sigma_0^2) start would bias
    the mean by mu * s / sigma_0 ~ 0.017, and the trailing schedule's last jump from sigma(t=19) = 0.13
    to 0 is a first-order step that shrinks the std by ~3% for s = 0.5, whatever the sampler.
    Tolerance: |mean - mu| < 0.01 and |std - s| < 2% of s, with 50000 standardized starts (the noise
    the stochastic samplers add leaves a Monte Carlo error of ~0.0022 on the mean and ~0.3% on the std).
    """
    name, steps, options = GAUSSIAN_CASES[case]
    z = np.random.default_rng(1).standard_normal((50000, 1, 1, 1))
    z = (z - z.mean()) / z.std()  # the start's own sampling error is not the sampler's
    sigmas = schedule.edm_sigmas(steps, 0.002, 14.6146)
    x = (MU + np.sqrt(S**2 + sigmas[0] ** 2) * z).astype(np.float32)

    def run(x, sigmas, rng):
        return samplers.start_from(gaussian_denoiser, x, sigmas, name, rng, **options)

    out = np.asarray(jax.jit(run)(x, sigmas, jax.random.key(2)))
    assert out.shape == x.shape and np.isfinite(out).all()
    assert abs(out.mean() - MU) < 0.01, out.mean()
    assert abs(out.std() / S - 1) < 0.02, out.std()


def test_deterministic_samplers_follow_the_exact_flow():
    """For Gaussian data the probability-flow ODE is x(sigma) = mu + (x_0 - mu) sqrt(s^2 + sigma^2) /
    sqrt(s^2 + sigma_0^2); second-order solvers track it per sample far better than Euler."""
    z = np.linspace(-3, 3, 7, dtype=np.float32).reshape(7, 1, 1, 1)
    sigmas = schedule.edm_sigmas(40, 0.002, 14.6146)
    x = MU + np.sqrt(S**2 + sigmas[0] ** 2) * z
    exact = MU + (x - MU) * S / np.sqrt(S**2 + sigmas[0] ** 2)
    names = ("euler", "heun", "dpmpp_2m", "lms")
    outs = jax.jit(lambda x: [samplers.start_from(gaussian_denoiser, x, sigmas, n) for n in names])(x)
    errors = {name: float(np.abs(out - exact).max()) for name, out in zip(names, outs, strict=True)}
    assert errors["euler"] < 0.1
    for name in ("heun", "dpmpp_2m", "lms"):
        assert errors[name] < errors["euler"] / 5, errors


def test_sample_scales_the_noise_and_start_from_does_not():
    """One Euler step to sigma = 0 returns D(x_start): with D = identity that is the start itself."""
    noise = np.random.default_rng(0).standard_normal((3, 2, 2, 4)).astype(np.float32)
    sigmas = np.array([14.6146, 0.0], np.float32)
    identity = lambda x, s: x
    start = noise * np.sqrt(1 + 14.6146**2)
    np.testing.assert_allclose(samplers.sample(identity, noise, sigmas), start, rtol=1e-6)
    np.testing.assert_allclose(samplers.start_from(identity, noise, sigmas), noise, rtol=1e-6)


def test_refiner_hand_off_continues_the_same_run():
    """Base over the first 44 steps, then start_from over the last 7 sigmas (no re-noising): for a
    one-step method that is the uninterrupted 50-step run (schedule.split_for_refiner)."""
    noise = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    sigmas = schedule.legacy_ddpm_sigmas(50)
    base, refiner = schedule.split_for_refiner(sigmas, 0.15)
    d = lambda x, s: mixture_denoiser(x, s.reshape(-1, 1, 1, 1))
    full = samplers.sample(d, noise, sigmas, "euler")
    handed = samplers.start_from(d, samplers.sample(d, noise, base, "euler"), refiner, "euler")
    np.testing.assert_allclose(handed, full, rtol=1e-5, atol=1e-6)


def test_one_compiled_program():
    """The whole run is one XLA program: one scan whose body traces the denoiser once, for any n."""
    calls = []

    def denoise(x, sigma):
        calls.append(sigma.shape)
        return gaussian_denoiser(x, sigma)

    noise = jnp.zeros((2, 4, 4, 4))
    for n in (10, 50):
        calls.clear()
        sigmas = schedule.legacy_ddpm_sigmas(n)
        jaxpr = jax.make_jaxpr(lambda z, sigmas=sigmas: samplers.sample(denoise, z, sigmas))(noise)
        assert calls == [(2,)]  # traced once (a Python loop would trace it n times), sigma per sample
        assert str(jaxpr).count("scan[") == 1
    hlo = jax.jit(lambda z: samplers.sample(denoise, z, schedule.legacy_ddpm_sigmas(50), "heun")).lower(noise)
    assert "while" in hlo.as_text()


def test_cfg_denoiser_uncond_first():
    seen = {}

    def batched(x2, s2):
        seen["x2"], seen["s2"] = x2, s2
        # uncond rows (first half) predict 0, cond rows predict 2 x
        return x2 * jnp.concatenate([jnp.zeros(2), jnp.full(2, 2.0)]).reshape(-1, 1, 1, 1)

    x = jnp.arange(2 * 3 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 3, 4)
    out = samplers.cfg_denoiser(batched, 5.0)(x, jnp.float32(3.0))
    np.testing.assert_array_equal(seen["x2"], jnp.concatenate([x, x]))
    np.testing.assert_array_equal(seen["s2"], [3.0] * 4)
    np.testing.assert_allclose(out, 5.0 * 2 * x)  # D_u + 5 (D_c - D_u) with D_u = 0, D_c = 2x


def test_churn_only_inside_its_sigma_window():
    noise = jnp.ones((2, 2, 2, 1))
    sigmas = schedule.legacy_ddpm_sigmas(10)
    plain = samplers.sample(gaussian_denoiser, noise, sigmas, "euler")
    # No sigma of the schedule lies in [20, 30]: gamma is 0 everywhere and the run is deterministic.
    outside = samplers.sample(gaussian_denoiser, noise, sigmas, "euler", jax.random.key(0), s_churn=5.0,
                              s_tmin=20.0, s_tmax=30.0)  # fmt: skip
    np.testing.assert_allclose(outside, plain, rtol=1e-6)
    inside = samplers.sample(gaussian_denoiser, noise, sigmas, "euler", jax.random.key(0), s_churn=5.0,
                             s_tmin=0.5, s_tmax=5.0)  # fmt: skip
    assert np.isfinite(inside).all() and not np.allclose(inside, plain)


def test_ancestral_samplers_use_rng():
    noise = jnp.ones((2, 2, 2, 1))
    sigmas = schedule.legacy_ddpm_sigmas(5)
    run = jax.jit(samplers.sample, static_argnums=(0, 3))
    a = run(gaussian_denoiser, noise, sigmas, "euler_ancestral", jax.random.key(0))
    b = run(gaussian_denoiser, noise, sigmas, "euler_ancestral", jax.random.key(0))
    c = run(gaussian_denoiser, noise, sigmas, "euler_ancestral", jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_bad_arguments_name_the_valid_ones():
    noise, sigmas = jnp.zeros((1, 2, 2, 1)), schedule.legacy_ddpm_sigmas(3)
    with pytest.raises(ValueError, match="valid: .*dpmpp_2m"):
        samplers.sample(gaussian_denoiser, noise, sigmas, "ddim")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['order'\].*valid: \['eta', 's_noise'\]"):
        samplers.sample(gaussian_denoiser, noise, sigmas, "euler_ancestral", jax.random.key(0), order=2)
    for name, opts in [("euler_ancestral", {}), ("dpmpp_2s_ancestral", {}), ("euler", {"s_churn": 1.0})]:
        with pytest.raises(ValueError, match="pass rng="):
            samplers.sample(gaussian_denoiser, noise, sigmas, name, **opts)
    with pytest.raises(ValueError, match="lms order"):
        samplers.sample(gaussian_denoiser, noise, sigmas, "lms", order=0)
