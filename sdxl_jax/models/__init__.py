"""Flax Linen modules: UNet, VAE, CLIP text encoders (NHWC, logical axis names on every param)."""
