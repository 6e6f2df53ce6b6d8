"""The SDXL UNet (sgm UNetModel / diffusers UNet2DConditionModel) in Flax Linen, NHWC.

    model = UNet(PRESETS["sdxl_base"])
    out = model.apply({"params": p}, x, timesteps, context, y)   # x (B, h, w, 4) -> (B, h, w, 4) fp32

`y` is the finished vector conditioning (B, adm_in_channels): SPEC.md "vector conditioning" (pooled text
embedding | sinusoidal size/crop embeddings), built by sdxl_jax.conditioning. Unlike diffusers, the UNet does
not embed the size scalars itself; this is the sgm convention.

Submodules are named after diffusers (conv_in, time_embedding, add_embedding, down_blocks_{i}/resnets_{j},
.../attentions_{j}/transformer_blocks_{k}/attn1/to_q, mid_block, up_blocks_{i}/upsamplers_0, conv_norm_out,
conv_out) so that sdxl_jax/convert/unet.py is mostly renames.

With `scan_blocks` each SpatialTransformer runs its blocks as one scanned block over params stacked on a
leading axis (`.../attentions_{j}/transformer_blocks/block/attn1/to_q`, layers.SpatialTransformer):
the same function in a third of the HLO, compiled several times faster (bench/RESULTS.md: 4.9x for the
H100 train step), for 1.4 GiB more temp memory on one H100 and 0.05 GiB per v5e chip at fsdp 8 under remat
dots (the stacked params are cast to bf16 before the loop, layers._cast_outside, so that their gradients
leave it in bf16 as the unrolled blocks' do). Use the scan with a remat policy: without one, on one H100,
its peak is 55.98 GiB against the unrolled 48.71 with cuDNN attention and 71.29 against 60.45 with xla
attention (bench/RESULTS.md session 16). `relayout` converts any tree of UNet params (optimizer state,
EMA, a whole TrainState) between the two layouts; converters and checkpoint restores go through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.models import chunked_attention, layers

# Rematerialisation policies, applied per ResnetBlock and per transformer block:
#   none          keep every activation (fastest, most memory)
#   full          save nothing inside a block; recompute it in the backward pass (least memory)
#   dots          save matmul/conv outputs, recompute the cheap elementwise ops and norms
#   dots_no_batch save only matmuls without batch dimensions (weights-side products), recompute the rest
# The dots policies also save the attention kernels' forward results, which their custom backward reads:
# chunked's output and log-sum-exp (named residuals; without them the backward would recompute the forward
# scan and keep every block's logits for it) and cuDNN's forward call (output and softmax statistics;
# without it every cuDNN attention runs its forward twice: 44 forward calls for 22 backward ones in the
# H100 compile of the base UNet at one transformer block per attention, bench/RESULTS.md) and splash's
# output and log-sum-exp (without them its forward kernel ran again in the backward: 8 ms of a v5e step,
# for 1.25 GiB of the 16 at 2 rows per chip, bench/RESULTS.md session 29).
_cp = jax.checkpoint_policies
_CUDNN_FORWARD = "dot_product_attention_fwd_wrapper"  # jax._src.cudnn.fused_attention_stablehlo's primitive
_SPLASH_RESIDUAL = "splash_attention_residual"  # tpu_attention.RESIDUAL_NAME (imported only on TPUs)
_named_residuals = _cp.save_only_these_names(*chunked_attention.RESIDUAL_NAMES, _SPLASH_RESIDUAL)


def _attention_residuals(prim, *avals, **params) -> bool:
    return prim.name == _CUDNN_FORWARD or _named_residuals(prim, *avals, **params)


REMAT_POLICIES = {
    "none": None,
    "full": _cp.nothing_saveable,
    "dots": _cp.save_from_both_policies(_cp.checkpoint_dots, _attention_residuals),
    "dots_no_batch": _cp.save_from_both_policies(_cp.dots_with_no_batch_dims_saveable, _attention_residuals),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Every architecture number (SPEC.md "UNet") plus numerics and kernel choices.

    transformer_depth has one entry per level (0 = no attention at that level); the same depth is used by
    the matching up-block level. mid_transformer_depth is the mid block's (sgm: transformer_depth[-1] of the
    expanded list; the refiner's is 4 although its last level has no attention).
    addition_time_embed_dim and sample_size are not used by the model; they are carried for the diffusers
    config (the conditioner's per-scalar embedding width, the default latent side).
    """

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)
    mid_transformer_depth: int = 10
    head_channels: int = 64
    context_dim: int = 2048
    adm_in_channels: int = 2816
    in_channels: int = 4
    out_channels: int = 4
    dropout: float = 0.0
    # GroupNorm groups (diffusers norm_num_groups; sgm hard-codes 32). Narrow models need fewer: with one
    # channel per group GroupNorm removes every channel's spatial mean, e.g. a latent's flat colour.
    norm_groups: int = 32
    addition_time_embed_dim: int = 256
    sample_size: int = 128
    dtype: Any = "float32"  # compute dtype; "bfloat16" on accelerators
    param_dtype: Any = "float32"
    attention: str = "chunked"  # a layers.ATTENTION_KERNELS key (layers.dot_product_attention)
    remat: str = "none"  # a REMAT_POLICIES key
    scan_blocks: bool = False  # scan each SpatialTransformer's blocks over stacked params (see the docstring)

    def __post_init__(self):
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(f"transformer_depth {self.transformer_depth} needs one entry per level of "
                             f"channel_mult {self.channel_mult}")
        if self.mid_transformer_depth < 1:
            raise ValueError("mid_transformer_depth must be >= 1 (the SDXL mid block always has attention)")
        for m in self.channel_mult:
            ch = self.model_channels * m
            if ch % self.head_channels or ch % self.norm_groups:
                raise ValueError(f"level width {ch} must be divisible by head_channels {self.head_channels} "
                                 f"and by norm_groups {self.norm_groups}")
        if self.attention not in layers.ATTENTION_KERNELS:
            raise ValueError(f"attention={self.attention!r}; choose one of {layers.ATTENTION_KERNELS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def architecture(self) -> tuple:
        """The fields that decide the parameter shapes (used to recognise presets in checkpoints)."""
        return (self.model_channels, self.channel_mult, self.num_res_blocks, self.transformer_depth,
                self.mid_transformer_depth, self.head_channels, self.context_dim, self.adm_in_channels,
                self.in_channels, self.out_channels)


PRESETS = {
    # SPEC.md: 320 x [1, 2, 4], depth [0, 2, 10], context 2048, adm 1280 + 6 x 256.
    "sdxl_base": UNetConfig(),
    # SPEC.md: 384 x [1, 2, 4, 4], depth [0, 4, 4, 0] (mid 4), context 1280, adm 1280 + 5 x 256.
    "sdxl_refiner": UNetConfig(
        model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
        mid_transformer_depth=4, context_dim=1280, adm_in_channels=2560,
    ),
    # Tests and the embedded default: same code paths, tiny numbers. context 64 (= two 32-wide tiny text
    # encoders concatenated); adm 32 + 6 x 256 = 1568 (a 32-wide pooled text feature, and the real
    # 256-dim sinusoidal embedding of each of the 6 size/crop scalars). Head width 16 -> 2 / 4 heads.
    # 8 norm groups (4 / 8 channels each): GroupNorm(32) on 32 channels would erase every channel's mean.
    "tiny": UNetConfig(
        model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 1), mid_transformer_depth=1,
        head_channels=16, context_dim=64, adm_in_channels=32 + 6 * 256, sample_size=16, norm_groups=8,
    ),
    # Refiner-shaped tiny: context 32 (the tiny bigG-like encoder alone), adm 32 + 5 x 256 = 1312.
    "tiny_refiner": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 0), mid_transformer_depth=1,
        head_channels=16, context_dim=32, adm_in_channels=32 + 5 * 256, sample_size=16, norm_groups=8,
    ),
}


