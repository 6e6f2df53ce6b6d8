"""PatchGAN discriminator for autoencoder training (taming-transformers `NLayerDiscriminator`), NHWC.

Layout as the reference (pix2pix PatchGAN): conv4x4 stride 2 + LeakyReLU(0.2); then n_layers - 1 times
conv4x4 stride 2 + norm + LeakyReLU with ndf * min(2^n, 8) channels; conv4x4 stride 1 + norm + LeakyReLU;
conv4x4 stride 1 to one logit per patch; every conv pads 1. A 256x256 image gives 30x30 logits with the
default n_layers=3 (receptive field 70x70). Weights start N(0, 0.02) as the reference's `weights_init`.

Norm: the reference uses BatchNorm, whose running statistics would be mutable state threaded through
the train step and whose batch statistics would depend on how the batch is sharded. We use GroupNorm
(per sample, fp32 statistics, no state; `norm="group"`) or no norm (`norm="none"`). Our conv helper
always has a bias, so the convs before a norm keep one (the reference drops it there); with GroupNorm
it is not fully redundant and costs nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sdxl_jax.models import layers
from sdxl_jax.models.layers import IMAGE_AXES

NORMS = ("group", "none")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    ndf: int = 64  # channels of the first conv
    n_layers: int = 3  # stride-2 convs; the patch grows with each
    norm: str = "group"
    norm_groups: int = 32
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"discriminator norm {self.norm!r} unknown; choose one of {NORMS}")
        if self.n_layers < 1:
            raise ValueError(f"discriminator n_layers must be >= 1, got {self.n_layers}")
        bad = [c for c in self.channels[1:] if c % self.norm_groups]
        if self.norm == "group" and bad:
            raise ValueError(f"discriminator channels {self.channels[1:]} must be multiples of "
                             f"norm_groups={self.norm_groups}; change ndf={self.ndf} or norm_groups")

    @property
    def channels(self) -> tuple[int, ...]:
        """Output channels of the convs before the final 1-channel one."""
        return tuple(self.ndf * min(2**n, 8) for n in range(self.n_layers + 1))


PRESETS = {
    "default": DiscriminatorConfig(),
    "tiny": DiscriminatorConfig(ndf=16, n_layers=2, norm_groups=8),
}


class NLayerDiscriminator(nn.Module):
    """Images (B, H, W, C) in [-1, 1] -> patch logits (B, h, w, 1), fp32."""

    config: DiscriminatorConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        init = nn.initializers.normal(0.02)
        x = x.astype(kw["dtype"])
        for i, ch in enumerate(cfg.channels):
            stride = 2 if i < cfg.n_layers else 1
            x = layers.conv(ch, 4, strides=stride, padding=1, kernel_init=init, name=f"conv_{i}", **kw)(x)
            if i > 0 and cfg.norm == "group":
                x = layers.GroupNorm(num_groups=cfg.norm_groups, name=f"norm_{i}", **kw)(x)
            x = nn.leaky_relu(x, 0.2)
            x = nn.with_logical_constraint(x, IMAGE_AXES)
        x = layers.conv(1, 4, padding=1, kernel_init=init, name="conv_out", **kw)(x)
        return x.astype(jnp.float32)
