"""LPIPS parity against an independent PyTorch LPIPS (VGG16 built by hand from torch.nn layers, random
weights, the reference package's state-dict names), loaded through our converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from sdxl_jax.autoencoder import lpips
from sdxl_jax.convert.common import CheckpointError, write_safetensors

# torchvision vgg16().features config (cfg "D"): conv widths, "M" = 2x2 max pool.
VGG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


class TorchLPIPS(nn.Module):
    """richzhang/PerceptualSimilarity lpips.LPIPS(net="vgg", version="0.1") forward, written out."""

    def __init__(self):
        super().__init__()
        feats, c = [], 3
        for v in VGG_D:
            if v == "M":
                feats.append(nn.MaxPool2d(2, 2))
            else:
                feats += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.net = nn.Module()
        for s, (a, b) in enumerate(SLICES, 1):
            sl = nn.Sequential()
            for x in range(a, b):
                sl.add_module(str(x), feats[x])
            setattr(self.net, f"slice{s}", sl)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        for k, ch in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(ch, 1, 1, bias=False))

    def forward(self, x0, x1):
        def feats(x):
            h, outs = (x - self.shift) / self.scale, []
            for s in range(1, 6):
                h = getattr(self.net, f"slice{s}")(h)
                outs.append(h)
            return outs

        def norm(f):
            return f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)

        val = 0
        for k, (a, b) in enumerate(zip(feats(x0), feats(x1), strict=True)):
            lin = getattr(self, f"lin{k}").model
            val = val + lin((norm(a) - norm(b)) ** 2).mean(dim=(2, 3), keepdim=True)
        return val


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    model = TorchLPIPS().eval()
    with torch.no_grad():  # lin weights are non-negative in the trained model
        for k in range(5):
            getattr(model, f"lin{k}").model[1].weight.uniform_(0.0, 0.1)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    path = str(tmp_path_factory.mktemp("lpips") / "vgg_lpips.safetensors")
    write_safetensors(path, state)
    return model, state, path


def _images(seed, shape=(2, 36, 44, 3)):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, shape).astype(np.float32)


def test_parity_with_torch(reference):
    model, _, path = reference
    x0, x1 = _images(0), _images(1)
    x1 = (0.7 * x0 + 0.3 * x1).astype(np.float32)  # a plausible reconstruction, not noise
    with torch.no_grad():
        want = model(*(torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x0, x1))).numpy().reshape(-1)
    ours, params = lpips.load(path)
    got = np.asarray(jax.jit(ours.apply)({"params": params}, x0, x1))
    assert got.shape == (2,)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0)
    assert np.all(want > 0)


def test_zero_for_identical_and_grad_finite(reference):
    ours, params = lpips.load(reference[2])
    x0 = jnp.asarray(_images(2, (1, 16, 16, 3)))
    value_and_grad = jax.jit(jax.value_and_grad(lambda r: ours.apply({"params": params}, x0, r).sum()))
    assert float(value_and_grad(x0)[0]) == pytest.approx(0.0, abs=1e-7)
    grad = value_and_grad(x0 * 0.5)[1]
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).sum()) > 0


def test_round_trip_and_torchvision_names(reference):
    _, state, _ = reference
    params = lpips.from_torch(state)
    back = lpips.to_torch(params)
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k])
    # torchvision vgg16 names for the convs + lpips package lin weights load the same.
    renamed = {k.split(".", 2)[2] if k.startswith("net.") else k: v for k, v in state.items()}
    renamed = {("features." + k if k[0].isdigit() else k): v for k, v in renamed.items()}
    again = lpips.from_torch(renamed)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_missing_and_incomplete_files(tmp_path, reference):
    with pytest.raises(CheckpointError, match="never download"):
        lpips.load(str(tmp_path / "nope.safetensors"))
    state = {k: v for k, v in reference[1].items() if not k.startswith("lin3")}
    path = str(tmp_path / "partial.safetensors")
    write_safetensors(path, state)
    with pytest.raises(CheckpointError, match="lin3.model.1.weight"):
        lpips.load(path)
