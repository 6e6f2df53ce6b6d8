"""Autoencoder losses against the taming/ldm formulas written in PyTorch (autograd for the adaptive
weight), on tiny rendered shapes; the discriminator start-step schedule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdxl_jax.autoencoder import losses
from sdxl_jax.autoencoder.discriminator import PRESETS, NLayerDiscriminator
from sdxl_jax.convert.common import conv_to_flax, conv_to_torch
from sdxl_jax.data import shapes
from sdxl_jax.models import layers
from sdxl_jax.models import vae as vae_lib

KL_WEIGHT, DISC_WEIGHT, LOGVAR, L2 = 1e-3, 0.5, 0.1, 0.5


def shapes_batch(n=2, side=16):
    """Rendered shapes as images in [-1, 1] (B, side, side, 3)."""
    rows = [("circle", "red", "blue"), ("square", "yellow", "green"), ("triangle", "white", "black")]
    imgs = [shapes.render(*rows[i % 3], side, side, size=0.3) for i in range(n)]
    return np.stack(imgs).astype(np.float32) / 127.5 - 1.0


class TinyDecoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        h = nn.silu(layers.conv(8, 3, name="conv_in")(z))
        return layers.conv(3, 3, name="conv_out")(h)


def _torch_reference(images, z, mean, logvar, dec_w, disc_w):
    """ldm LPIPSWithDiscriminator (optimizer_idx 0) on a two-conv decoder and a one-conv 'discriminator'."""
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)
    x, zt = t(images).permute(0, 3, 1, 2), t(z).permute(0, 3, 1, 2)
    w_in, b_in, w_out, b_out = (t(a).requires_grad_() for a in dec_w)
    recon = torch.nn.functional.conv2d(torch.nn.functional.silu(
        torch.nn.functional.conv2d(zt, w_in, b_in, padding=1)), w_out, b_out, padding=1)
    d = x - recon
    p_loss = (d**2).mean(dim=(1, 2, 3), keepdim=True) * 3.0  # stand-in perceptual term, (B, 1, 1, 1)
    rec_loss = torch.abs(d) + L2 * d**2 + 1.0 * p_loss
    nll_loss = rec_loss / np.exp(LOGVAR) + LOGVAR
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    m, lv = t(mean), t(logvar)
    kl = 0.5 * torch.sum(m**2 + torch.exp(lv) - 1.0 - lv, dim=[1, 2, 3])
    kl_loss = torch.sum(kl) / kl.shape[0]
    logits_fake = torch.nn.functional.conv2d(recon, t(disc_w), stride=2)
    g_loss = -torch.mean(logits_fake)
    nll_grads = torch.autograd.grad(nll_loss, w_out, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, w_out, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    d_weight = torch.clamp(d_weight, 0.0, 1e4).detach() * DISC_WEIGHT
    loss = nll_loss + KL_WEIGHT * kl_loss + d_weight * 1.0 * g_loss
    grads = torch.autograd.grad(loss, [w_in, w_out])
    return loss.detach().item(), d_weight.item(), [conv_to_flax(g.numpy()) for g in grads]


def test_generator_loss_and_adaptive_weight_match_reference():
    images = shapes_batch()
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    mean, logvar = rng.normal(size=(2, 4, 4, 4)), rng.normal(size=(2, 4, 4, 4)) * 0.5
    dec = TinyDecoder()
    params = dec.init(jax.random.key(0), z)["params"]
    params = jax.tree.map(np.asarray, nn.meta.unbox(params))
    params["conv_in"]["bias"] = (rng.normal(size=8) * 0.1).astype(np.float32)
    disc_kernel = (rng.normal(size=(4, 4, 3, 1)) * 0.1).astype(np.float32)  # HWIO
    mean, logvar = mean.astype(np.float32), logvar.astype(np.float32)

    def total(params):
        # The reference's last layer is decoder.conv_out.weight: the kernel, not the bias.
        def decode(kernel):
            return dec.apply({"params": {**params, "conv_out": {**params["conv_out"], "kernel": kernel}}}, z)

        recon, last_vjp = jax.vjp(decode, params["conv_out"]["kernel"])
        nll_of = lambda r: losses.reconstruction_loss(
            images, r, l1_weight=1.0, l2_weight=L2, perceptual_weight=1.0, logvar=LOGVAR,
            perceptual=jnp.mean(jnp.square(images - r), axis=(1, 2, 3)) * 3.0)
        g_of = lambda r: losses.generator_adversarial_loss(jax.lax.conv_general_dilated(
            r, disc_kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        nll, g = nll_of(recon), g_of(recon)
        d_weight = losses.adaptive_weight_from_grads(
            losses.last_layer_grad(last_vjp, nll_of, recon), losses.last_layer_grad(last_vjp, g_of, recon),
            DISC_WEIGHT)
        # The function-of-the-last-layer form agrees with the shared-forward form.
        d_weight_fn = losses.adaptive_weight(
            lambda w: nll_of(decode(w)), lambda w: g_of(decode(w)), params["conv_out"]["kernel"],
            DISC_WEIGHT)
        loss = losses.generator_objective(
            nll, losses.kl_loss(jnp.asarray(mean), jnp.asarray(logvar)), g, d_weight, step=10,
            kl_weight=KL_WEIGHT, disc_factor=1.0, disc_start=10)
        return loss, (d_weight, d_weight_fn)

    (loss, (d_weight, d_weight_fn)), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)

    dec_w = [conv_to_torch(params["conv_in"]["kernel"]), params["conv_in"]["bias"],
             conv_to_torch(params["conv_out"]["kernel"]), params["conv_out"]["bias"]]
    want_loss, want_dw, want_grads = _torch_reference(images, z, mean, logvar, dec_w,
                                                      conv_to_torch(disc_kernel))
    # JAX in fp32 against the reference in fp64.
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(d_weight), want_dw, rtol=1e-4)
    np.testing.assert_allclose(float(d_weight_fn), want_dw, rtol=1e-4)
    for got, want in zip((grads["conv_in"]["kernel"], grads["conv_out"]["kernel"]), want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert 0 < float(d_weight) < 1e4 * DISC_WEIGHT


def test_hinge_and_generator_adversarial_loss():
    real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.5])
    # real: relu(1 - [2, .5]) = [0, .5] -> .25; fake: relu(1 + [-2, .5]) = [0, 1.5] -> .75
    assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5)
    assert float(losses.hinge_d_loss(jnp.full(3, 1.5), jnp.full(3, -1.5))) == 0.0
    assert float(losses.generator_adversarial_loss(fake)) == pytest.approx(0.75)


def test_kl_and_reconstruction_reductions():
    rng = np.random.default_rng(1)
    mean, logvar = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(3, 2, 2, 4))
    want = np.mean(np.asarray(vae_lib.kl_divergence(jnp.asarray(mean), jnp.asarray(logvar))))
    assert float(losses.kl_loss(jnp.asarray(mean), jnp.asarray(logvar))) == pytest.approx(want, rel=1e-5)
    assert float(losses.kl_loss(jnp.zeros((2, 2, 2, 4)), jnp.zeros((2, 2, 2, 4)))) == 0.0
    x = jnp.asarray(shapes_batch(2, 8))
    # sum over pixels, mean over batch: a constant error of 0.1 costs 0.1 * 8 * 8 * 3 per image.
    assert float(losses.reconstruction_loss(x, x + 0.1)) == pytest.approx(0.1 * 192, rel=1e-5)
    assert float(losses.reconstruction_loss(x, x + 0.1, l1_weight=0.0, l2_weight=1.0)) == pytest.approx(
        0.01 * 192, rel=1e-4)


def test_adopt_weight_schedule_under_jit():
    f = jax.jit(lambda step: losses.adopt_weight(0.8, step, 100))
    assert [float(f(s)) for s in (0, 99, 100, 5000)] == [0.0, 0.0, pytest.approx(0.8), pytest.approx(0.8)]


def test_discriminator_schedule_on_shapes():
    """Before disc_start neither the discriminator nor the generator's adversarial term has any gradient;
    from disc_start on both do."""
    disc = NLayerDiscriminator(PRESETS["tiny"])
    real = jnp.asarray(shapes_batch(2, 16))
    fake = real * 0.5
    dparams = jax.jit(disc.init)(jax.random.key(0), real)["params"]

    def d_loss(dp, step):
        lr = disc.apply({"params": dp}, real)
        lf = disc.apply({"params": dp}, fake)
        return losses.discriminator_objective(lr, lf, step=step, disc_factor=1.0, disc_start=5)

    def g_loss(f, step):
        g = losses.generator_adversarial_loss(disc.apply({"params": dparams}, f))
        return losses.generator_objective(0.0, 0.0, g, 0.5, step=step, kl_weight=0.0, disc_start=5)

    @jax.jit
    def grad_norms(step):
        norm = lambda t: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t))
        return norm(jax.grad(d_loss)(dparams, step)), norm(jax.grad(g_loss)(fake, step))

    assert [float(n) for n in grad_norms(4)] == [0.0, 0.0]
    assert all(float(n) > 0.0 for n in grad_norms(5))
