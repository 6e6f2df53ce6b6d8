"""Autoencoder training losses as pure functions of arrays (the LDM / SDXL autoencoder recipe).

Behaviour follows taming-transformers `LPIPSWithDiscriminator` / `hinge_d_loss` / `adopt_weight` and
sgm `GeneralLPIPSWithDiscriminator` + `DiagonalGaussianRegularizer`:

    generator:  nll + kl_weight * KL + adaptive_weight * adopt_weight(disc_factor, step, disc_start) * g_loss
    nll         = sum over pixels of (l1 * |x - x'| + l2 * (x - x')^2 + perceptual_weight * LPIPS(x, x')),
                  mean over the batch (LPIPS, one number per image, is broadcast to every pixel as in
                  the reference, so it weighs H*W*C times)
    KL          = sum over latent dims of KL(N(mean, exp(logvar)) || N(0, 1)), mean over the batch
    g_loss      = -mean(discriminator logits of the reconstruction)
    discriminator: adopt_weight(disc_factor, step, disc_start) * hinge(logits_real, logits_fake)

Reduction: we keep the reference's "sum over elements, mean over batch" for both the reconstruction
and the KL, so its published weights keep their meaning (kl_weight 1e-6, disc_weight 0.5, disc_start
50001 in the SD/SDXL autoencoder configs) and the KL/reconstruction balance does not change with
resolution. The loss value therefore scales with the image area; Adam does not care.
The reference's learned scalar `logvar` (initialised 0, divides the reconstruction term) is the
`logvar` argument; pass 0.0 (the default) to leave it out.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def adopt_weight(weight, step, start: int, value: float = 0.0):
    """`value` before `start` steps, `weight` from step `start` on (taming `adopt_weight`: the
    discriminator and its loss stay off until the autoencoder reconstructs reasonably)."""
    return jnp.where(jnp.asarray(step) < start, value, weight)


def reconstruction_loss(
    images, recon, *, l1_weight: float = 1.0, l2_weight: float = 0.0, perceptual=None,
    perceptual_weight: float = 0.0, logvar=0.0,
):
    """Per-pixel l1 * |x - x'| + l2 * (x - x')^2 (+ perceptual_weight * perceptual, a (B,) LPIPS
    distance broadcast to every pixel), divided by exp(logvar) plus logvar, summed per image and
    averaged over the batch. images, recon: (B, H, W, C) fp32."""
    diff = images.astype(jnp.float32) - recon.astype(jnp.float32)
    rec = l1_weight * jnp.abs(diff) + l2_weight * jnp.square(diff)
    if perceptual is not None and perceptual_weight:
        rec = rec + perceptual_weight * perceptual.reshape(-1, 1, 1, 1)
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / images.shape[0]


def kl_loss(mean, logvar):
    """KL of the diagonal Gaussian posterior to N(0, I): summed over (h, w, c), mean over the batch."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))
    return jnp.mean(kl)


def hinge_d_loss(logits_real, logits_fake):
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) (taming `hinge_d_loss`)."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def generator_adversarial_loss(logits_fake):
    """-mean(logits of the reconstruction): the generator pushes the discriminator's score up."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def adaptive_weight_from_grads(grad_rec, grad_gan, disc_weight: float = 1.0, max_weight: float = 1e4):
    """disc_weight * clip(||grad_rec|| / (||grad_gan|| + 1e-4), 0, max_weight), gradient stopped
    (taming `calculate_adaptive_weight`). The grads are those of the reconstruction (nll) loss and of
    the generator adversarial loss w.r.t. the decoder's last layer (pytrees of the same structure)."""
    w = _global_norm(grad_rec) / (_global_norm(grad_gan) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight) * disc_weight)


def adaptive_weight(
    rec_loss_fn: Callable, gan_loss_fn: Callable, last_layer, disc_weight: float = 1.0,
    max_weight: float = 1e4,
):
    """adaptive_weight_from_grads with the grads taken here: rec_loss_fn and gan_loss_fn map the last
    layer's params (`last_layer`, any pytree) to the scalar loss. Simple, but each call re-runs what the
    functions close over; `last_layer_grad` avoids that in a train step."""
    return adaptive_weight_from_grads(
        jax.grad(rec_loss_fn)(last_layer), jax.grad(gan_loss_fn)(last_layer), disc_weight, max_weight
    )


def last_layer_grad(last_layer_vjp: Callable, loss_of_output: Callable, output):
    """Gradient of loss_of_output(output) w.r.t. the last layer, through the pullback `last_layer_vjp`
    of `output, last_layer_vjp = jax.vjp(lambda w: decoder_output_with_last_layer(w), w)`. The decoder
    forward pass is shared by the loss and both adaptive-weight gradients."""
    (grad,) = last_layer_vjp(jax.grad(loss_of_output)(output))
    return grad


def generator_objective(
    nll, kl, g_loss=None, d_weight=0.0, *, step, kl_weight: float, disc_factor: float = 1.0,
    disc_start: int = 0,
):
    """nll + kl_weight * kl + d_weight * adopt_weight(disc_factor, step, disc_start) * g_loss, the
    autoencoder's objective (g_loss None: no discriminator)."""
    loss = nll + kl_weight * kl
    if g_loss is not None:
        loss = loss + d_weight * adopt_weight(disc_factor, step, disc_start) * g_loss
    return loss


def discriminator_objective(logits_real, logits_fake, *, step, disc_factor: float = 1.0, disc_start: int = 0):
    """adopt_weight(disc_factor, step, disc_start) * hinge_d_loss: zero (and zero gradient) before
    disc_start, so the discriminator does not train before the generator is asked to fool it."""
    return adopt_weight(disc_factor, step, disc_start) * hinge_d_loss(logits_real, logits_fake)
