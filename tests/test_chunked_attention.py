"""The plain-JAX flash attention (sdxl_jax.models.chunked_attention): same numbers and gradients as
materialised attention, padded key blocks masked, and O(L) memory in the compiled gradient program; its bf16
gradients' accuracy, and the TPU splash kernel's beside it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from sdxl_jax.models import chunked_attention, layers, tpu_attention


def _qkv(lq, lk, h=2, d=16, dtype=jnp.float32, sharp=1.0):
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (2, lq, h, d)) * sharp
    k = jax.random.normal(ks[1], (2, lk, h, d))
    v = jax.random.normal(ks[2], (2, lk, h, d))
    w = jax.random.normal(ks[3], (2, lq, h, d))  # cotangent weights for a scalar loss
    return [t.astype(dtype) for t in (q, k, v)] + [w]


def _materialised(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _loss(fn):
    return lambda q, k, v, w: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)


@pytest.mark.parametrize(
    "lq,lk,block",
    [(256, 256, 64), (300, 300, 128), (200, 77, 32), (96, 250, 100)],
    ids=["whole-blocks", "padded-last-block", "cross-attention", "more-keys-than-queries"],
)
def test_blockwise_matches_materialised_attention_and_gradients(lq, lk, block):
    q, k, v, w = _qkv(lq, lk, sharp=3.0)
    out = chunked_attention.attention(q, k, v, block=block)
    np.testing.assert_allclose(out, _materialised(q, k, v), atol=2e-5)
    grads = jax.grad(_loss(lambda *a: chunked_attention.attention(*a, block=block)), argnums=(0, 1, 2))(
        q, k, v, w)
    ref = jax.grad(_loss(_materialised), argnums=(0, 1, 2))(q, k, v, w)
    for name, g, r in zip("qkv", grads, ref, strict=True):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.max(jnp.abs(r))), err_msg=f"d{name}")


def test_blockwise_bf16_keeps_fp32_softmax():
    q, k, v, _ = _qkv(300, 300, dtype=jnp.bfloat16, sharp=8.0)  # sharp softmax: bf16 logits would show
    out = chunked_attention.attention(q, k, v, block=128)
    ref = _materialised(*(t.astype(jnp.float32) for t in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.03)


@pytest.mark.parametrize("kernel", ["chunked", "splash"])
def test_bf16_gradients_over_long_keys_are_as_accurate_as_materialised_bf16(kernel):
    """The backward's delta = rowsum(dO * O) uses the bf16 output (as FlashAttention's does) and each
    block's dS is cast to bf16: over 4096 keys (the SDXL base's longest self-attention at 1024^2) the
    gradients stay as close to fp32 as materialised bf16 attention's (dq: 5.57e-3 vs 5.52e-3 rel. L2;
    accumulating dq in bf16 or computing dS in bf16 gives 6.7e-3 and fails). The same holds for the TPU's
    splash kernel (in the Pallas interpreter), whose fused backward sums dQ from one bf16 partial per
    1024-key block."""
    q, k, v, w = _qkv(4096, 4096, h=1, d=64, sharp=1.5)
    exact = jax.grad(_loss(_materialised), argnums=(0, 1, 2))(q, k, v, w)

    def rel_err(fn):
        bf16 = [t.astype(jnp.bfloat16) for t in (q, k, v)]
        grads = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2)))(*bf16, w)
        return [float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
                for g, r in zip(grads, exact, strict=True)]

    fn = chunked_attention.attention if kernel == "chunked" else functools.partial(
        tpu_attention.splash_attention, interpret=True)
    ours, materialised = rel_err(fn), rel_err(_materialised)
    for name, c, m in zip("qkv", ours, materialised, strict=True):
        assert c < 1.1 * m, f"d{name}: {kernel} bf16 {c:.2e} vs materialised bf16 {m:.2e}"


def test_keys_that_fit_one_block_take_the_plain_path_bit_for_bit():
    q, k, v, _ = _qkv(300, 77)  # cross-attention: 77 text tokens
    np.testing.assert_array_equal(chunked_attention.attention(q, k, v, block=512), _materialised(q, k, v))


def test_layers_chunked_and_auto_kernels_route_here_on_cpu():
    q, k, v, _ = _qkv(12, 7)
    for kernel in ("chunked", "auto"):
        np.testing.assert_allclose(layers.dot_product_attention(q, k, v, kernel=kernel),
                                   _materialised(q, k, v), atol=1e-6)
    assert layers.resolved_kernel("auto") == "chunked"  # on CPU


def test_gradient_program_memory_is_linear_in_sequence_length():
    """XLA's compiled temp memory of the attention gradient: the materialised version holds L x L fp32
    scores and probabilities (32 MiB each here), the blockwise one only L x block slices."""
    lq = 2048
    q, k, v, w = (jax.ShapeDtypeStruct((1, lq, 2, 16), jnp.float32) for _ in range(4))

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2)))
        return grad.lower(q, k, v, w).compile().memory_analysis().temp_size_in_bytes

    full = temp_bytes(_materialised)
    blockwise = temp_bytes(lambda *a: chunked_attention.attention(*a, block=256))
    assert full >= 2 * lq * lq * 4  # the scores, at least
    assert blockwise * 4 < full, (blockwise, full)


def test_unet_dots_policy_saves_attention_residuals_not_block_logits():
    """Under remat "dots" a transformer block must not keep the chunked forward's per-block logits
    (what jax.checkpoint_policies.checkpoint_dots alone does): temp memory of the block's gradient."""
    import flax.linen as nn

    from sdxl_jax.models import unet

    x = jax.ShapeDtypeStruct((1, 2048, 32), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 77, 16), jnp.float32)

    def temp_bytes(policy):
        block = nn.remat(layers.BasicTransformerBlock, policy=policy, prevent_cse=True)(2, 16, "chunked")
        params = jax.eval_shape(block.init, jax.random.key(0), x, ctx)

        def loss(p, x, c):
            return jnp.sum(block.apply(p, x, c) ** 2)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return grad.lower(params, x, ctx).compile().memory_analysis().temp_size_in_bytes

    ours = temp_bytes(unet.REMAT_POLICIES["dots"])
    dots_only = temp_bytes(jax.checkpoint_policies.checkpoint_dots)
    logits = 2 * 2048 * 2048 * 4  # every block's logits of one layer, fp32
    assert dots_only - ours >= logits // 2, (ours, dots_only)


