"""The PRNG that draws random parameters: a counter hash, cheap for XLA to compile.

A model's random init is one program that draws every parameter. With jax's threefry each leaf's draw
is ~150 instructions of unrolled rounds that XLA:GPU compiles as its own kernel, at ~0.15 s a leaf on
the host: the SDXL base's train-state init took 492 s to compile for an H200, its frozen VAE and text
encoders' 226 s (bench/RESULTS.md, session 20), before the first step of every run that starts fresh or
from official weights. Here a leaf's bits are murmur3's 32-bit finaliser of (counter, key), a dozen
integer ops per element: 71 s and 29 s, with the same initialisers (lecun_normal's truncated normal
stays). The bits are elementwise over an iota, so a sharded draw gives the same bits on any mesh (the
float transforms after them may round differently by an ulp). For initial weights only: noise and
dropout in training keep jax's default PRNG.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend.random import define_prng_impl

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters before mixing


def _mix(x):
    """murmur3's fmix32: every input bit flips each output bit with probability ~1/2."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _stream(key, n):
    """n uint32 words of the key's stream."""
    i = jax.lax.iota(jnp.uint32, n)
    return _mix(_mix(i * jnp.uint32(_GOLDEN) ^ key[0]) + key[1])


def _seed(seed):
    s = jnp.asarray(seed).astype(jnp.uint32)
    return jnp.stack([_mix(s ^ jnp.uint32(_GOLDEN)), _mix(s + jnp.uint32(0x7F4A7C15))])


def _fold_in(key, data):
    d = _mix(jnp.asarray(data).astype(jnp.uint32) ^ jnp.uint32(0x6A09E667))
    return jnp.stack([_mix(key[0] ^ d), _mix(key[1] + d)])


def _split(key, shape):
    return _stream(key, 2 * math.prod(shape)).reshape(*shape, 2)


def _random_bits(key, bit_width, shape):
    words = _stream(key, math.prod(shape)).reshape(shape)
    if bit_width == 32:
        return words
    if bit_width in (8, 16):
        return words.astype(jnp.uint8 if bit_width == 8 else jnp.uint16)
    high = _stream(_fold_in(key, 1), math.prod(shape)).reshape(shape)
    return (high.astype(jnp.uint64) << 32) | words.astype(jnp.uint64)


IMPL = define_prng_impl(key_shape=(2,), seed=_seed, split=_split, random_bits=_random_bits, fold_in=_fold_in,
                        name="init_hash32", tag="ih")


def key(rng):
    """A key of this PRNG from `rng`: jax.random.PRNGKey's uint32[2] data or a typed key of any impl. A
    threefry key's two words become this PRNG's key as they are, so a config seed still picks fixed
    params (other params than threefry's own draw gave)."""
    if jnp.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    data = jnp.asarray(rng, jnp.uint32).reshape(-1)
    if data.shape != (2,):  # e.g. an rbg key's four words
        data = jnp.stack([_mix(data[0::2].sum(dtype=jnp.uint32)), _mix(data[1::2].sum(dtype=jnp.uint32))])
    return jax.random.wrap_key_data(data, impl=IMPL)
