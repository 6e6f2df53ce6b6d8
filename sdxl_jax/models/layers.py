"""Building blocks shared by the UNet and the VAE (NHWC, Flax Linen).

Every parameter carries logical axis names; configs map them to mesh axes (sdxl_jax/parallel.py).
Logical names used by the models:
  params:      "embed" (model width of a dense layer), "mlp" (feed-forward / embedding hidden width),
               "heads" (num_heads * head_dim of q/k/v), "conv_in" / "conv_out" (conv kernel channels),
               "norm" (norm scale and bias), "vocab", "length" (text embeddings), "layers" (the leading axis
               of scanned transformer blocks' stacked params, SpatialTransformer(scan=True)).
  activations: "activation_batch", "activation_height", "activation_width", "activation_length",
               "activation_embed", "activation_heads", "activation_mlp".
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models import chunked_attention

Dtype = Any

IMAGE_AXES = ("activation_batch", "activation_height", "activation_width", "activation_embed")
TOKEN_AXES = ("activation_batch", "activation_length", "activation_embed")

default_kernel_init = nn.initializers.lecun_normal()


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    name: str,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
) -> nn.Dense:
    """A Dense whose kernel (in, out) carries `axes` and whose bias carries axes[-1]."""
    return Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
        name=name,
    )


class Dense(nn.Dense):
    """nn.Dense: the same params and forward, written out (a subclass calling nn.Dense's own __call__ would
    name every op's scope twice). On a GPU its bias gradient is column_sum's: XLA:GPU reduced the GEGLU
    projection's bias gradient of up to 8192 rows in a kernel of its own, reading the gradient again, where
    two stages put the first in the kernel that writes the gradient."""

    @nn.compact
    def __call__(self, inputs):
        shape = (jnp.shape(inputs)[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        dims = (((inputs.ndim - 1,), (0,)), ((), ()))
        y = jax.lax.dot_general(inputs, kernel, dims, precision=self.precision)
        if bias is None:
            return y
        if target_platform() == "gpu":
            return add_bias(y, bias)
        return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


@jax.custom_vjp
def add_bias(y, bias):
    """y + bias over y's last axis, the bias's gradient from column_sum."""
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def _add_bias_fwd(y, bias):
    return add_bias(y, bias), bias


def _add_bias_bwd(bias, dy):
    return dy, column_sum(dy).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    name: str,
    strides: int = 1,
    padding: Any = "SAME",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
) -> nn.Conv:
    """nn.Conv with an HWIO kernel named (None, None, "conv_in", "conv_out")."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def norm_param_dtype(param_dtype: Dtype) -> jnp.dtype:
    """A norm's scale and bias multiply fp32 statistics, so rounding them to a lower `param_dtype` would
    change the result; every other weight is cast to the compute dtype before use. Keeping norms at
    fp32 is what makes a compute-dtype copy of a model's params exact (sdxl_jax/held.py)."""
    return jnp.promote_types(param_dtype, jnp.float32)


class GroupNorm(nn.Module):
    """GroupNorm whose statistics and affine transform run in fp32 whatever the compute dtype (SPEC.md).
    Its scale and bias are held in at least fp32 (see `norm_param_dtype`)."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.GroupNorm(
            num_groups=self.num_groups,
            epsilon=self.epsilon,
            dtype=jnp.float32,
            param_dtype=norm_param_dtype(self.param_dtype),
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            name="norm",
        )(x.astype(jnp.float32))
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with fp32 statistics, logical names on scale and bias held in at least fp32.

    On a GPU the normalization has its own backward (layer_norm): flax's autodiff spread it over six
    kernels per norm on XLA:GPU, reading the input and the gradient more often than the arithmetic needs;
    elsewhere (TPU, CPU) flax's nn.LayerNorm runs as it is. Both paths hold the same params."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(
            param_dtype=norm_param_dtype(self.param_dtype),
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            name="norm",
        )
        if target_platform() == "gpu":
            scale, bias = _NormParams(**kw)(x.shape[-1])
            return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)
        y = nn.LayerNorm(epsilon=self.epsilon, dtype=jnp.float32, **kw)(x.astype(jnp.float32))
        return y.astype(self.dtype)


class _NormParams(nn.Module):
    """nn.LayerNorm's params (scale, bias: ones and zeros of the feature size), without its arithmetic."""

    param_dtype: Dtype
    scale_init: Any
    bias_init: Any

    @nn.compact
    def __call__(self, features: int):
        return (self.param("scale", self.scale_init, (features,), self.param_dtype),
                self.param("bias", self.bias_init, (features,), self.param_dtype))


# Rows per partial sum in column_sum.
SUM_ROWS = 128


def column_sum(x) -> jax.Array:
    """The fp32 sum of x (batch, ..., features) over every axis but the last: a bias's or a norm's
    gradient. In two stages, partial sums of SUM_ROWS rows of each batch element, then their sum, with an
    optimization barrier between them. XLA:GPU reduces up to 8192 rows in one stage, a kernel of its own
    that reads x again; the first of two stages it fuses into the kernel that writes x, as a second
    output (where a GEMM writes x, the stages are two kernels). The batch axis stays whole, so a
    batch-sharded x is summed where it is; a 2-D x (batch, features), whose rows are the batch, and one
    whose rows do not split into SUM_ROWS, in one jnp.sum."""
    x = x.astype(jnp.float32)
    if x.ndim < 2:
        return x
    rows = x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim > 2 else x[None]
    b, t, c = rows.shape
    if x.ndim == 2 or t % SUM_ROWS or t <= SUM_ROWS:
        return jnp.sum(rows, axis=(0, 1))
    part = jnp.sum(rows.reshape(b, t // SUM_ROWS, SUM_ROWS, c), axis=2)
    return jnp.sum(jax.lax.optimization_barrier(part), axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float):
    """LayerNorm over the last axis in fp32 (flax nn.LayerNorm's arithmetic: E[x^2] - E[x]^2 variance,
    rsqrt(var + eps) * scale), with its own backward: the input's gradient from the two row means of
    g = dy * scale and g * xhat, and the scale's and bias's from column_sum, all from x, dy and the
    saved row statistics."""
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_stats(x, epsilon):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)
    return x, mean, jax.lax.rsqrt(var + epsilon)


def _layer_norm_fwd(x, scale, bias, epsilon):
    x32, mean, r = _layer_norm_stats(x, epsilon)
    y = (x32 - mean) * (r * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y, (x, mean, r, scale, bias)


def _layer_norm_bwd(epsilon, res, dy):
    x, mean, r, scale, bias = res
    xhat = (x.astype(jnp.float32) - mean) * r
    dy = dy.astype(jnp.float32)
    g = dy * scale.astype(jnp.float32)
    dx = r * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    return (dx.astype(x.dtype), column_sum(dy * xhat).astype(scale.dtype), column_sum(dy).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding in [cos | sin] order (diffusers flip_sin_to_cos=True, shift 0; sgm
    `timestep_embedding`): freqs_i = exp(-ln(max_period) * i / half). Works for any float input,
    which the size/crop conditioning embedders rely on. Computed in fp32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


ATTENTION_KERNELS = ("auto", "xla", "chunked", "cudnn", "splash")
# "auto": the best kernel of the platform the program is traced for.
AUTO_KERNEL = {"gpu": "cudnn", "tpu": "splash"}  # elsewhere: chunked


_FALLBACKS: dict[tuple[str, str], str] = {}  # (kernel asked for, platform) -> why chunked ran instead


def _warn_fallback(kernel: str, platform: str, why: str) -> None:
    if (kernel, platform) in _FALLBACKS:
        return
    from absl import logging

    logging.warning("attention kernel %r unavailable on %s (%s); using chunked", kernel, platform, why)
    _FALLBACKS[kernel, platform] = why


def attention_fallbacks(platform: str | None = None) -> list[str]:
    """"<kernel> on <platform>: <why>" for each vendor kernel this process asked for and replaced by
    chunked attention, on `platform` only if given. The benches report those on the platform they
    measure, so that a figure labelled cudnn is known to be cuDNN's (an ahead-of-time GPU compile also
    traces the model for this host's CPU, e.g. to count its FLOPs, and falls back there)."""
    return [f"{kernel} on {p}: {why}" for (kernel, p), why in _FALLBACKS.items() if platform in (None, p)]


def target_platform() -> str:
    """The platform the program is traced for: that of the mesh set with jax.set_mesh (which may be an
    accelerator topology compiled ahead of time, bench/train_step.py --topology), else the default
    backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def resolved_kernel(kernel: str, platform: str | None = None) -> str:
    """The kernel "auto" stands for on `platform` (default: the target platform); others as they are."""
    return AUTO_KERNEL.get(platform or target_platform(), "chunked") if kernel == "auto" else kernel


def dot_product_attention(q, k, v, *, kernel: str = "xla"):
    """softmax(q k^T / sqrt(d)) v over (B, L, H, D) inputs; logits and softmax in fp32.

    `kernel` picks the implementation: "xla" (jax.nn.dot_product_attention: materialises the L x S
    scores), "chunked" (sdxl_jax.models.chunked_attention: flash-attention blocks in plain JAX, O(L)
    memory on any backend), "cudnn" (cuDNN flash attention on NVIDIA GPUs), "splash" (Pallas TPU
    kernel), "auto" (cudnn on GPU, splash on TPU, chunked elsewhere). An unavailable vendor kernel
    falls back to chunked, logged once.
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {ATTENTION_KERNELS}")
    platform = target_platform()
    kernel = resolved_kernel(kernel)
    if kernel == "cudnn":
        if platform == "gpu":
            try:
                return cudnn_attention(q, k, v)
            except Exception as e:  # unsupported head dim / dtype / GPU generation
                _warn_fallback(kernel, platform, str(e).splitlines()[0][:200])
        else:
            _warn_fallback(kernel, platform, "needs an NVIDIA GPU")
    elif kernel == "splash":
        if platform == "tpu":
            from sdxl_jax.models import tpu_attention

            return tpu_attention.splash_attention(q, k, v)
        _warn_fallback(kernel, platform, "needs a TPU")
    elif kernel == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return chunked_attention.attention(q, k, v)


def cudnn_attention(q, k, v, *, implementation="cudnn"):
    """cuDNN flash attention (jax.nn.dot_product_attention) over (B, L, H, D) inputs, for any lengths.

    cuDNN's training kernels refuse an odd query or key length (jax 0.10.2: "Unsupported sequence length
    Q 4096, KV 77", raised when the step is differentiated, so under remat only after this function has
    returned): the text encoders' 77 tokens in every cross-attention. An odd length is padded to a
    multiple of 8 and masked with the true lengths, so forward and backward both stay in cuDNN.
    (`implementation` lets the tests run the same padding through XLA on a CPU.)"""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    if t % 2 == 0 and s % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

    def pad(x, n):
        return jnp.pad(x, ((0, 0), (0, -(-n // 8) * 8 - n), (0, 0), (0, 0))) if n % 2 else x

    out = jax.nn.dot_product_attention(
        pad(q, t), pad(k, s), pad(v, s), implementation=implementation,
        query_seq_lengths=jnp.full((b,), t, jnp.int32), key_value_seq_lengths=jnp.full((b,), s, jnp.int32),
    )  # fmt: skip
    return out[:, :t]


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 (+ Linear(SiLU(emb))) - GroupNorm-SiLU-dropout-conv3x3 (zero-init),
    1x1 shortcut only when channels change. Used with an embedding by the UNet and without by the VAE.
    Submodule names follow diffusers (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut)."""

    out_channels: int
    epsilon: float = 1e-5
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb=None, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.num_groups, epsilon=self.epsilon, name="norm1", **kw)(x)
        h = nn.silu(h)
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        if emb is not None:
            e = dense(self.out_channels, ("mlp", "embed"), name="time_emb_proj", **kw)(nn.silu(emb))
            h = h + e[:, None, None, :]
        h = GroupNorm(self.num_groups, epsilon=self.epsilon, name="norm2", **kw)(h)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, 3, name="conv2", kernel_init=nn.initializers.zeros_init(), **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", padding="VALID", **kw)(x)
        out = x.astype(self.dtype) + h
        return nn.with_logical_constraint(out, IMAGE_AXES)


class Downsample(nn.Module):
    """Stride-2 conv3x3. UNet: symmetric padding 1. VAE: pad (0, 1, 0, 1) then padding 0 (SPEC.md)."""

    channels: int
    asymmetric: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        padding = ((0, 1), (0, 1)) if self.asymmetric else ((1, 1), (1, 1))
        return conv(
            self.channels, 3, strides=2, padding=padding, name="conv",
            dtype=self.dtype, param_dtype=self.param_dtype,
        )(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names: to_q / to_k / to_v (no bias), to_out_0
    (bias). Self-attention when `context` is None. Scale 1/sqrt(head_dim) (SPEC.md)."""

    heads: int
    head_dim: int
    kernel: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        if context is not None:
            k_in = v_in = context.astype(self.dtype)
        elif resolved_kernel(self.kernel) == "cudnn" and target_platform() == "gpu":
            # XLA:GPU merges dots that share an operand into one GEMM (q, k and v: [T, 3 * inner]), and
            # cuDNN's call then takes each of q, k and v as a buffer of its own: three slice kernels that
            # copy the GEMM's output again. Distinct operands (the barrier costs nothing at run time)
            # keep three GEMMs that write the call's buffers. Estimated for the base UNet at 1024^2,
            # 4 rows: -1.0% of an H200's step time, -1.2% of an H100's (bench/RESULTS.md, session 22).
            k_in, v_in = jax.lax.optimization_barrier((x, x))
        else:
            k_in = v_in = x
        inner = self.heads * self.head_dim
        head_axes = ("activation_batch", "activation_length", "activation_heads", None)

        def split(t):
            t = t.reshape(t.shape[:2] + (self.heads, self.head_dim))
            return nn.with_logical_constraint(t, head_axes)

        q = split(dense(inner, ("embed", "heads"), name="to_q", **kw)(x))
        k = split(dense(inner, ("embed", "heads"), name="to_k", **kw)(k_in))
        v = split(dense(inner, ("embed", "heads"), name="to_v", **kw)(v_in))
        o = dot_product_attention(q, k, v, kernel=self.kernel)
        o = o.reshape(o.shape[:2] + (inner,))
        return dense(x.shape[-1], ("heads", "embed"), name="to_out_0",
                     dtype=self.dtype, param_dtype=self.param_dtype)(o)


class _GEGLUProj(nn.Module):
    """Only there to keep diffusers' parameter path ff.net.0.proj."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return dense(self.features, ("embed", "mlp"), name="proj", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)


class GEGLU(nn.Module):
    """diffusers FeedForward(activation_fn="geglu"): proj C -> 2*mult*C, split into (hidden, gate),
    hidden * gelu(gate) with exact (erf) GELU, then mult*C -> C. Names: net_0/proj, net_2."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.mult * x.shape[-1]

        h = _GEGLUProj(2 * inner, name="net_0", **kw)(x)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), name="net_2", **kw)(geglu(h))


@jax.custom_vjp
def geglu(h):
    """hidden * gelu(gate) for h = [hidden, gate] split on the last axis, with exact (erf) GELU.

    Its own backward, from h alone (geglu_grad): autodiff kept gelu(gate) for the backward beside h, and
    wrote the two halves' gradients apart and then their concatenate, h's gradient (one more read and
    write of it). Estimated for the base UNet at 1024^2, 4 rows: -3.4% of an H200's step time, -6.8% of
    an H100's, -3.1 GiB of the H200's peak (bench/RESULTS.md, session 22)."""
    hidden, gate = jnp.split(h, 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


def geglu_grad(h, dy, form: str = "halves"):
    """The gradient of geglu at h for the output's gradient dy, computed in fp32 and returned in h's dtype.
    Two forms of the same arithmetic: "halves" computes the hidden and gate halves' gradients and
    concatenates them; "rolled" computes every element of h's gradient from its own index (the hidden
    half, i < n: dy[i] * gelu(h[i + n]); the gate half: dy[i - n] * h[i - n] * gelu'(h[i])), reading the
    partner h[i -+ n] from h rolled by n and dy tiled, so that the whole gradient is one elementwise
    kernel. XLA:GPU kept the halves' concatenate a kernel of its own (another read and write of the
    gradient); TPU's compiler held more temp for the rolled form (bench/block_stack.py on v5e-8: 1.349
    against 1.300 GiB). The backward takes "rolled" on GPU, "halves" elsewhere."""
    if form == "halves":
        hidden, gate = (t.astype(jnp.float32) for t in jnp.split(h, 2, axis=-1))
    elif form == "rolled":
        n = h.shape[-1] // 2
        first = jax.lax.broadcasted_iota(jnp.int32, h.shape, h.ndim - 1) < n
        x = h.astype(jnp.float32)
        partner = jnp.roll(x, n, axis=-1)
        gate, hidden = jnp.where(first, partner, x), jnp.where(first, x, partner)
        dy = jnp.concatenate([dy, dy], axis=-1)
    else:
        raise ValueError(f"geglu_grad form={form!r}: halves or rolled")
    dy = dy.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(gate * (1.0 / math.sqrt(2.0))))  # gelu(g) = g * cdf(g)
    pdf = jnp.exp(-0.5 * gate * gate) * (1.0 / math.sqrt(2.0 * math.pi))
    d_hidden, d_gate = dy * gate * cdf, dy * hidden * (cdf + gate * pdf)
    if form == "halves":
        return jnp.concatenate([d_hidden, d_gate], axis=-1).astype(h.dtype)
    return jnp.where(first, d_hidden, d_gate).astype(h.dtype)


def _geglu_fwd(h):
    return geglu(h), h


def _geglu_bwd(h, dy):
    return (geglu_grad(h, dy, "rolled" if target_platform() == "gpu" else "halves"),)


geglu.defvjp(_geglu_fwd, _geglu_bwd)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention, GEGLU feed-forward, each residual (diffusers
    BasicTransformerBlock / sgm BasicTransformerBlock)."""

    heads: int
    head_dim: int
    kernel: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, head_dim=self.head_dim, kernel=self.kernel, **kw)
        x = Attention(name="attn1", **attn)(LayerNorm(name="norm1", **kw)(x)) + x
        x = Attention(name="attn2", **attn)(LayerNorm(name="norm2", **kw)(x), context) + x
        x = GEGLU(name="ff", **kw)(LayerNorm(name="norm3", **kw)(x)) + x
        return nn.with_logical_constraint(x, TOKEN_AXES)


SCANNED_BLOCKS = "transformer_blocks"  # a scanned SpatialTransformer's blocks: <this>/block/..., stacked
STACK_AXIS = "layers"  # the logical name of their leading axis (configs map it to no mesh axis)


class _ScanBody(nn.Module):
    """One transformer block as an nn.scan body: (h, context) -> (h, None)."""

    block: Any
    heads: int
    head_dim: int
    kernel: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, h, context):
        block = self.block(self.heads, self.head_dim, self.kernel, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="block")
        return block(h, context), None


def _cast_stack(dtype, params):
    """The stacked params cast to the compute dtype, as each block would cast them (norms excepted:
    they stay fp32, see `norm_param_dtype`)."""
    def one(path, x):
        if any(getattr(k, "key", "").startswith("norm") for k in path) or x.dtype == dtype:
            return x
        return x.astype(dtype)
    return jax.tree_util.tree_map_with_path(one, params)


def _cast_outside(scanned, dtype, policy):
    """`scanned` (an nn.scan of blocks) reading its stacked params already cast to the compute dtype; under
    a remat `policy`, inside a remat that redoes the cast in the backward pass instead of keeping it.

    Each block casts its weights to the compute dtype before use. Inside the scan, that cast's transpose
    turns each block's weight gradient back to fp32 within the loop, so the loop's stacked gradients come
    out in fp32: twice the bytes of the unrolled blocks' bf16 gradients, whose cast XLA folds into the
    optimizer (+4.8 GiB for the base on one H100, bench/RESULTS.md session 14). Cast before the loop, they
    leave it in the compute dtype. That cast, if kept for the backward pass, would hold a compute-dtype
    copy of every stacked weight from the forward pass on; under a remat `policy` (the blocks' own) a
    remat around it keeps what `policy` keeps, casts excepted, so the copy is redone from the fp32 params
    for this transformer's backward alone. That remat must carry the blocks' policy: a nested remat's
    partial evaluation follows the outer policy (with "everything but casts", the blocks kept 2.5x as much).

    Without a remat policy (None) there is no such remat: the unrolled blocks keep their casts' outputs for
    the backward pass too, so keeping the cast copy costs nothing extra, whereas a remat refusing casts
    would keep the blocks' fp32 inputs to their activation casts (the H100 step without remat, xla
    attention: temp 33.5 -> 38.0 GiB). tests/test_unet.py checks both; bench/RESULTS.md sessions 15 and 16
    have the memory."""
    dtype = jnp.dtype(dtype)
    mapped = nn.map_variables(scanned, "params", trans_in_fn=functools.partial(_cast_stack, dtype))
    return mapped if policy is None else nn.remat(mapped, policy=_all_but_casts(policy))


@functools.cache
def _all_but_casts(policy):
    """`policy` (a jax.checkpoint policy) that never saves a dtype cast's output."""
    def saveable(prim, *args, **params) -> bool:
        return prim.name != "convert_element_type" and policy(prim, *args, **params)
    return saveable


class SpatialTransformer(nn.Module):
    """diffusers Transformer2DModel with use_linear_projection (sgm SpatialTransformer with
    use_linear=True): GroupNorm(32, eps 1e-6) - linear proj_in - `depth` blocks - linear proj_out,
    plus the input. `block` lets the caller wrap the block class (rematerialisation); `policy` is that
    remat's jax.checkpoint policy (None: every residual kept).

    The blocks are `transformer_blocks_{i}` (one program each, diffusers' layout), or with `scan` one
    block run `depth` times by nn.scan over params stacked on a leading axis: `transformer_blocks/block/...`
    (SCANNED_BLOCKS, logical axis STACK_AXIS). Same function; unet.relayout converts between the layouts.
    A scan computing in a lower dtype than its params casts them before the loop (`_cast_outside`)."""

    heads: int
    head_dim: int
    depth: int
    kernel: str = "xla"
    block: Any = BasicTransformerBlock
    num_groups: int = 32
    scan: bool = False
    policy: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        h = GroupNorm(self.num_groups, epsilon=1e-6, name="norm", **kw)(x).reshape(b, hh * ww, c)
        h = dense(c, ("embed", "heads"), name="proj_in", **kw)(h)
        h = nn.with_logical_constraint(h, TOKEN_AXES)
        if self.scan:
            blocks = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=nn.broadcast, length=self.depth,
                             metadata_params={nn.PARTITION_NAME: STACK_AXIS})
            if jnp.dtype(self.dtype) != jnp.dtype(self.param_dtype) and not self.is_initializing():
                blocks = _cast_outside(blocks, self.dtype, self.policy)
            h, _ = blocks(self.block, self.heads, self.head_dim, self.kernel, name=SCANNED_BLOCKS, **kw)(
                h, context)
        else:
            for i in range(self.depth):
                h = self.block(self.heads, self.head_dim, self.kernel, name=f"transformer_blocks_{i}", **kw)(
                    h, context)
        h = dense(c, ("heads", "embed"), name="proj_out", **kw)(h)
        out = h.reshape(b, hh, ww, c) + x.astype(self.dtype)
        return nn.with_logical_constraint(out, IMAGE_AXES)


class TimestepEmbedding(nn.Module):
    """Linear-SiLU-Linear (diffusers TimestepEmbedding: linear_1, linear_2). Used for the time
    embedding and for the vector ("adm") conditioning, whose output is added to it (SPEC.md)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.features, ("embed", "mlp"), name="linear_1", **kw)(x.astype(self.dtype))
        return dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(nn.silu(h))