def test_unet_dots_policies_save_the_cudnn_forward_call():
    """cuDNN attention's backward reads its forward's output and softmax statistics; the dots policies
    save that call (by its primitive, jax's own) instead of running it again in the backward. Counted in
    an H100 compile (bench/RESULTS.md); here: the primitive's name is still jax's, and only it is saved."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

    from sdxl_jax.models import unet

    forward = cudnn_fa._dot_product_attention_fwd_p_wrapper
    for name in ("dots", "dots_no_batch"):
        policy = unet.REMAT_POLICIES[name]
        assert policy(forward)
        assert not policy(cudnn_fa._dot_product_attention_bwd_p_wrapper)
        assert not policy(jax.lax.exp_p)
    assert not unet.REMAT_POLICIES["full"](forward)


def _consts_and_carry(scan) -> tuple[int, int]:
    """How many of a scan equation's inputs are loop constants and carries: jax 0.10 gives the counts
    (num_consts, num_carry); jax 0.11 and later give the input groups (consts, carry, xs) as ft_in."""
    if "num_carry" in scan.params:
        return scan.params["num_consts"], scan.params["num_carry"]
    consts, carry, _ = scan.params["ft_in"].elts
    return len(list(consts.vals)), len(list(carry.vals))


def _scans(jaxpr):
    """(scan equation, producer of each variable) for every scan in a jaxpr and its sub-jaxprs."""
    producers = {v: e for e in jaxpr.eqns for v in e.outvars}
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            yield e, producers
        for sub in jex_core.jaxprs_in_params(e.params):
            yield from _scans(sub)


def test_backward_dq_accumulator_is_computed_from_the_gradient():
    """The backward scan's fp32 dq carry must not start as a constant: XLA turns a constant initial
    carry into an operand-free allocation, and the TPU scheduler placed every layer's at the train
    step's memory peak (bench/RESULTS.md, 2026-11-27 session 6: 0.11 GiB per 10 level-3 blocks at
    batch 2 in a v5e fsdp-8 compile). Derived from the incoming gradient, it cannot exist earlier."""
    q, k, v, _ = _qkv(1024, 1024, 2, 8, jnp.bfloat16)
    out, pullback = jax.vjp(chunked_attention.attention, q, k, v)
    jaxpr = jax.make_jaxpr(pullback)(jnp.ones_like(out)).jaxpr
    dq_scans = [(e, p) for e, p in _scans(jaxpr)
                if _consts_and_carry(e)[1] == 1 and e.outvars[0].aval.shape == q.shape]
    assert len(dq_scans) == 1, "expected one backward scan carrying dq"
    scan, producers = dq_scans[0]
    init = scan.invars[_consts_and_carry(scan)[0]]
    assert init.aval.dtype == jnp.float32
    assert not isinstance(init, jex_core.Literal)
    producer = producers.get(init)
    assert producer is not None, "dq's initial carry should be computed inside the backward"
    assert any(isinstance(x, jex_core.Var) for x in producer.invars), f"dq starts as a constant: {producer}"
