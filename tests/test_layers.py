"""Shared Flax blocks: sinusoidal embedding, fp32 norm statistics, attention kernels and fallbacks,
resamplers and block naming. The assembled UNet is checked against diffusers in test_convert_unet.py."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from sdxl_jax.data import buckets
from sdxl_jax.models import layers, tpu_attention


@pytest.mark.parametrize("dim", [320, 256, 7])
def test_timestep_embedding_matches_diffusers(dim):
    t = np.array([0, 1, 17, 500, 999, 1024.5], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    ours = layers.timestep_embedding(jnp.asarray(t), dim)
    # Same formula in fp32; XLA's and torch's exp differ by an ulp in a frequency, which the argument t * f
    # multiplies: at t ~ 1000 an fp32 argument is only good to ~1e-4 (its ulp is 6e-5 .. 1.2e-4).
    np.testing.assert_allclose(ours[:3], ref.numpy()[:3], atol=1e-6)
    np.testing.assert_allclose(ours, ref.numpy(), atol=3e-4)


def test_group_norm_statistics_stay_fp32_under_bf16():
    # A large mean over a small spread: bf16 statistics (8 mantissa bits) would lose the spread entirely.
    x = 300.0 + jax.random.normal(jax.random.key(0), (2, 4, 4, 64))
    x = x.astype(jnp.bfloat16)
    norm = layers.GroupNorm(dtype=jnp.bfloat16)
    params = norm.init(jax.random.key(1), x)
    out = norm.apply(params, x)
    ref = layers.GroupNorm(dtype=jnp.float32).apply(params, x.astype(jnp.float32))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.03)  # bf16 output rounding only
    assert float(jnp.std(ref)) > 0.9


@pytest.mark.parametrize("form", ["halves", "rolled"])
def test_geglu_gradient_matches_torch_autograd_and_rounds_once_in_bf16(form):
    # layers.geglu has its own backward (layers.geglu_grad: "halves" off GPU, "rolled" on GPU); torch's
    # autograd of diffusers' GEGLU activation (hidden * gelu(gate), exact GELU) is the reference.
    rng = np.random.default_rng(0)
    h = (3 * rng.standard_normal((2, 5, 48))).astype(np.float32)
    dy = rng.standard_normal((2, 5, 24)).astype(np.float32)

    def torch_grad(h, dy):
        th = torch.from_numpy(h).requires_grad_()
        hidden, gate = th.chunk(2, dim=-1)
        y = hidden * torch.nn.functional.gelu(gate)
        y.backward(torch.from_numpy(dy))
        return y.detach().numpy(), th.grad.numpy()

    y_ref, g_ref = torch_grad(h, dy)
    np.testing.assert_allclose(layers.geglu(jnp.asarray(h)), y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layers.geglu_grad(jnp.asarray(h), jnp.asarray(dy), form), g_ref,
                               rtol=1e-5, atol=1e-5)
    assert np.abs(g_ref[..., 24:]).max() > 1  # the gate's half, where GELU's derivative enters
    if form == "halves":  # what the backward takes off GPU
        _, vjp = jax.vjp(layers.geglu, jnp.asarray(h))
        np.testing.assert_array_equal(vjp(jnp.asarray(dy))[0], layers.geglu_grad(h, dy, form))

    # bf16 in and out: computed in fp32 from the bf16 inputs, so within one bf16 rounding of the fp32
    # gradient of those same inputs.
    hb, dyb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16)
    gb = layers.geglu_grad(hb, dyb, form)
    assert gb.dtype == jnp.bfloat16
    _, g_ref_b = torch_grad(np.asarray(hb, np.float32), np.asarray(dyb, np.float32))
    np.testing.assert_allclose(np.asarray(gb, np.float32), g_ref_b, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 256, 24), (3, 4, 8, 16), (2, 77, 24), (512, 12), (5,)])
def test_column_sum_is_the_sum_over_all_but_the_last_axis(shape):
    """Two stages (SUM_ROWS rows of each batch element, a barrier, the rest) where the rows split, one sum
    where they do not (77 tokens) and for a 2-D input, whose rows are the batch; a vector is its own sum."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) + 3
    want = x.astype(np.float64).reshape(-1, shape[-1]).sum(0) if len(shape) > 1 else x
    np.testing.assert_allclose(layers.column_sum(jnp.asarray(x)), want, rtol=1e-6, atol=1e-5)
    barrier = "optimization_barrier" in str(jax.make_jaxpr(layers.column_sum)(x))
    assert barrier == (shape == (2, 256, 24))  # (3, 4, 8, 16): 32 rows per batch element, not over SUM_ROWS


