"""SDXL's conditioner: a batch of arrays -> {"crossattn": (B, 77, C), "vector": (B, V)} (SPEC.md).

Mirrors sgm's GeneralConditioner for sd_xl_base / sd_xl_refiner, embedders in the reference order:
  base:    CLIP-L hidden | bigG hidden -> crossattn (B, 77, 768 + 1280 = 2048)
           bigG pooled | original_size | crop_coords_top_left | target_size -> vector (1280 + 6*256 = 2816)
  refiner: bigG hidden -> crossattn (B, 77, 1280)
           bigG pooled | original_size | crop_coords_top_left | aesthetic_score -> vector (1280+5*256 = 2560)
Each size scalar gets its own sinusoidal embedding ([cos | sin], 256 dims; sgm ConcatTimestepEmbedderND,
diffusers add_time_proj) and the embeddings are concatenated (SDXL sec. 2.2).

    cond = Conditioner(config)
    out = cond.apply({"params": p}, batch, ucg_rng=rng)       # training: conditioning dropout
    out = cond.apply({"params": p}, batch, zero_text=True)    # base unconditional batch

batch: "ids_l", "ids_g" int32 (B, 77) (ids_l unused by the refiner); "original_size", "crop_coords_top_left",
"target_size" int (B, 2) as (h, w) / (top, left) / (h, w); "aesthetic_score" float (B,) for the refiner.
Conditioning dropout (classifier-free guidance training): with `ucg_rng`, every embedder output is
multiplied by its own per-sample Bernoulli(1 - rate) draw, as sgm's GeneralConditioner does (so bigG's
hidden states and pooled vector drop independently); text rate `ucg_rate` (default config.ucg_rate_text),
size embedders config.ucg_rate_size. Outputs: crossattn in the text compute dtype, vector in fp32.
The text encoders are frozen (stop_gradient) unless config.freeze_text is False.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.models import clip_text, layers

BASE_SIZE_KEYS = ("original_size", "crop_coords_top_left", "target_size")
REFINER_SIZE_KEYS = ("original_size", "crop_coords_top_left", "aesthetic_score")
_SIZE_WIDTH = {"original_size": 2, "crop_coords_top_left": 2, "target_size": 2, "aesthetic_score": 1}
AESTHETIC_COND, AESTHETIC_UNCOND = 6.0, 2.5  # SPEC.md: refiner defaults


@dataclasses.dataclass(frozen=True)
class ConditionerConfig:
    text_l: clip_text.CLIPTextConfig | None  # None: the refiner (bigG only)
    text_g: clip_text.CLIPTextConfig
    size_keys: tuple[str, ...] = BASE_SIZE_KEYS
    size_embed_dim: int = 256  # per scalar; diffusers unet addition_time_embed_dim
    ucg_rate_text: float = 0.1  # sgm text embedders in the SDXL training configs
    ucg_rate_size: float = 0.0
    zero_text_uncond: bool = True  # base: force_uc_zero_embeddings=["txt"]; refiner: encode a negative prompt
    freeze_text: bool = True

    def __post_init__(self):
        unknown = set(self.size_keys) - set(_SIZE_WIDTH)
        if unknown:
            raise ValueError(f"unknown size conditioning keys {sorted(unknown)}; "
                             f"known: {sorted(_SIZE_WIDTH)}")
        if self.text_g.projection_dim is None:
            raise ValueError("text_g needs a projection_dim: its pooled output starts the vector")

    @property
    def context_dim(self) -> int:
        """Cross-attention width (UNet context_dim)."""
        return self.text_g.width + (self.text_l.width if self.text_l is not None else 0)

    @property
    def vector_dim(self) -> int:
        """Vector width (UNet adm_in_channels / diffusers projection_class_embeddings_input_dim)."""
        return self.text_g.projection_dim + self.size_embed_dim * sum(_SIZE_WIDTH[k] for k in self.size_keys)

    @property
    def is_refiner(self) -> bool:
        return "aesthetic_score" in self.size_keys

    def replace(self, **kw) -> ConditionerConfig:
        return dataclasses.replace(self, **kw)

    def with_dtype(self, dtype, param_dtype=None) -> ConditionerConfig:
        """Same conditioner with another compute (and optionally param) dtype for both text encoders."""
        kw = dict(dtype=dtype) if param_dtype is None else dict(dtype=dtype, param_dtype=param_dtype)
        text_l = dataclasses.replace(self.text_l, **kw) if self.text_l is not None else None
        return dataclasses.replace(self, text_l=text_l, text_g=dataclasses.replace(self.text_g, **kw))


_P = clip_text.PRESETS
PRESETS = {
    "sdxl_base": ConditionerConfig(_P["clip_l"], _P["bigg"]),
    "sdxl_refiner": ConditionerConfig(None, _P["bigg"], REFINER_SIZE_KEYS, zero_text_uncond=False),
    # Tiny text encoders, real 256-dim size embeddings: context 32 + 32 = 64, vector 32 + 6 * 256 = 1568
    # (refiner: context 32, vector 32 + 5 * 256 = 1312), the tiny UNet presets' context_dim / adm.
    "tiny_base": ConditionerConfig(_P["tiny_l"], _P["tiny_g"]),
    "tiny_refiner": ConditionerConfig(None, _P["tiny_g"], REFINER_SIZE_KEYS, zero_text_uncond=False),
}


def embed_sizes(values: jax.Array, dim: int) -> jax.Array:
    """(B, n) or (B,) scalars -> (B, n * dim): each scalar's [cos | sin] embedding, concatenated in order."""
    values = jnp.asarray(values)
    b = values.shape[0]
    flat = values.reshape(b, -1).reshape(-1)
    return layers.timestep_embedding(flat, dim).reshape(b, -1)