def _remat(cls, policy: str, static_argnums=(), prevent_cse: bool = True):
    if policy == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums,
                    prevent_cse=prevent_cse)


def _block(cfg: UNetConfig):
    # jax.checkpoint's docs: inside a scan prevent_cse is not needed, and False is more efficient.
    return _remat(layers.BasicTransformerBlock, cfg.remat, prevent_cse=not cfg.scan_blocks)


class _Level(nn.Module):
    """One down or up level: resnets_{j} [+ attentions_{j}] per block, then an optional resampler.
    Up levels concatenate one skip tensor before each resnet (diffusers CrossAttnUpBlock2D)."""

    config: UNetConfig
    channels: int
    depth: int
    num_blocks: int
    up: bool
    resample: bool

    @nn.compact
    def __call__(self, h, emb, context, skips, deterministic):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        # self at index 0: (self, x, emb, deterministic)
        resnet = _remat(layers.ResnetBlock, cfg.remat, static_argnums=(3,))
        block = _block(cfg)
        outputs = []
        for j in range(self.num_blocks):
            if self.up:  # skips arrive in down order; the last one pairs with the first up block
                h = jnp.concatenate([h, skips[-1 - j].astype(h.dtype)], axis=-1)
            h = resnet(self.channels, dropout=cfg.dropout, num_groups=cfg.norm_groups, name=f"resnets_{j}",
                       **kw)(h, emb, deterministic)
            if self.depth:
                h = layers.SpatialTransformer(
                    self.channels // cfg.head_channels, cfg.head_channels, self.depth, cfg.attention,
                    block=block, num_groups=cfg.norm_groups, scan=cfg.scan_blocks,
                    policy=REMAT_POLICIES[cfg.remat], name=f"attentions_{j}", **kw)(h, context)
            outputs.append(h)
        if self.resample:
            sampler = layers.Upsample if self.up else layers.Downsample
            h = sampler(self.channels, name="upsamplers_0" if self.up else "downsamplers_0", **kw)(h)
            outputs.append(h)
        return h, outputs