def _torch_layer_norm(x, scale, bias, dy, eps=1e-5):
    tx, ts, tb = (torch.from_numpy(np.asarray(a, np.float32)).requires_grad_() for a in (x, scale, bias))
    y = torch.nn.functional.layer_norm(tx, (tx.shape[-1],), ts, tb, eps)
    y.backward(torch.from_numpy(np.asarray(dy, np.float32)))
    return y.detach().numpy(), tx.grad.numpy(), ts.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("tokens", [256, 77])
def test_layer_norm_gpu_backward_matches_torch_autograd_and_flax(monkeypatch, tokens):
    """On a GPU LayerNorm runs layers.layer_norm (its own backward, column_sum for scale and bias);
    elsewhere flax's nn.LayerNorm. The same params; values and gradients against torch's autograd of
    F.layer_norm in fp32, and the same forward bits as flax's."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, tokens, 48)) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    scale, bias = rng.standard_normal(48).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    y_ref, dx_ref, ds_ref, db_ref = _torch_layer_norm(x, scale, bias, dy)
    ln = layers.LayerNorm()

    def run(x, dtype=jnp.float32):
        mod = layers.LayerNorm(dtype=dtype)
        params = {"params": {"norm": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}}
        y, vjp = jax.vjp(lambda x, p: mod.apply(p, x), x, params)
        dx, dp = vjp(jnp.asarray(dy, y.dtype))
        return y, dx, dp["params"]["norm"]["scale"], dp["params"]["norm"]["bias"]

    flax_path = run(jnp.asarray(x))
    flax_tree = jax.tree.map(jnp.shape, ln.init(jax.random.key(0), x))
    monkeypatch.setattr(layers, "target_platform", lambda: "gpu")
    assert jax.tree.map(jnp.shape, ln.init(jax.random.key(0), x)) == flax_tree
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda x: ln.apply(ln.init(jax.random.key(0), x), x))(x))
    gpu_path = run(jnp.asarray(x))
    for got in (gpu_path, flax_path):
        for g, w in zip(got, (y_ref, dx_ref, ds_ref, db_ref), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)
    assert np.abs(ds_ref).max() > 1 and np.abs(dx_ref).max() > 0.1
    # the forward is flax's arithmetic, op for op: the same bits on this CPU, in fp32 and in bf16
    np.testing.assert_array_equal(gpu_path[0], flax_path[0])
    yb = run(jnp.asarray(x, jnp.bfloat16), jnp.bfloat16)[0]
    monkeypatch.setattr(layers, "target_platform", lambda: "cpu")
    np.testing.assert_array_equal(yb, run(jnp.asarray(x, jnp.bfloat16), jnp.bfloat16)[0])


def test_dense_gpu_bias_gradient_is_column_sum_and_matches_torch(monkeypatch):
    """layers.Dense is nn.Dense written out; on a GPU it adds its bias through add_bias (bias gradient
    from column_sum). The same params and forward, and gradients against torch's autograd of F.linear."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 256, 16)).astype(np.float32)
    dy = rng.standard_normal((2, 256, 24)).astype(np.float32)
    dense = layers.dense(24, ("embed", "mlp"), name="proj")
    params = nn.meta.unbox(dense.init(jax.random.key(0), x))
    params["params"]["bias"] = jnp.asarray(rng.standard_normal(24), jnp.float32)

    def run():
        y, vjp = jax.vjp(lambda x, p: dense.apply(p, x), jnp.asarray(x), params)
        dx, dp = vjp(jnp.asarray(dy))
        return y, dx, dp["params"]["kernel"], dp["params"]["bias"]

    plain = run()
    flax_dense = nn.Dense(24, name="proj")  # what layers.Dense writes out
    np.testing.assert_array_equal(plain[0], flax_dense.apply(params, jnp.asarray(x)))
    monkeypatch.setattr(layers, "target_platform", lambda: "gpu")
    shapes = jax.tree.map(jnp.shape, params)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(dense.init(jax.random.key(0), x))) == shapes
    assert "optimization_barrier" in str(jax.make_jaxpr(lambda: run())())
    gpu = run()
    np.testing.assert_array_equal(gpu[0], plain[0])
    w, b = (torch.tensor(np.asarray(params["params"][k])).requires_grad_() for k in ("kernel", "bias"))
    tx = torch.from_numpy(x).requires_grad_()
    ty = torch.nn.functional.linear(tx, w.T, b)
    ty.backward(torch.from_numpy(dy))
    for got in (gpu, plain):
        want = (ty.detach().numpy(), tx.grad.numpy(), w.grad.numpy(), b.grad.numpy())
        for g, w_ in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w_, rtol=1e-5, atol=2e-5)


