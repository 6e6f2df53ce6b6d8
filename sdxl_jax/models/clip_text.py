"""The CLIP text transformer used twice by SDXL: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (SPEC.md).

One pre-LN causal transformer covers both; they differ in width/depth, the MLP activation (quick_gelu
for OpenAI's CLIP-L, exact GELU for bigG) and the text projection (bigG only). Parameter names follow
HF's CLIPTextModel (token_embedding, layers_i/self_attn/q_proj, mlp/fc1, final_layer_norm,
text_projection) so the converters are plain renames.

    model = CLIPTextModel(PRESETS["bigg"])
    hidden, pooled = model.apply({"params": p}, ids)   # ids int32 (B, L <= 77)

`hidden` is HF's hidden_states[config.hidden_layer] (default -2: the penultimate layer's output, no final
LayerNorm, as SDXL's sgm FrozenCLIPEmbedder(layer_idx=11) / FrozenOpenCLIPEmbedder2("penultimate") use).
`pooled` is final_layer_norm(last layer) at the end-of-text token (argmax of ids, the highest id) @
text_projection, or None for a model without projection (SDXL ignores CLIP-L's pooled output).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models import layers

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"  # quick_gelu (OpenAI CLIP-L) | gelu (exact; OpenCLIP bigG)
    projection_dim: int | None = None  # bigG: 1280 (pooled text embedding); None: no projection
    layer_norm_eps: float = 1e-5
    hidden_layer: int = -2  # index into HF hidden_states (0 = embeddings, -1 = last layer)
    dtype: Any = "float32"  # compute dtype; LayerNorm and softmax statistics stay fp32
    param_dtype: Any = "float32"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: choose one of {ACTIVATIONS}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not -(self.layers + 1) <= self.hidden_layer <= self.layers:
            raise ValueError(f"hidden_layer {self.hidden_layer} out of range for {self.layers} layers")


PRESETS = {
    # OpenAI CLIP ViT-L/14 text model: 123,060,480 params.
    "clip_l": CLIPTextConfig(),
    # OpenCLIP ViT-bigG/14 text model with its 1280x1280 projection: 694,659,840 params.
    "bigg": CLIPTextConfig(width=1280, layers=32, heads=20, mlp_dim=5120, activation="gelu",
                           projection_dim=1280),
    # Tiny variants with the real vocabulary (so the real tokenizer works); widths sum to the tiny UNet's
    # context 64, like diffusers' own tiny SDXL test components. mlp_dim is deliberately not a multiple
    # of the width so transposed weights cannot go unnoticed.
    "tiny_l": CLIPTextConfig(width=32, layers=3, heads=4, mlp_dim=37),
    "tiny_g": CLIPTextConfig(width=32, layers=3, heads=4, mlp_dim=37, activation="gelu", projection_dim=32),
}


def _activation(name: str, x):
    if name == "quick_gelu":  # OpenAI CLIP: x * sigmoid(1.702 x)
        return x * jax.nn.sigmoid(1.702 * x)
    return nn.gelu(x, approximate=False)


class CLIPAttention(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        b, length, _ = x.shape
        head_dim = c.width // c.heads
        q, k, v = (
            layers.dense(c.width, ("embed", "heads"), name=n, **kw)(x).reshape(b, length, c.heads, head_dim)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        # Causal self-attention with no padding mask, as both references run it (padding positions see
        # the real tokens before them and change with the pad id, hence the per-encoder pad ids).
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        out = out.reshape(b, length, c.width)
        return layers.dense(c.width, ("heads", "embed"), name="out_proj", **kw)(out)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        h = layers.LayerNorm(c.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(c, name="self_attn")(h)
        h = layers.LayerNorm(c.layer_norm_eps, name="layer_norm2", **kw)(x)
        h = layers.dense(c.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(h)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = layers.dense(c.width, ("mlp", "embed"), name="fc2", **kw)(_activation(c.activation, h))
        return nn.with_logical_constraint(x + h, layers.TOKEN_AXES)


class CLIPTextModel(nn.Module):
    """ids (B, L) int -> (hidden (B, L, width) at config.hidden_layer, pooled (B, projection_dim) | None)."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, ids):
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        if ids.shape[-1] > c.max_length:
            raise ValueError(f"{ids.shape[-1]} tokens exceed the text model's context of {c.max_length}")
        token_embedding = nn.Embed(
            c.vocab_size, c.width, name="token_embedding", **kw,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        position_embedding = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")),
            (c.max_length, c.width), param_dtype,
        )
        x = token_embedding(ids) + position_embedding[None, : ids.shape[-1]].astype(dtype)
        x = nn.with_logical_constraint(x.astype(dtype), layers.TOKEN_AXES)
        hidden_states = [x]
        for i in range(c.layers):
            x = CLIPEncoderLayer(c, name=f"layers_{i}")(x)
            hidden_states.append(x)
        hidden = hidden_states[c.hidden_layer]
        # Always built so every checkpoint tensor has a home; unused outputs are removed by XLA under jit.
        last = layers.LayerNorm(c.layer_norm_eps, name="final_layer_norm", **kw)(x)
        if c.projection_dim is None:
            return hidden, None
        eot = last[jnp.arange(last.shape[0]), jnp.argmax(ids, axis=-1)]
        projection = layers.dense(c.projection_dim, ("embed", None), name="text_projection",
                                  use_bias=False, **kw)
        return hidden, projection(eot)


def abstract_params(config: CLIPTextConfig):
    """Parameter shapes (jax.ShapeDtypeStruct tree, logical-axis boxes removed) without allocating."""
    model = CLIPTextModel(config)
    ids = jax.ShapeDtypeStruct((1, config.max_length), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)
    return nn.meta.unbox(variables["params"])


def count_params(config: CLIPTextConfig) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(abstract_params(config)))
