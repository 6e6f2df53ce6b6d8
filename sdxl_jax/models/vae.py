"""The SDXL autoencoder (AutoencoderKL, f=8, 4 latent channels) in Flax Linen, NHWC.

Architecture as in sgm's `Encoder`/`Decoder` and diffusers' `AutoencoderKL` (SPEC.md, VAE): ch 128,
ch_mult (1, 2, 4, 4), 2 res blocks per encoder level (3 per decoder level), GroupNorm(32, eps 1e-6), one
single-head attention in each mid block, encoder downsampling with (0, 1, 0, 1) padding, a 1x1 quant_conv
(2z -> 2z) and post_quant_conv (z -> z), logvar clamped to [-30, 20]. Submodule names follow diffusers
(`down_blocks_0/resnets_1`, `mid_block/attentions_0/to_q`, ...) so the converters are short tables.

    vae = AutoencoderKL(PRESETS["sdxl"])
    variables = vae.init(rng, images)                       # creates every parameter
    mean, logvar = vae.apply(variables, images, method="encode")   # images NHWC in [-1, 1]
    images = vae.apply(variables, latents, method="decode")        # latents UNSCALED

The latent scale factor lives only in `VAEConfig.scaling_factor`; callers apply it:
z = scaling_factor * sample_posterior(rng, mean, logvar), and decode(z / scaling_factor).
Memory-bounded helpers at the end: `encode_batched` / `decode_batched` (sub-batches under lax.map) and
`decode_tiled` (overlapping tiles with blended seams; decode_batched switches to it above a latent area).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models import layers
from sdxl_jax.models.layers import IMAGE_AXES, TOKEN_AXES

# Every SD/SDXL autoencoder normalises with GroupNorm(32) (sgm hard-codes it, diffusers' norm_num_groups).
NORM_GROUPS = 32


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture numbers (sgm ddconfig names) plus dtypes, the latent scale and the decode tiling."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4  # sgm z_channels
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    mid_attention: bool = True
    norm_eps: float = 1e-6
    # GroupNorm groups (diffusers norm_num_groups). Small VAEs need fewer: with one channel per group,
    # GroupNorm maps a flat colour to zero and the network loses the colour it must reconstruct.
    norm_groups: int = NORM_GROUPS
    scaling_factor: float = 0.13025  # SPEC.md: z = 0.13025 * sample(posterior)
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    dtype: Any = "float32"  # compute dtype; SPEC.md: the reference runs the VAE in fp32
    param_dtype: Any = "float32"
    attention: str = "chunked"  # a layers.ATTENTION_KERNELS key (layers.dot_product_attention)
    # decode_batched switches to tiled decoding when the latent area exceeds tile_above (None: never).
    # Tile and overlap are in latent pixels; SDXL's largest buckets (64x256 latents) stay untiled.
    tile_size: int = 64
    tile_overlap: int = 16
    tile_above: int | None = 128 * 128

    def __post_init__(self):
        bad = [c for c in self.block_out_channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"VAE channels {self.block_out_channels} must be multiples of norm_groups="
                             f"{self.norm_groups}; change ch={self.ch}, ch_mult={self.ch_mult} or the groups")
        if not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(f"tile_overlap={self.tile_overlap} must be in [0, tile_size={self.tile_size})")

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


PRESETS = {
    "sdxl": VAEConfig(),
    # f=8 with 4 latent channels like SDXL, so its latents fit the tiny UNet; one res block per level;
    # 8 norm groups (4-8 channels each: GroupNorm(32) on 32 channels erases flat colours); tiles scaled
    # down so tests reach the tiled path at small sizes.
    "tiny": VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8, tile_size=16,
                      tile_overlap=4, tile_above=32 * 32),
}


def _dtypes(config: VAEConfig) -> dict:
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def _norm(cfg: VAEConfig, name: str) -> layers.GroupNorm:
    return layers.GroupNorm(cfg.norm_groups, epsilon=cfg.norm_eps, name=name, **_dtypes(cfg))


def _resnet(cfg: VAEConfig, channels: int, name: str) -> layers.ResnetBlock:
    return layers.ResnetBlock(channels, epsilon=cfg.norm_eps, num_groups=cfg.norm_groups, name=name,
                              **_dtypes(cfg))


class MidAttention(nn.Module):
    """Single-head self-attention over all pixels with a residual (sgm AttnBlock, diffusers Attention
    with heads=1): GroupNorm, q/k/v projections, softmax(q k^T / sqrt(C)) v, output projection."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, _dtypes(self.config)
        b, h, w, c = x.shape
        y = _norm(cfg, "group_norm")(x).reshape(b, h * w, c)
        y = nn.with_logical_constraint(y, TOKEN_AXES)
        q, k, v = (layers.dense(c, ("embed", "heads"), name=n, **kw)(y)[:, :, None]
                   for n in ("to_q", "to_k", "to_v"))
        o = layers.dot_product_attention(q, k, v, kernel=cfg.attention)[:, :, 0]
        o = layers.dense(c, ("heads", "embed"), name="to_out_0", **kw)(o)
        return nn.with_logical_constraint(x.astype(kw["dtype"]) + o.reshape(b, h, w, c), IMAGE_AXES)