def _naive_attention(q, k, v):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def _qkv(lq=12, lk=7, h=2, d=8, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(kk, (2, n, h, d)).astype(dtype) for kk, n in zip(k, (lq, lk, lk), strict=True)]


@pytest.mark.parametrize("kernel", layers.ATTENTION_KERNELS)
def test_attention_kernels_agree_and_fall_back_off_their_hardware(kernel):
    q, k, v = _qkv()
    out = layers.dot_product_attention(q, k, v, kernel=kernel)  # on CPU cudnn / splash fall back
    np.testing.assert_allclose(out, _naive_attention(*map(np.asarray, (q, k, v))), atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        layers.dot_product_attention(q, k, v, kernel="flash")
    # the benches report each replaced kernel, so a figure labelled cudnn is known to be cuDNN's
    replaced = {"cudnn": "cudnn on cpu: needs an NVIDIA GPU", "splash": "splash on cpu: needs a TPU"}
    if kernel in replaced:  # (the list is the process's: other tests may have added other platforms')
        assert replaced[kernel] in layers.attention_fallbacks("cpu")
        assert set(layers.attention_fallbacks("cpu")) <= set(layers.attention_fallbacks())
        assert all(" on gpu: " in f for f in layers.attention_fallbacks("gpu"))


def test_attention_bf16_softmax_in_fp32():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    out = layers.dot_product_attention(q * 8, k, v)  # sharp softmax: bf16 logits would shift the weights
    ref = _naive_attention(*(np.asarray(t, np.float32) for t in (q * 8, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05)


def test_splash_wrapper_pads_and_masks_like_plain_attention():
    """The TPU kernel in the Pallas interpreter: q of 130 and kv of 77 tokens pad to 256 / 128 blocks."""
    q, k, v = _qkv(lq=130, lk=77, h=2, d=64)
    out = tpu_attention.splash_attention(q, k, v, interpret=True)
    np.testing.assert_allclose(out, _naive_attention(*map(np.asarray, (q, k, v))), atol=2e-5)


def test_splash_blocks_are_as_large_as_the_padding_allows():
    """The largest block whose padding is within 1/8 of the sequence of the least any block needs: 1024 for
    every image sequence of SDXL's 40 buckets (at most 10.8% padded; 960 tokens pad to 1024 in any block,
    which took 128 under a 1/16 limit on the padding itself); 128 for the 77 text tokens; smaller blocks
    where 1024 would pad by more."""
    lengths = (4096, 1024, 3952, 988, 3840, 960, 3696, 2000, 1500, 3584, 77, 130, 1100, 768, 16)
    assert [tpu_attention.block(n) for n in lengths] == [
        1024, 1024, 1024, 1024, 1024, 1024, 1024, 1024, 512, 512, 128, 256, 256, 256, 128]
    for height, width in buckets.SDXL_BUCKETS:  # latent tokens at the base's two attention levels
        for level in (1, 2):
            assert tpu_attention.block((height // 8 >> level) * (width // 8 >> level)) == 1024


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("lq, size", [(2000, 1024), (1500, 512)])
def test_splash_with_large_blocks_matches_plain_attention_and_its_gradients(fused, lq, size):
    """The kernel in the Pallas interpreter with the blocks SDXL's image tokens get: 2000 queries pad to two
    1024 blocks (1500 to three of 512), 77 keys to one of 128. Values and q, k, v gradients equal plain
    attention's, from the fused backward kernel (the default: dQ with dK and dV) and from the separate dq
    kernel."""
    q, k, v = _qkv(lq=lq, lk=77, h=1, d=64)
    assert (tpu_attention.block(lq), tpu_attention.block(77)) == (size, 128)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    ours = functools.partial(tpu_attention.splash_attention, fused_backward=fused, interpret=True)
    plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), _naive_attention(*map(np.asarray, (q, k, v))), atol=2e-5)
    got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5)


def test_splash_runs_per_chip_under_a_sharded_mesh():
    """XLA cannot partition a Mosaic kernel, so under a mesh the kernel runs inside a shard_map split by
    the logical rules in scope (batch over data x fsdp, heads over tensor): same values as unsharded,
    and each chip's kernel sees its own examples and heads only."""
    from configs import common
    from sdxl_jax import parallel

    config = common.base()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    mesh = parallel.make_mesh(config.mesh)
    q, k, v = (jnp.tile(t, (2, 1, 1, 1)) for t in _qkv(lq=130, lk=77, h=2, d=64))  # batch 4, 2 heads
    seen = []
    real = tpu_attention._splash_local

    def spy(q, k, v, **kw):
        seen.append((q.shape, k.shape))
        return real(q, k, v, **kw)

    rules = parallel.rules(config)
    with pytest.MonkeyPatch.context() as mp, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        mp.setattr(tpu_attention, "_splash_local", spy)
        out = jax.jit(lambda q, k, v: tpu_attention.splash_attention(q, k, v, interpret=True))(q, k, v)
    assert seen == [((1, 130, 1, 64), (1, 77, 1, 64))]
    np.testing.assert_allclose(out, _naive_attention(*map(np.asarray, (q, k, v))), atol=2e-5)


def test_splash_under_the_dots_remat_keeps_its_forward_out_of_the_backward(capsys):
    """The dots policies save the kernel's output and its (B, H, L) fp32 log-sum-exp, so the backward runs
    no forward kernel of its own (it did for every attention: about 8 ms of a v5e step, bench/RESULTS.md
    session 29). Counted in the program lowered for a TPU (no TPU needed: the kernels are custom calls);
    the gradients, in the Pallas interpreter, are those without remat. Each kernel, first made while one
    program is traced, serves the next ones (it leaked that program's tracers to them)."""
    import collections
    import re

    from sdxl_jax.models import unet

    q, k, v = _qkv(lq=130, lk=77, h=2, d=64, dtype=jnp.bfloat16)
    w = jnp.eye(64, dtype=q.dtype) * 1.5  # products around the kernel, which the dots policy saves

    def loss(interpret):
        attention = functools.partial(tpu_attention.splash_attention, interpret=interpret)
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q @ w, k, v) @ w).astype(jnp.float32))

    def remat(interpret):
        return jax.checkpoint(loss(interpret), policy=unet.REMAT_POLICIES["dots"])

    step = jax.jit(jax.grad(remat(False), argnums=(0, 1, 2))).trace(q, k, v)
    text = step.lower(lowering_platforms=("tpu",)).as_text()
    kernels = collections.Counter(re.findall(r'@tpu_custom_call.*?kernel_name = "(splash_mha_[a-z]+)', text))
    assert kernels == {"splash_mha_fwd": 1, "splash_mha_dkv": 1}  # the fused backward
    jax.ad_checkpoint.print_saved_residuals(remat(True), q, k, v)
    saved = capsys.readouterr().out.splitlines()
    kept = {line.split()[0] for line in saved if "_splash_attention" in line}
    assert kept == {"bf16[2,2,256,64]", "f32[2,2,256]"}  # (B, H, L, D) output, (B, H, L) log-sum-exp
    got = jax.grad(remat(True), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(True), argnums=(0, 1, 2))(q, k, v)
    for g, w_ in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w_)