class _MidBlock(nn.Module):
    """diffusers UNetMidBlock2DCrossAttn: resnets_0, attentions_0, resnets_1."""

    config: UNetConfig

    @nn.compact
    def __call__(self, h, emb, context, deterministic):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        resnet = _remat(layers.ResnetBlock, cfg.remat, static_argnums=(3,))
        ch = cfg.level_channels[-1]
        rkw = dict(dropout=cfg.dropout, num_groups=cfg.norm_groups, **kw)
        h = resnet(ch, name="resnets_0", **rkw)(h, emb, deterministic)
        h = layers.SpatialTransformer(
            ch // cfg.head_channels, cfg.head_channels, cfg.mid_transformer_depth, cfg.attention,
            block=_block(cfg), num_groups=cfg.norm_groups, scan=cfg.scan_blocks,
            policy=REMAT_POLICIES[cfg.remat], name="attentions_0",
            **kw)(h, context)
        return resnet(ch, name="resnets_1", **rkw)(h, emb, deterministic)


class UNet(nn.Module):
    config: UNetConfig

    @nn.compact
    def __call__(self, x, timesteps, context, y, deterministic: bool = True):
        """x (B, h, w, in_channels) NHWC, timesteps (B,) int 0..999 or float, context (B, L, context_dim),
        y (B, adm_in_channels) -> (B, h, w, out_channels) in fp32. h and w must be divisible by
        2 ** (levels - 1). Dropout (config.dropout, 0 for SDXL) is active when deterministic=False."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        kw = dict(dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype))
        levels = len(cfg.channel_mult)
        factor = 2 ** (levels - 1)
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"x must be (B, h, w, {cfg.in_channels}) NHWC with h, w divisible by {factor}; "
                             f"got {x.shape}")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))

        # SPEC.md: sinusoidal [cos | sin] -> Linear-SiLU-Linear; vector conditioning added to it.
        emb_dim = 4 * cfg.model_channels
        t_emb = layers.timestep_embedding(timesteps, cfg.model_channels)
        emb = layers.TimestepEmbedding(emb_dim, name="time_embedding", **kw)(t_emb)
        emb = emb + layers.TimestepEmbedding(emb_dim, name="add_embedding", **kw)(y)
        context = context.astype(dtype)

        h = layers.conv(cfg.model_channels, 3, name="conv_in", **kw)(x.astype(dtype))
        h = nn.with_logical_constraint(h, layers.IMAGE_AXES)
        skips = [h]
        for i, ch in enumerate(cfg.level_channels):
            h, outs = _Level(cfg, ch, cfg.transformer_depth[i], cfg.num_res_blocks, up=False,
                             resample=i < levels - 1, name=f"down_blocks_{i}")(h, emb, context, (),
                                                                                 deterministic)
            skips.extend(outs)

        h = _MidBlock(cfg, name="mid_block")(h, emb, context, deterministic)

        n = cfg.num_res_blocks + 1
        for i in range(levels):
            level = levels - 1 - i
            level_skips, skips = tuple(skips[-n:]), skips[:-n]
            h, _ = _Level(cfg, cfg.level_channels[level], cfg.transformer_depth[level], n, up=True,
                          resample=i < levels - 1, name=f"up_blocks_{i}")(h, emb, context, level_skips,
                                                                          deterministic)

        h = nn.silu(layers.GroupNorm(cfg.norm_groups, name="conv_norm_out", **kw)(h))
        out = layers.conv(cfg.out_channels, 3, name="conv_out", **kw)(h)
        return out.astype(jnp.float32)


def abstract_params(config: UNetConfig, batch: int = 1, tokens: int = 77):
    """Parameter ShapeDtypeStructs (boxed with logical names) without allocating anything."""
    model = UNet(config)
    f = 2 ** (len(config.channel_mult) - 1)
    x = jax.ShapeDtypeStruct((batch, 2 * f, 2 * f, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((batch, tokens, config.context_dim), jnp.float32)
    y = jax.ShapeDtypeStruct((batch, config.adm_in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, y)["params"]


def count_params(params) -> int:
    return sum(int(v.size) for v in jax.tree.leaves(nn.meta.unbox(params)))


# --------------------------------------------------------------------------- unrolled <-> scanned params


def is_stacked(path) -> bool:
    """Whether the leaf at `path` (a jax key path) holds scanned blocks' params: one more leading axis."""
    return any(getattr(k, "key", None) == layers.SCANNED_BLOCKS for k in path)