class MidBlock(nn.Module):
    """Res block, attention, res block at the lowest resolution (diffusers UNetMidBlock2D)."""

    config: VAEConfig
    channels: int

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _resnet(cfg, self.channels, "resnets_0")(x)
        if cfg.mid_attention:
            x = MidAttention(cfg, name="attentions_0")(x)
        return _resnet(cfg, self.channels, "resnets_1")(x)


class DownBlock(nn.Module):
    """num_res_blocks res blocks, then a stride-2 downsample except at the last level (diffusers
    DownEncoderBlock2D with downsample_padding=0, i.e. pad (0, 1, 0, 1); SPEC.md)."""

    config: VAEConfig
    channels: int
    downsample: bool

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, _dtypes(self.config)
        for j in range(cfg.num_res_blocks):
            x = _resnet(cfg, self.channels, f"resnets_{j}")(x)
        if self.downsample:
            x = layers.Downsample(self.channels, asymmetric=True, name="downsamplers_0", **kw)(x)
            x = nn.with_logical_constraint(x, IMAGE_AXES)
        return x


class UpBlock(nn.Module):
    """num_res_blocks + 1 res blocks, then nearest x2 + conv except at the last level (diffusers
    UpDecoderBlock2D)."""

    config: VAEConfig
    channels: int
    upsample: bool

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, _dtypes(self.config)
        for j in range(cfg.num_res_blocks + 1):
            x = _resnet(cfg, self.channels, f"resnets_{j}")(x)
        if self.upsample:
            x = layers.Upsample(self.channels, name="upsamplers_0", **kw)(x)
            x = nn.with_logical_constraint(x, IMAGE_AXES)
        return x