@pytest.mark.parametrize("lq,lk", [(12, 77), (13, 77), (13, 8), (12, 8)])
def test_cudnn_wrapper_pads_odd_lengths_and_masks_like_plain_attention(lq, lk):
    """cuDNN's backward refuses odd lengths, so they are padded and masked by length. The same padding
    through XLA on this CPU: values and gradients equal plain attention's (the padded key rows take no
    weight, the padded query rows are dropped and get no gradient)."""
    q, k, v = _qkv(lq=lq, lk=lk, h=2, d=8)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    ours = lambda q, k, v: layers.cudnn_attention(q, k, v, implementation="xla")  # noqa: E731
    plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), _naive_attention(*map(np.asarray, (q, k, v))), atol=2e-5)
    got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_attention_kernel_follows_the_mesh_platform():
    """"auto" and the vendor kernels follow the platform of the mesh being traced for (an accelerator
    topology compiled ahead of time), not the host's default backend."""
    device = jax.sharding.AbstractDevice("TPU v5 lite", None, "tpu")
    tpu = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                    abstract_device=device)
    assert layers.target_platform() == "cpu" and layers.resolved_kernel("auto") == "chunked"
    with jax.sharding.use_abstract_mesh(tpu):
        assert layers.target_platform() == "tpu" and layers.resolved_kernel("auto") == "splash"


