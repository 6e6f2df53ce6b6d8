"""PatchGAN discriminator: parity with taming's NLayerDiscriminator layout written in PyTorch (GroupNorm
in place of BatchNorm, as ours), shapes, logical names, config errors, and that it learns on shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from sdxl_jax.autoencoder import losses
from sdxl_jax.autoencoder.discriminator import PRESETS, DiscriminatorConfig, NLayerDiscriminator
from sdxl_jax.convert.common import conv_to_torch
from sdxl_jax.data import shapes


def torch_discriminator(cfg: DiscriminatorConfig):
    """taming NLayerDiscriminator(input_nc=3, ndf, n_layers) with norm_layer = GroupNorm."""
    tnn = torch.nn
    seq = [tnn.Conv2d(3, cfg.ndf, 4, 2, 1), tnn.LeakyReLU(0.2)]
    prev = cfg.ndf
    for n in range(1, cfg.n_layers + 1):
        ch = cfg.ndf * min(2**n, 8)
        seq += [tnn.Conv2d(prev, ch, 4, 2 if n < cfg.n_layers else 1, 1),
                tnn.GroupNorm(cfg.norm_groups, ch, eps=1e-5), tnn.LeakyReLU(0.2)]
        prev = ch
    seq.append(tnn.Conv2d(prev, 1, 4, 1, 1))
    return tnn.Sequential(*seq)


def shapes_images(n, side):
    rows = [("circle", "red", "blue"), ("square", "yellow", "green"), ("cross", "white", "purple")]
    imgs = [shapes.render(*rows[i % 3], side, side, center=(0.4 + 0.05 * i, 0.5), size=0.3) for i in range(n)]
    return np.stack(imgs).astype(np.float32) / 127.5 - 1.0


def test_parity_with_torch_layout():
    cfg = PRESETS["tiny"]
    model = NLayerDiscriminator(cfg)
    x = shapes_images(2, 32)
    params = jax.tree.map(np.array, nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x)["params"]))
    rng = np.random.default_rng(0)
    ref = torch_discriminator(cfg)
    convs = [m for m in ref if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in ref if isinstance(m, torch.nn.GroupNorm)]
    names = [f"conv_{i}" for i in range(cfg.n_layers + 1)] + ["conv_out"]
    with torch.no_grad():
        for conv, name in zip(convs, names, strict=True):
            conv.weight.copy_(torch.from_numpy(conv_to_torch(params[name]["kernel"]).copy()))
            conv.bias.copy_(torch.from_numpy(rng.normal(size=conv.bias.shape).astype(np.float32) * 0.1))
            params[name]["bias"] = conv.bias.numpy().copy()
        for i, norm in enumerate(norms, 1):
            for ours, theirs in (("scale", norm.weight), ("bias", norm.bias)):
                theirs.copy_(torch.from_numpy(1.0 * (ours == "scale") + rng.normal(size=theirs.shape).astype(
                    np.float32) * 0.1))
                params[f"norm_{i}"]["norm"][ours] = theirs.numpy().copy()
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, x))
    # 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (stride 1, kernel 4, pad 1)
    assert got.shape == want.shape == (2, 6, 6, 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_default_patch_grid_and_logical_names():
    model = NLayerDiscriminator(PRESETS["default"])
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    out = jax.eval_shape(model.apply, variables, jnp.zeros((1, 256, 256, 3)))
    assert out.shape == (1, 30, 30, 1) and out.dtype == jnp.float32  # taming's 70x70 PatchGAN
    specs = jax.tree.leaves(nn.get_partition_spec(variables), is_leaf=lambda s: s is None or
                            isinstance(s, jax.sharding.PartitionSpec))
    assert specs and all(s is not None and len(s) > 0 for s in specs)
    kernels = {k: v["kernel"].shape for k, v in nn.meta.unbox(variables["params"]).items() if "kernel" in v}
    assert kernels["conv_0"] == (4, 4, 3, 64) and kernels["conv_3"] == (4, 4, 256, 512)


def test_config_errors():
    with pytest.raises(ValueError, match="norm"):
        DiscriminatorConfig(norm="batch")
    with pytest.raises(ValueError, match="norm_groups"):
        DiscriminatorConfig(ndf=12, norm_groups=32)
    assert DiscriminatorConfig(ndf=12, norm="none").channels == (12, 24, 48, 96)


def test_learns_real_from_fake_on_shapes():
    """A few hinge-loss steps separate rendered shapes from blurred/shifted reconstructions."""
    model = NLayerDiscriminator(PRESETS["tiny"])
    real = jnp.asarray(shapes_images(4, 16))
    fake = 0.6 * real + 0.4 * jnp.roll(real, 3, axis=2)
    params = jax.jit(model.init)(jax.random.key(1), real)["params"]
    opt = optax.adam(2e-3)
    state = opt.init(params)

    def loss_fn(p):
        return losses.hinge_d_loss(model.apply({"params": p}, real), model.apply({"params": p}, fake))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    first = None
    for _ in range(30):
        params, state, loss = step(params, state)
        first = float(loss) if first is None else first
    assert float(loss) < 0.5 * first, (first, float(loss))