class Conditioner(nn.Module):
    """Holds the text encoders as submodules `text_l` (base only) and `text_g`; see the module docstring."""

    config: ConditionerConfig

    def setup(self):
        if self.config.text_l is not None:
            self.text_l = clip_text.CLIPTextModel(self.config.text_l)
        self.text_g = clip_text.CLIPTextModel(self.config.text_g)

    def __call__(self, batch, ucg_rng=None, ucg_rate=None, zero_text: bool = False):
        c = self.config
        text_rate = c.ucg_rate_text if ucg_rate is None else ucg_rate
        crossattn, text_vector = [], []
        if c.text_l is not None:
            hidden_l, _ = self.text_l(batch["ids_l"])
            crossattn.append(hidden_l)
        hidden_g, pooled = self.text_g(batch["ids_g"])
        crossattn.append(hidden_g)
        text_vector.append(pooled)
        if c.freeze_text:
            crossattn, text_vector = jax.lax.stop_gradient((crossattn, text_vector))
        sizes = [embed_sizes(batch[k], c.size_embed_dim) for k in c.size_keys]

        # One independent draw per embedder output, in sgm's loop order (L, G hidden, G pooled, sizes).
        outputs = crossattn + text_vector + sizes
        rates = [text_rate] * (len(crossattn) + len(text_vector)) + [c.ucg_rate_size] * len(sizes)
        if ucg_rng is not None:
            keys = [jax.random.fold_in(ucg_rng, i) for i in range(len(outputs))]
            outputs = [drop(k, x, r) for k, x, r in zip(keys, outputs, rates, strict=True)]
        n_text = len(crossattn) + len(text_vector)
        if zero_text:
            outputs = [jnp.zeros_like(x) for x in outputs[:n_text]] + outputs[n_text:]
        crossattn, vector = outputs[: len(crossattn)], outputs[len(crossattn):]
        crossattn = jnp.concatenate(crossattn, axis=-1)
        vector = jnp.concatenate([v.astype(jnp.float32) for v in vector], axis=-1)
        return {"crossattn": nn.with_logical_constraint(crossattn, layers.TOKEN_AXES), "vector": vector}