def test_self_attention_reads_its_input_through_a_barrier_only_for_cudnn_on_gpu(monkeypatch):
    """XLA:GPU merges the q, k and v projections of one input into one GEMM, whose output cuDNN's call then
    copies apart; so for cuDNN on a GPU, k and v read the input through an optimization barrier. The same
    values, and no barrier for cross-attention, other kernels or other platforms."""
    x = jax.random.normal(jax.random.key(0), (1, 6, 16))
    context = jax.random.normal(jax.random.key(1), (1, 5, 12))

    def barriers(kernel, *args):
        attn = layers.Attention(heads=2, head_dim=8, kernel=kernel)
        params = attn.init(jax.random.key(2), *args)
        jaxpr = jax.make_jaxpr(attn.apply)(params, *args)
        return str(jaxpr).count("optimization_barrier"), attn.apply(params, *args)

    assert barriers("cudnn", x)[0] == 0  # this host's platform: no GPU
    monkeypatch.setattr(layers, "target_platform", lambda: "gpu")
    monkeypatch.setattr(layers, "dot_product_attention", lambda q, k, v, kernel: jax.nn.dot_product_attention(
        q, k, v))
    n, out = barriers("cudnn", x)
    assert n == 1
    np.testing.assert_array_equal(out, barriers("xla", x)[1])
    assert barriers("xla", x)[0] == 0 and barriers("chunked", x)[0] == 0
    assert barriers("cudnn", x, context)[0] == 0


def test_resamplers_and_block_names():
    x = jnp.ones((1, 9, 12, 32))
    down = layers.Downsample(32)
    assert down.apply(down.init(jax.random.key(0), x), x).shape == (1, 5, 6, 32)  # symmetric pad 1
    vae_down = layers.Downsample(32, asymmetric=True)
    # VAE: pad (0, 1) then valid -> floor((9 + 1 - 3) / 2) + 1 = 4 rows, as torch does
    assert vae_down.apply(vae_down.init(jax.random.key(0), x), x).shape == (1, 4, 6, 32)
    up = layers.Upsample(16)
    y = jnp.arange(4.0).reshape(1, 2, 2, 1) * jnp.ones((1, 2, 2, 32))
    p = up.init(jax.random.key(0), y)
    p = jax.tree.map(jnp.zeros_like, nn.meta.unbox(p))
    p["params"]["conv"]["kernel"] = p["params"]["conv"]["kernel"].at[1, 1, 0, 0].set(1.0)  # identity tap
    out = up.apply(p, y)[0, :, :, 0]
    np.testing.assert_array_equal(out, np.repeat(np.repeat(np.arange(4.0).reshape(2, 2), 2, 0), 2, 1))

    block = layers.ResnetBlock(64)
    params = jax.eval_shape(block.init, jax.random.key(0), x, jnp.ones((1, 128)))["params"]
    assert set(params) == {"norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"}
    same = jax.eval_shape(layers.ResnetBlock(32).init, jax.random.key(0), x)["params"]
    assert set(same) == {"norm1", "conv1", "norm2", "conv2"}  # no shortcut, no embedding without emb

    tb = layers.SpatialTransformer(heads=2, head_dim=16, depth=1)
    names = jax.eval_shape(tb.init, jax.random.key(0), x, jnp.ones((1, 5, 24)))["params"]
    blk = names["transformer_blocks_0"]
    assert set(names) == {"norm", "proj_in", "transformer_blocks_0", "proj_out"}
    assert set(blk) == {"norm1", "attn1", "norm2", "attn2", "norm3", "ff"}
    assert set(blk["attn2"]) == {"to_q", "to_k", "to_v", "to_out_0"} and "bias" not in blk["attn2"]["to_q"]
    assert blk["attn2"]["to_k"]["kernel"].value.shape == (24, 32)
    assert blk["ff"]["net_0"]["proj"]["kernel"].value.shape == (32, 256)  # GEGLU: C -> 2 x 4C
