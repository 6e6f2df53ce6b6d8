"""sdxl_jax.models.clip_text: exact parameter counts, and fp32 parity with transformers' PyTorch CLIP text
models (random weights, tiny configs) on prompts that pad and prompts that truncate."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sdxl_jax import tokenizer
from sdxl_jax.convert import text as text_convert
from sdxl_jax.models import clip_text

PROMPTS = ["a cat", "A large red barn in a snowy field, at dusk. 4k!", "long " * 100]


@pytest.mark.parametrize("name,expected", [("clip_l", 123_060_480), ("bigg", 694_659_840)])
def test_param_counts(name, expected):
    assert clip_text.count_params(clip_text.PRESETS[name]) == expected


def test_every_param_has_logical_axes():
    model = clip_text.CLIPTextModel(clip_text.PRESETS["tiny_g"])
    boxed = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 77), jnp.int32))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random (LayerNorm affine too), scaled so activations stay O(1) through the layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            elif p.ndim == 2:  # Linear (out, in)
                p.copy_(noise * p.shape[1] ** -0.5)
            else:
                p.copy_(0.1 * noise)


def hf_config(c: clip_text.CLIPTextConfig) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(**{k: v for k, v in text_convert.text_config_to_hf(c).items()
                                          if k not in ("architectures", "model_type", "torch_dtype")})


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name,pad_key", [("tiny_l", "ids_l"), ("tiny_g", "ids_g")])
def test_parity_with_transformers(name, pad_key):
    config = clip_text.PRESETS[name]
    with_projection = config.projection_dim is not None
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    ref = cls(hf_config(config)).eval()
    randomize(ref, seed=1)
    ids = tokenizer.load_pair()(PROMPTS)[pad_key]
    assert (ids[0] == ids[0, -1]).sum() > 50 and ids[2, -1] == 49407  # one pads, one truncates

    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    prefix = "text_model." if with_projection else ""
    params = text_convert.to_flax(state, text_convert.hf_table(config, prefix), config)
    hidden, pooled = jax.jit(clip_text.CLIPTextModel(config).apply)({"params": params}, ids)

    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    ref_hidden = out.hidden_states[-2].numpy()
    assert hidden.shape == ref_hidden.shape == (3, 77, config.width)
    assert rel_err(hidden, ref_hidden) <= 1e-4
    if with_projection:
        assert rel_err(pooled, out.text_embeds.numpy()) <= 1e-4
    else:
        assert pooled is None
    # The pad id changes the hidden states at padded positions (SPEC.md), so the test above is meaningful.
    other = ids.copy()
    other[0, 4:] = 0 if pad_key == "ids_l" else 49407  # "a cat": start, a, cat, end, then padding
    moved, _ = jax.jit(clip_text.CLIPTextModel(config).apply)({"params": params}, other)
    assert np.abs(np.asarray(moved[0, 5:]) - np.asarray(hidden[0, 5:])).max() > 1e-3


def test_hidden_layer_selects_hf_hidden_states():
    config = dataclasses.replace(clip_text.PRESETS["tiny_l"], hidden_layer=-1)
    ref = transformers.CLIPTextModel(hf_config(config)).eval()
    randomize(ref, seed=2)
    params = text_convert.to_flax({k: v.numpy() for k, v in ref.state_dict().items()},
                                  text_convert.hf_table(config, ""), config)
    ids = tokenizer.load_pair()(PROMPTS[:1])["ids_l"]
    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    for layer in (0, 1, -1):
        c = dataclasses.replace(config, hidden_layer=layer)
        hidden, _ = jax.jit(clip_text.CLIPTextModel(c).apply)({"params": params}, ids)
        assert rel_err(hidden, out.hidden_states[layer].numpy()) <= 1e-4


def test_bf16_compute_close_to_fp32():
    config = clip_text.PRESETS["tiny_g"]
    ids = tokenizer.load_pair()(PROMPTS)["ids_g"]
    params = nn.meta.unbox(jax.jit(clip_text.CLIPTextModel(config).init)(jax.random.key(0), ids)["params"])
    h32, p32 = jax.jit(clip_text.CLIPTextModel(config).apply)({"params": params}, ids)
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    h16, p16 = jax.jit(clip_text.CLIPTextModel(bf16).apply)({"params": params}, ids)
    assert h16.dtype == jnp.bfloat16 and p16.dtype == jnp.bfloat16
    assert rel_err(h16, h32) < 3e-2 and rel_err(p16, p32) < 3e-2