def is_scanned(tree) -> bool:
    """Whether a tree of UNet params (or one holding them) is in the scanned layout."""
    return any(is_stacked(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def _unrolled_names(d: dict) -> list[str]:
    names = []
    while f"transformer_blocks_{len(names)}" in d:
        names.append(f"transformer_blocks_{len(names)}")
    return names


def holds_blocks(x) -> bool:
    """Whether `x` is one SpatialTransformer's param dict (its blocks in either layout)."""
    return isinstance(x, dict) and ("transformer_blocks_0" in x or layers.SCANNED_BLOCKS in x)


def _stack_sharding(s):
    if isinstance(s, jax.sharding.NamedSharding):  # the stacked axis is unsharded (STACK_AXIS)
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec))
    return s


def _unstack_sharding(s):
    if isinstance(s, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[1:]))
    return s


def _stack(*xs):
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=_stack_sharding(x.sharding))
    return np.stack(xs) if all(isinstance(v, np.ndarray) for v in xs) else jnp.stack(xs)


def _take(x, i: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_unstack_sharding(x.sharding))
    return x[i]


def relayout(tree, scan: bool):
    """`tree` with every SpatialTransformer's blocks in the unrolled (`transformer_blocks_{i}`, scan=False)
    or the scanned layout (`transformer_blocks/block`, stacked on a leading axis). Works on any pytree that
    holds UNet param dicts (params, optimizer state, a TrainState) with array, numpy or ShapeDtypeStruct
    leaves (a NamedSharding gains or loses an unsharded leading axis); a tree already in the layout comes
    back as is. Numpy stays numpy (host loading); jax arrays are stacked by jax (under jit: on the
    devices)."""

    def one(x):
        if not holds_blocks(x):
            return x
        names = _unrolled_names(x)
        if scan and names:
            rest = {k: v for k, v in x.items() if k not in names}
            return rest | {layers.SCANNED_BLOCKS: {"block": jax.tree.map(_stack, *[x[k] for k in names])}}
        if not scan and layers.SCANNED_BLOCKS in x:
            stacked = x[layers.SCANNED_BLOCKS]["block"]
            depth = _depth(stacked)
            rest = {k: v for k, v in x.items() if k != layers.SCANNED_BLOCKS}
            return rest | {f"transformer_blocks_{i}": jax.tree.map(lambda a, i=i: _take(a, i), stacked)
                           for i in range(depth)}
        return x

    return jax.tree.map(one, tree, is_leaf=holds_blocks)


def _depth(stacked) -> int:
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError("scanned transformer blocks without a leaf: their depth is unknown")
    return int(leaves[0].shape[0])