class Encoder(nn.Module):
    """Images (B, H, W, 3) -> (B, H/f, W/f, 2 * latent_channels): mean | logvar before quant_conv."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, _dtypes(self.config)
        chans = cfg.block_out_channels
        x = layers.conv(chans[0], 3, name="conv_in", **kw)(x.astype(kw["dtype"]))
        for i, c in enumerate(chans):
            x = DownBlock(cfg, c, downsample=i < len(chans) - 1, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, chans[-1], name="mid_block")(x)
        x = nn.silu(_norm(cfg, "conv_norm_out")(x))
        return layers.conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) after post_quant_conv -> images (B, h*f, w*f, 3)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg, kw = self.config, _dtypes(self.config)
        chans = cfg.block_out_channels[::-1]
        x = layers.conv(chans[0], 3, name="conv_in", **kw)(z.astype(kw["dtype"]))
        x = MidBlock(cfg, chans[0], name="mid_block")(x)
        # diffusers up_blocks[i] is sgm decoder.up[n - 1 - i]: the deepest level comes first.
        for i, c in enumerate(chans):
            x = UpBlock(cfg, c, upsample=i < len(chans) - 1, name=f"up_blocks_{i}")(x)
        x = nn.silu(_norm(cfg, "conv_norm_out")(x))
        return layers.conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """encode: images -> (mean, logvar); decode: unscaled latents -> images. Outputs are fp32 whatever
    the compute dtype, so posterior sampling and image post-processing never run in bf16."""

    config: VAEConfig

    def setup(self):
        cfg, kw = self.config, _dtypes(self.config)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = layers.conv(2 * cfg.latent_channels, 1, padding="VALID", name="quant_conv", **kw)
        self.post_quant_conv = layers.conv(
            cfg.latent_channels, 1, padding="VALID", name="post_quant_conv", **kw)

    def encode(self, images):
        """images (B, H, W, in_channels) in [-1, 1], H and W multiples of f -> mean, logvar, each
        (B, H/f, W/f, latent_channels) fp32, logvar clamped to [logvar_min, logvar_max]."""
        f = self.config.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image size {images.shape[1:3]} must be a multiple of {f} to encode")
        moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, self.config.logvar_min, self.config.logvar_max)

    def decode(self, latents):
        """latents (B, h, w, latent_channels), UNSCALED (divide by scaling_factor first) -> images
        (B, h*f, w*f, out_channels) fp32, nominally in [-1, 1] (not clipped)."""
        z = self.post_quant_conv(latents.astype(jnp.dtype(self.config.dtype)))
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images, rng: jax.Array | None = None):
        """Reconstruction: returns (images_out, mean, logvar). Decodes a posterior sample when `rng` is
        given, else the mean. `init` through here creates every parameter."""
        mean, logvar = self.encode(images)
        z = mean if rng is None else sample_posterior(rng, mean, logvar)
        return self.decode(z), mean, logvar


def sample_posterior(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian N(mean, exp(logvar)), as diffusers/sgm `sample()`."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over (h, w, c), per sample (sgm `kl()`)."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


# --- Memory-bounded encode/decode -------------------------------------------------------------------
# `params` may be the params tree (as convert.load_vae returns it) or a {"params": ...} variables dict.
# Chunks run under lax.map, so a batch of any size is one program holding one chunk's activations
# (sgm's en_and_decode_n_samples_a_time, SPEC.md); a ragged last chunk is zero-padded and dropped.


def _variables(params) -> dict:
    return params if "params" in params else {"params": params}


def _map_chunks(fn, x: jax.Array, chunk: int):
    b = x.shape[0]
    chunk = max(1, min(int(chunk), b))
    n = -(-b // chunk)
    if n == 1:
        return fn(x)
    if n * chunk > b:
        x = jnp.concatenate([x, jnp.zeros((n * chunk - b, *x.shape[1:]), x.dtype)])
    out = jax.lax.map(fn, x.reshape(n, chunk, *x.shape[1:]))
    return jax.tree.map(lambda y: y.reshape(n * chunk, *y.shape[2:])[:b], out)


def encode_batched(vae: AutoencoderKL, params, images: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """vae.encode over sub-batches of `chunk` images -> (mean, logvar) for the whole batch. `chunk` is a
    Python int (static under jit)."""
    v = _variables(params)
    return _map_chunks(lambda x: vae.apply(v, x, method="encode"), images, chunk)


def decode_batched(vae: AutoencoderKL, params, latents: jax.Array, chunk: int, tiled: bool | None = None):
    """vae.decode over sub-batches of `chunk` latents (unscaled). `tiled=None` decodes in tiles when the
    latent area exceeds config.tile_above (the mid-block attention is quadratic in it); True/False force."""
    cfg = vae.config
    if tiled is None:
        tiled = cfg.tile_above is not None and latents.shape[1] * latents.shape[2] > cfg.tile_above
    v = _variables(params)
    if tiled:
        fn = lambda z: decode_tiled(vae, v, z)
    else:
        fn = lambda z: vae.apply(v, z, method="decode")
    return _map_chunks(fn, latents, chunk)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    # The last tile is aligned to the far edge, so it may overlap its neighbour by more than `overlap`.
    return [*range(0, n - tile, tile - overlap), n - tile]


def _ramp(size: int, ramp: int, rise, fall) -> jax.Array:
    """1 in the middle, linear ramps (never 0) over `ramp` pixels at the sides shared with a neighbour;
    `rise`/`fall` may be traced booleans."""
    i = jnp.arange(size, dtype=jnp.float32) + 0.5
    w = jnp.ones((size,), jnp.float32)
    if ramp > 0:
        w = jnp.where(rise, jnp.minimum(w, i / ramp), w)
        w = jnp.where(fall, jnp.minimum(w, (size - i) / ramp), w)
    return w


def decode_tiled(vae: AutoencoderKL, params, latents: jax.Array, tile: int | None = None,
                 overlap: int | None = None) -> jax.Array:
    """Decodes (B, h, w, c) latents in tiles of tile x tile latent pixels overlapping by `overlap`
    (defaults from the config), blending overlaps with linear ramps normalised to sum to one, so no seam
    shows. The tiles run in a lax.scan that accumulates into the output: one decoder in the program
    whatever the tile count, one tile's activations alive at a time.

    Not bit-equal to a full decode: the mid-block attention and the GroupNorm statistics only see one tile
    (the same approximation as diffusers' tiled_decode)."""
    cfg, f = vae.config, vae.config.downsample_factor
    tile = cfg.tile_size if tile is None else tile
    overlap = cfg.tile_overlap if overlap is None else overlap
    if not 0 <= overlap < tile:
        raise ValueError(f"decode_tiled: overlap={overlap} must be in [0, tile={tile})")
    b, h, w, c = latents.shape
    th, tw = min(tile, h), min(tile, w)
    grid = [(y, x) for y in _tile_starts(h, tile, overlap) for x in _tile_starts(w, tile, overlap)]
    starts = jnp.asarray(grid, jnp.int32)
    v = _variables(params)
    out_c = jax.eval_shape(lambda z: vae.apply(v, z, method="decode"),
                           jax.ShapeDtypeStruct((b, th, tw, c), latents.dtype)).shape[-1]

    def add_tile(carry, yx):
        out, weight = carry
        y, x = yx[0], yx[1]
        image = vae.apply(v, jax.lax.dynamic_slice(latents, (0, y, x, 0), (b, th, tw, c)), method="decode")
        wy = _ramp(th * f, overlap * f, rise=y > 0, fall=y + th < h)
        wx = _ramp(tw * f, overlap * f, rise=x > 0, fall=x + tw < w)
        wt = (wy[:, None] * wx[None, :])[..., None]
        at = (0, y * f, x * f, 0)
        out = jax.lax.dynamic_update_slice(out, jax.lax.dynamic_slice(out, at, image.shape) + image * wt, at)
        weight = jax.lax.dynamic_update_slice(
            weight, jax.lax.dynamic_slice(weight, at[1:], wt.shape) + wt, at[1:])
        return (out, weight), None

    init = (jnp.zeros((b, h * f, w * f, out_c), jnp.float32), jnp.zeros((h * f, w * f, 1), jnp.float32))
    (out, weight), _ = jax.lax.scan(add_tile, init, starts)
    return out / weight
