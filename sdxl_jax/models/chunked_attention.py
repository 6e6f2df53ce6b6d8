"""Memory-efficient attention in plain JAX: the flash-attention algorithm over key/value blocks.

softmax(q k^T / sqrt(d)) v without materialising the (L x S) score matrix: a scan over blocks of
`block` keys keeps a running max, normaliser and fp32 output (online softmax). The custom VJP saves
only q, k, v, the output and the per-query log-sum-exp, and recomputes each block's probabilities in
the backward pass (Dao et al. 2022, FlashAttention-2's backward). Peak memory per attention layer is
O(L x block) instead of O(L x S), whatever the remat policy and however XLA schedules the program; in
the SDXL base's fsdp-8 train step at 1024^2 this removes 7.6 GiB per chip from the compiled peak
(bench/RESULTS.md, 2026-11-26 session 3). Works on every backend; numerics follow
jax.nn.dot_product_attention(implementation="xla"): fp32 logits and softmax, probabilities cast to the
value dtype for the second matmul, fp32 accumulation (same numbers as "xla" to float rounding).
Keys that fit in one block take the plain path (`attention`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

DEFAULT_BLOCK = 512
# checkpoint_name()s of the forward's output and log-sum-exp: a remat policy that saves dots must also
# save these (sdxl_jax.models.unet.REMAT_POLICIES). Otherwise it recomputes the forward scan for the
# backward's residuals and, dots being saveable, keeps every block's logits for that recompute
# (measured: 3 x 640 MiB per 4096-token layer of the SDXL base).
_OUT, _LSE = "chunked_attention_out", "chunked_attention_lse"
RESIDUAL_NAMES = (_OUT, _LSE)
_NEG = -1e30  # finite "minus infinity" for padded keys: exp() underflows to exactly 0, no NaNs


def attention(q, k, v, *, block: int = DEFAULT_BLOCK):
    """(B, L, H, D) q and (B, S, H, D) k, v -> (B, L, H, D), in q's dtype.

    Keys that fit one block (cross-attention's 77 text tokens) take plain XLA attention: measured at
    the SDXL base's 1024^2 shapes (bench/RESULTS.md, 2026-11-26 session 3), a one-block custom VJP
    there saves 0.19 GiB per chip at batch 1 (0.37 at batch 2) and makes that op 1.6x slower on CPU."""
    if k.shape[1] <= block:
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return _blockwise(q, k, v, block)


def _padded(k, v, block):
    """Keys/values padded to whole blocks (a copy only when S is not a multiple of `block`), the block
    count, and a (n, block) key mask. Blocks are sliced out of these in the loops (no stacked copy)."""
    s = k.shape[1]
    n = math.ceil(s / block)
    pad = n * block - s
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        k, v = jnp.pad(k, widths), jnp.pad(v, widths)
    return k, v, n, (jnp.arange(n * block) < s).reshape(n, block)


def _block(t, j, block):
    return jax.lax.dynamic_slice_in_dim(t, j * block, block, axis=1)


def _logits(q, kb, valid, scale):
    """(B, H, L, block) fp32 logits of one key block; padded keys get _NEG."""
    s = jnp.einsum("blhd,bshd->bhls", q, kb, preferred_element_type=jnp.float32) * scale
    return jnp.where(valid[None, None, None, :], s, _NEG)


def _forward(q, k, v, block):
    b, l, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    k, v, n, valid = _padded(k, v, block)

    def step(carry, j):
        m, den, acc = carry  # (B, H, L), (B, H, L), (B, L, H, D) fp32
        vj = _block(v, j, block)
        s = _logits(q, _block(k, j, block), valid[j], scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        den = den * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bhls,bshd->blhd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
        acc = acc * jnp.swapaxes(corr, 1, 2)[..., None] + pv
        return (m_new, den, acc), None

    init = (
        jnp.full((b, h, l), _NEG, jnp.float32),
        jnp.zeros((b, h, l), jnp.float32),
        jnp.zeros((b, l, h, d), jnp.float32),
    )
    (m, den, acc), _ = jax.lax.scan(step, init, jnp.arange(n))
    out = (acc / jnp.swapaxes(den, 1, 2)[..., None]).astype(q.dtype)
    lse = m + jnp.log(den)  # (B, H, L)
    return checkpoint_name(out, _OUT), checkpoint_name(lse, _LSE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise(q, k, v, block):
    return _forward(q, k, v, block)[0]


def _blockwise_fwd(q, k, v, block):
    out, lse = _forward(q, k, v, block)
    return out, (q, k, v, out, lse)


def _blockwise_bwd(block, res, dout):
    q, k, v, out, lse = res
    s_len, d = k.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    kp, vp, n, valid = _padded(k, v, block)
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij (FlashAttention-2, eq. for dS)
    delta = jnp.einsum("blhd,blhd->bhl", dout.astype(jnp.float32), out.astype(jnp.float32))

    def step(dq, j):
        kj, vj = _block(kp, j, block), _block(vp, j, block)
        p = jnp.exp(_logits(q, kj, valid[j], scale) - lse[..., None])  # (B, H, L, block) fp32
        dv = jnp.einsum("bhls,blhd->bshd", p.astype(dout.dtype), dout, preferred_element_type=jnp.float32)
        dp = jnp.einsum("blhd,bshd->bhls", dout, vj, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bhls,bshd->blhd", ds, kj, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bhls,blhd->bshd", ds, q, preferred_element_type=jnp.float32)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))  # each key block's gradient is complete here

    # The fp32 dq accumulator starts as dout * 0 rather than zeros: a constant initial carry becomes an
    # operand-free buffer allocation that the TPU scheduler may place anywhere, and it placed every
    # layer's at the step's memory peak (bench/RESULTS.md, 2026-11-27 session 6). Computed from dout it
    # cannot exist before this layer's backward. (XLA does not fold x * 0 for floats: NaN and inf.)
    dq, (dk, dv) = jax.lax.scan(step, dout.astype(jnp.float32) * 0, jnp.arange(n))

    def unstack(t):  # (n, B, block, H, D) -> (B, S, H, D), padding dropped
        return jnp.moveaxis(t, 0, 1).reshape(t.shape[1], -1, *t.shape[3:])[:, :s_len]

    return dq.astype(q.dtype), unstack(dk), unstack(dv)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
