"""LPIPS perceptual distance (Zhang et al. 2018, "v0.1" VGG16 variant) in Flax, NHWC, frozen.

As the reference `lpips.LPIPS(net="vgg")` (richzhang/PerceptualSimilarity; taming's lpips.py is the
same network): inputs in [-1, 1] are shifted/scaled by the ScalingLayer constants, run through VGG16's
`features` up to relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3; each feature map is unit-normalised
over channels (eps 1e-10), the squared difference of the two images' features goes through a 1x1 conv
without bias ("lin" layer, one output channel), is averaged over space, and the five terms are summed.

Weights come only from a file the user supplies (no download, ever), a safetensors file with the
reference's state-dict names:
    net.slice{1..5}.{i}.weight / .bias    VGG16 convs, i the index in torchvision's vgg16().features
    lin{0..4}.model.1.weight              the learned linear layers (or lins.{k}.model.1.weight)
torchvision's own names (features.{i}.weight / .bias) are accepted for the VGG part too, so a file
made from torchvision's vgg16 state dict plus the lpips package's vgg.pth lin weights works.

    model, params = lpips.load(path)
    d = model.apply({"params": params}, images, recon)   # (B,) distances
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.convert.common import CheckpointError, conv_to_flax, conv_to_torch, read_safetensors
from sdxl_jax.models import layers

# ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# (name, torch index in vgg16().features, out channels, slice) for every conv; a 2x2 max pool opens
# each slice after the first. The slice outputs are relu1_2 ... relu5_3.
VGG16_CONVS = (
    ("conv1_1", 0, 64, 1), ("conv1_2", 2, 64, 1),
    ("conv2_1", 5, 128, 2), ("conv2_2", 7, 128, 2),
    ("conv3_1", 10, 256, 3), ("conv3_2", 12, 256, 3), ("conv3_3", 14, 256, 3),
    ("conv4_1", 17, 512, 4), ("conv4_2", 19, 512, 4), ("conv4_3", 21, 512, 4),
    ("conv5_1", 24, 512, 5), ("conv5_2", 26, 512, 5), ("conv5_3", 28, 512, 5),
)
CHANNELS = (64, 128, 256, 512, 512)


def _normalize(f, eps=1e-10):
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
    """(images, recon) NHWC in [-1, 1] -> (B,) LPIPS distances, fp32. Gradients flow to both inputs;
    the params are meant to stay frozen (keep them out of the optimizer)."""

    dtype: jnp.dtype = jnp.float32

    def _features(self, x):
        x = (x.astype(jnp.float32) - jnp.array(SHIFT)) / jnp.array(SCALE)
        x = x.astype(self.dtype)
        outs, current = [], 1
        for name, _, ch, sl in VGG16_CONVS:
            if sl != current:
                outs.append(x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
                current = sl
            x = nn.relu(layers.conv(ch, 3, padding=1, dtype=self.dtype, name=name)(x))
        outs.append(x)
        return [o.astype(jnp.float32) for o in outs]

    @nn.compact
    def __call__(self, images, recon):
        # One VGG pass over both images (shared weights, one compiled conv per layer).
        n = images.shape[0]
        feats = self._features(jnp.concatenate([images, recon.astype(images.dtype)], axis=0))
        total = 0.0
        for k, f in enumerate(feats):
            a, b = f[:n], f[n:]
            diff = jnp.square(_normalize(a) - _normalize(b))
            # The 1x1 "lin" conv is a Dense over channels in NHWC.
            lin = layers.dense(1, ("conv_in", None), use_bias=False, name=f"lin{k}")(diff)
            total = total + jnp.mean(lin, axis=(1, 2, 3))
        return total


def from_torch(state: dict[str, np.ndarray], where: str = "the LPIPS weights") -> dict:
    """Reference state dict (flat numpy) -> our params tree. Missing tensors are one error naming them."""
    params, missing = {}, []

    def get(*names):
        for n in names:
            if n in state:
                return np.asarray(state[n], np.float32)
        missing.append(names[0])
        return None

    for name, idx, ch, sl in VGG16_CONVS:
        w = get(f"net.slice{sl}.{idx}.weight", f"features.{idx}.weight")
        b = get(f"net.slice{sl}.{idx}.bias", f"features.{idx}.bias")
        if w is not None and b is not None:
            if w.shape[0] != ch:
                raise CheckpointError(f"{where}: VGG16 conv {idx} has {w.shape[0]} output channels, expected "
                                      f"{ch}; is this the VGG variant of LPIPS?")
            params[name] = {"kernel": conv_to_flax(w), "bias": b}
    for k, ch in enumerate(CHANNELS):
        w = get(f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight")
        if w is not None:
            params[f"lin{k}"] = {"kernel": w.reshape(1, ch).T}
    if missing:
        raise CheckpointError(
            f"{where} lack {len(missing)} tensors ({', '.join(missing[:6])}"
            f"{', ...' if len(missing) > 6 else ''}). "
            "LPIPS needs the VGG16 convs (net.slice*.N.* or torchvision features.N.*) and lin0..lin4 "
            "(lpips package vgg.pth); build the file with both, saved as safetensors."
        )
    return params


def to_torch(params) -> dict[str, np.ndarray]:
    """Our params tree -> the reference state-dict names (net.slice*, lin*.model.1.weight)."""
    out = {}
    for name, idx, _, sl in VGG16_CONVS:
        out[f"net.slice{sl}.{idx}.weight"] = conv_to_torch(np.asarray(params[name]["kernel"]))
        out[f"net.slice{sl}.{idx}.bias"] = np.asarray(params[name]["bias"])
    for k, ch in enumerate(CHANNELS):
        out[f"lin{k}.model.1.weight"] = np.asarray(params[f"lin{k}"]["kernel"]).T.reshape(1, ch, 1, 1)
    return out


def load(path: str, dtype=jnp.float32) -> tuple[LPIPS, dict]:
    """(LPIPS module, params as jax arrays) from a user-supplied safetensors file."""
    if not path:
        raise CheckpointError("LPIPS needs a weights file: set the perceptual weights path (a .safetensors "
                              "with VGG16 + lin weights), or set the perceptual loss weight to 0")
    if not os.path.isfile(path):
        raise CheckpointError(f"LPIPS weights {path} not found; we never download them. Convert the lpips "
                              "package's VGG weights to safetensors and point the config at that file.")
    params = from_torch(read_safetensors(path), where=path)
    return LPIPS(dtype=dtype), jax.tree.map(jnp.asarray, params)
