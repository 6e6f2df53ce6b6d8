"""Params held in their model's compute dtype: exact, and half the memory in bf16.

A model computes with its params cast to its compute dtype (`dtype`): Dense, Conv and Embed cast their
params before use, CLIP casts its position embedding. Only the norms use theirs in fp32 (they multiply
fp32 statistics; layers.norm_param_dtype keeps their params at least fp32). So a copy of the params
already in the compute dtype, norms excepted, computes bit for bit the same. Training's frozen VAE and
text encoders (train_state.hold_frozen) and every model of a sampling Pipeline are held this way;
checkpoints keep the precision the weights were loaded in.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax import conditioning
from sdxl_jax.models import unet as unet_lib
from sdxl_jax.models import vae as vae_lib


@functools.cache
def abstract(config):
    """ShapeDtypeStructs of the held params of a UNetConfig, VAEConfig or ConditionerConfig: the model's
    params with param_dtype set to its compute dtype."""
    key = jax.random.key(0)
    if isinstance(config, unet_lib.UNetConfig):
        # Params do not depend on the attention kernel or remat; xla / none trace anywhere.
        held = dataclasses.replace(config, param_dtype=config.dtype, attention="xla", remat="none")
        return nn.meta.unbox(unet_lib.abstract_params(held))
    if isinstance(config, vae_lib.VAEConfig):
        model = vae_lib.AutoencoderKL(dataclasses.replace(config, param_dtype=config.dtype))
        side = 8 * config.downsample_factor
        image = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
        return nn.meta.unbox(jax.eval_shape(model.init, key, image)["params"])
    if isinstance(config, conditioning.ConditionerConfig):
        dtype = config.text_g.dtype
        model = conditioning.Conditioner(config.with_dtype(dtype, dtype))
        return nn.meta.unbox(jax.eval_shape(model.init, key, conditioning.dummy_batch(config, 1))["params"])
    raise TypeError(f"no held params for a {type(config).__name__}")


def params(model, tree):
    """`tree`, the params of `model` (a UNet, AutoencoderKL or Conditioner), in their held dtypes. In bf16
    the SDXL base and refiner UNets and text encoders take 12.7 GB instead of 25.4. Host arrays are cast
    on the host; empty params (a sampling stage given its conditioning) stay empty."""
    if not jax.tree.leaves(tree):
        return tree
    return cast(tree, abstract(model.config))


def cast(tree, like):
    """`tree` in the dtypes of `like` (arrays or ShapeDtypeStructs of the same structure); leaves already
    in theirs are returned as they are."""
    return jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), tree, like)
