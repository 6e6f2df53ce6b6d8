"""Pallas splash (flash) attention on TPU behind layers.dot_product_attention(kernel="splash").

Imported lazily, only on TPU. The kernel wants (heads, length, head_dim) per example with lengths that are
multiples of its block size, and does not scale q, so we:
  - scale q by 1/sqrt(head_dim) (SPEC.md: scale 1/sqrt(64)),
  - pad q and kv lengths up to whole blocks (77 text tokens -> 128) and mask the padded keys with
    segment ids (real keys segment 0, padding 1; padded query rows are computed and dropped). A block is
    the largest of 1024, 512, 256 and 128 tokens whose padded length is within 1/8 of the sequence of
    the shortest any of them pads it to (`block`): 1024 for every image sequence of SDXL's 40 buckets
    (4096 and 1024 tokens at 1024^2, 3840 and 960 at 960 x 1024: at most 10.8% of padding), 128 for the
    text. The kernel's own default, 128 everywhere, runs a 4096-token self-attention as 20,480 grid steps
    per row pair (2 x 10 heads x 32 x 32) of 4 MFLOP each, where every Pallas grid step has a fixed cost
    on top of its work; 1024 makes them 64 times fewer and 64 times larger. The rule before (at most 1/16
    of padding, else the smallest block) gave the 960 tokens of the 960 x 1024 bucket, which every block
    pads to 1024, 128-token blocks: 64 grid steps a head where 1024 takes one (bench/RESULTS.md, sessions
    27 and 28). 2048 does not fit: its kernels need more than the 16 MiB of scoped VMEM (the v5e's
    forward 23.9 MiB), which XLA:TPU checks when it compiles (CompileTimeScopedVmemOom on v4, v5e, v5p
    and v6e, deviceless; 1024 compiles on all four),
  - take the gradients from the fused backward kernel (`fused_backward`, the default): one kernel computes
    dK, dV and dQ, 5 products of L x S x head_dim where the separate dkv and dq kernels take 7, dQ as one
    bf16 partial per key block summed afterwards (as accurate as the dq kernel's fp32 accumulator at 4096
    keys; bench/attention_accuracy.py),
  - name the forward's output and log-sum-exp (RESIDUAL_NAME) for the dots remat policies to keep, so that
    the backward does not run the forward kernel again (bench/RESULTS.md, session 29),
  - vmap over the batch, inside a shard_map over the traced-for mesh (jax.set_mesh): XLA cannot
    partition a Mosaic kernel ("Mosaic kernels cannot be automatically partitioned"; found by compiling
    the sharded train step for a TPU v5e topology ahead of time, bench/train_step.py --topology), so each
    chip runs the kernel on its own examples and heads. The split follows the logical rules in scope
    (activation_batch, activation_length for queries, activation_heads), dropping mesh axes that do not
    divide the dimension; keys and values are whole along their length.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from sdxl_jax import parallel

BLOCKS = (1024, 512, 256, 128)  # the block sizes tried; 128 is the TPU's lane width
# A larger block may pad a sequence beyond the shortest padded length by at most this fraction of it
PADDING = 1 / 8
HEAD_AXES = ("activation_batch", "activation_length", "activation_heads", None)
# checkpoint_name() of the kernel's forward results that its backward reads, the output and the (H, L) fp32
# log-sum-exp: the dots remat policies save them (models/unet.py REMAT_POLICIES), so that the backward does
# not run the forward kernel again.
RESIDUAL_NAME = "splash_attention_residual"


def block(length: int) -> int:
    """The block for a sequence of `length` tokens: the largest of BLOCKS whose padded length is within
    length * PADDING of the shortest that any of them pads it to."""
    padded = {b: b * math.ceil(length / b) for b in BLOCKS}
    shortest = min(padded.values())
    return max(b for b in BLOCKS if padded[b] - shortest <= length * PADDING)


def _kernel(heads: int, q_len: int, kv_len: int, bq: int, bk: int, fused: bool, interpret: bool):
    """The kernel for these shapes, made for each call: its block masks become constants of the program
    being traced (the kernel's own cache keeps the numpy work they come from). Kept across calls, as it
    was, a kernel first made while one program was traced leaked that program's tracers to the next one at
    the same shapes (another bucket with as many tokens, the preview sampler): UnexpectedTracerError."""
    mask = mask_lib.MultiHeadMask([mask_lib.FullMask((q_len, kv_len)) for _ in range(heads)])
    sizes = splash.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk,
        block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
        **(dict(use_fused_bwd_kernel=True) if fused else dict(block_q_dq=bq, block_kv_dq=bk)),
    )
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                                  residual_checkpoint_name=RESIDUAL_NAME)


def _pad_to(x, n, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


def splash_attention(q, k, v, *, fused_backward: bool = True, interpret: bool = False):
    """softmax(q k^T / sqrt(d)) v for (B, L, H, D) inputs via the Pallas TPU splash kernel, per chip of
    the mesh in scope. `interpret=True` runs the kernel in the Pallas interpreter (any backend; tests)."""
    local = functools.partial(_splash_local, fused=fused_backward, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v)
    q_spec = parallel.fit_spec(q.shape, nn.logical_to_mesh_axes(HEAD_AXES), mesh)
    kv_spec = P(q_spec[0], None, q_spec[2], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)


def _splash_local(q, k, v, *, fused: bool, interpret: bool):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = block(lq), block(lk)
    pq, pk = bq * math.ceil(lq / bq), bk * math.ceil(lk / bk)
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    # (B, L, H, D) -> (B, H, L, D), padded to whole blocks
    q, k, v = (_pad_to(jnp.swapaxes(t, 1, 2), n, 2) for t, n in ((q, pq), (k, pk), (v, pk)))
    segments = splash.SegmentIds(q=jnp.zeros((pq,), jnp.int32), kv=(jnp.arange(pk) >= lk).astype(jnp.int32))
    kernel = _kernel(h, pq, pk, bq, bk, fused, interpret)
    out = jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=segments))(q, k, v)
    return jnp.swapaxes(out[:, :, :lq], 1, 2).astype(v.dtype)