def drop(rng, x, rate):
    """Conditioning dropout: zeroes each example's `x` (leading axis) with probability `rate`; shared by
    the encoders' path and the encoding cache's (data/cache.py), so both drop alike."""
    if isinstance(rate, int | float) and rate <= 0.0:  # a traced rate (no recompiles) always draws
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],)).astype(x.dtype)
    return x * keep.reshape((-1,) + (1,) * (x.ndim - 1))


def init_params(config: ConditionerConfig, rng) -> dict:
    """Random parameters (logical-axis boxes removed); real weights come from convert.load_text_encoders."""
    return nn.meta.unbox(jax.jit(Conditioner(config).init)(rng, dummy_batch(config, 1))["params"])


def dummy_batch(config: ConditionerConfig, batch_size: int) -> dict[str, np.ndarray]:
    length = config.text_g.max_length
    ids = np.zeros((batch_size, length), np.int32)
    batch = {"ids_l": ids, "ids_g": ids.copy()}
    for k in config.size_keys:
        batch[k] = np.zeros((batch_size,) if k == "aesthetic_score" else (batch_size, 2), np.float32)
    return batch


def make_batch(tokenizers, prompts: Sequence[str], original_size, crop, target_size,
               aesthetic_score: float | Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Host-side batch for `prompts`; sizes are one (h, w) pair for all prompts or one per prompt."""
    n = len(prompts)
    batch = dict(tokenizers(list(prompts)))

    def pairs(v):
        a = np.asarray(v, np.int32)
        return np.broadcast_to(a, (n, 2)).copy() if a.ndim == 1 else a

    batch["original_size"], batch["crop_coords_top_left"] = pairs(original_size), pairs(crop)
    batch["target_size"] = pairs(target_size)
    if aesthetic_score is not None:
        batch["aesthetic_score"] = np.broadcast_to(np.asarray(aesthetic_score, np.float32), (n,)).copy()
    return batch


@functools.cache
def _apply(config: ConditionerConfig, zero_text: bool):
    return jax.jit(lambda params, batch: Conditioner(config).apply({"params": params}, batch,
                                                                     zero_text=zero_text))


def encode_prompts(conditioner: Conditioner, params, tokenizers, prompts: Sequence[str], original_size,
                   crop=(0, 0), target_size=None, aesthetic_score=None) -> dict[str, jax.Array]:
    """Conditional {"crossattn", "vector"} for a list of prompts (no dropout). target_size defaults to
    original_size; the refiner's aesthetic_score defaults to 6.0."""
    c = conditioner.config
    if c.is_refiner and aesthetic_score is None:
        aesthetic_score = AESTHETIC_COND
    batch = make_batch(tokenizers, prompts, original_size, crop,
                       original_size if target_size is None else target_size,
                       aesthetic_score if c.is_refiner else None)
    return _apply(c, False)(params, _select(c, batch))


def encode_unconditional(conditioner: Conditioner, params, tokenizers, batch_size: int, original_size,
                         crop=(0, 0), target_size=None, aesthetic_score=None,
                         negative_prompts: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """The unconditional batch for classifier-free guidance (SPEC.md): the base zeroes its text outputs
    (crossattn and pooled) unless negative prompts are given; the refiner encodes the negative prompts
    ("" by default) with aesthetic score 2.5. Size conditioning is kept as given."""
    c = conditioner.config
    zero = c.zero_text_uncond and negative_prompts is None
    prompts = [""] * batch_size if negative_prompts is None else list(negative_prompts)
    if len(prompts) != batch_size:
        raise ValueError(f"{len(prompts)} negative prompts for a batch of {batch_size}")
    if c.is_refiner and aesthetic_score is None:
        aesthetic_score = AESTHETIC_UNCOND
    batch = make_batch(tokenizers, prompts, original_size, crop,
                       original_size if target_size is None else target_size,
                       aesthetic_score if c.is_refiner else None)
    return _apply(c, zero)(params, _select(c, batch))


def _select(config: ConditionerConfig, batch: dict) -> dict:
    keys = ("ids_l", "ids_g") + tuple(config.size_keys)
    return {k: batch[k] for k in keys}
