"""sdxl_jax.conditioning: output shapes and order, the vector against diffusers' SDXL add_time_ids path,
conditioning dropout, the unconditional batch, bf16."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import Timesteps

from sdxl_jax import conditioning, tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_pair()


class Tiny:
    """A tiny conditioner with SDXL's real 256-dim size embeddings, its params and jitted entry points
    (compiled once per module: the text towers dominate this file's run time)."""

    def __init__(self, name, seed):
        self.config = conditioning.PRESETS[name].replace(size_embed_dim=256)
        self.model = conditioning.Conditioner(self.config)
        self.params = conditioning.init_params(self.config, jax.random.key(seed))
        self.apply = jax.jit(lambda p, b, rng=None, rate=None: self.model.apply({"params": p}, b, rng, rate))
        self.text_g = jax.jit(lambda p, ids: self.model.apply({"params": p}, ids,
                                                              method=lambda m, x: m.text_g(x)))


@pytest.fixture(scope="module")
def tiny():
    return Tiny("tiny_base", 0)


@pytest.fixture(scope="module")
def refiner():
    return Tiny("tiny_refiner", 1)


@pytest.mark.parametrize("name,crossattn,vector", [
    ("sdxl_base", 2048, 2816), ("sdxl_refiner", 1280, 2560), ("tiny_base", 64, 1568),
    ("tiny_refiner", 32, 1312)])
def test_output_shapes(name, crossattn, vector):
    config = conditioning.PRESETS[name]
    assert (config.context_dim, config.vector_dim) == (crossattn, vector)
    model = conditioning.Conditioner(config)
    batch = conditioning.dummy_batch(config, 3)
    out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), batch)
    assert out["crossattn"].shape == (3, 77, crossattn) and out["vector"].shape == (3, vector)
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)  # every param has logical axes


def diffusers_add_embeds(text_embeds, time_ids, dim):
    """diffusers UNet2DConditionModel, addition_embed_type="text_time": add_time_proj = Timesteps(dim,
    flip_sin_to_cos=True, shift 0) on the flattened time ids, concatenated after the pooled text embeds."""
    proj = Timesteps(dim, True, 0)
    time_ids = torch.tensor(np.asarray(time_ids), dtype=torch.float32)
    time_embeds = proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
    return torch.cat([torch.tensor(np.array(text_embeds)), time_embeds], -1).numpy()


def test_vector_matches_diffusers_add_time_ids_base(tiny, tok):
    # Distinct values per slot so any reordering shows; pipeline order: original + crop + target.
    batch = conditioning.make_batch(tok, ["a cat", "a dog"], [[1200, 1600], [768, 1024]], [[0, 37], [5, 0]],
                                    [[1024, 1024], [832, 1216]])
    out = tiny.apply(tiny.params, batch)
    _, pooled = tiny.text_g(tiny.params, batch["ids_g"])
    keys = ("original_size", "crop_coords_top_left", "target_size")
    ref = diffusers_add_embeds(pooled, np.concatenate([batch[k] for k in keys], 1), 256)
    assert out["vector"].shape == (2, 32 + 6 * 256)
    # Sinusoids of fp32 arguments up to 1600 rad carry ~1600 * 2**-24 ~ 1e-4 of rounding in either code.
    np.testing.assert_allclose(np.asarray(out["vector"]), ref, rtol=0, atol=1e-4)


def test_vector_matches_diffusers_add_time_ids_refiner(refiner, tok):
    out = conditioning.encode_prompts(refiner.model, refiner.params, tok, ["a cat"], (1024, 768), (16, 8),
                                      aesthetic_score=5.5)
    _, pooled = refiner.text_g(refiner.params, tok(["a cat"])["ids_g"])
    # img2img pipeline with requires_aesthetics_score: original + crop + (aesthetic_score,)
    ref = diffusers_add_embeds(pooled, [[1024, 768, 16, 8, 5.5]], 256)
    np.testing.assert_allclose(np.asarray(out["vector"]), ref, rtol=0, atol=1e-4)
    assert out["crossattn"].shape == (1, 77, 32)


def test_crossattn_is_l_then_g(tiny, tok):
    batch = conditioning.make_batch(tok, ["a cat"], (512, 512), (0, 0), (512, 512))
    out = tiny.apply(tiny.params, batch)
    hidden_g, _ = tiny.text_g(tiny.params, batch["ids_g"])
    np.testing.assert_array_equal(out["crossattn"][..., 32:], hidden_g)
    # CLIP-L's block is its own penultimate layer: it changes with ids_l only.
    swapped = dict(batch, ids_l=tok(["a dog"])["ids_l"])
    out2 = tiny.apply(tiny.params, swapped)
    np.testing.assert_array_equal(out2["crossattn"][..., 32:], out["crossattn"][..., 32:])
    assert np.abs(np.asarray(out2["crossattn"][:, 2, :32] - out["crossattn"][:, 2, :32])).max() > 1e-3


def test_conditioning_dropout(tiny, tok):
    n = 256
    batch = conditioning.make_batch(tok, ["a cat"] * n, (512, 512), (0, 0), (512, 512))
    full = tiny.apply(tiny.params, batch)
    out = tiny.apply(tiny.params, batch, jax.random.key(3), 0.5)

    def split(o):
        return {"l": o["crossattn"][..., :32], "g": o["crossattn"][..., 32:], "pooled": o["vector"][:, :32]}

    parts, refs, kept = split(out), split(full), {}
    for k, x in parts.items():
        zero = np.all(np.asarray(x).reshape(n, -1) == 0, axis=1)
        same = np.all(np.asarray(x).reshape(n, -1) == np.asarray(refs[k]).reshape(n, -1), axis=1)
        assert np.all(zero ^ same), k  # each sample is either dropped entirely or untouched
        assert 0.38 < zero.mean() < 0.62, (k, zero.mean())
        kept[k] = ~zero
    # Independent per embedder output, as sgm draws them (agreement ~50%, not ~100%).
    assert 0.35 < (kept["l"] == kept["g"]).mean() < 0.65
    assert 0.35 < (kept["g"] == kept["pooled"]).mean() < 0.65
    np.testing.assert_array_equal(out["vector"][:, 32:], full["vector"][:, 32:])  # size rate 0
    # The config's text rate (0.1) when none is passed; no rng, no dropout.
    default_out = jax.jit(lambda p, b, r: tiny.model.apply({"params": p}, b, ucg_rng=r))(
        tiny.params, batch, jax.random.key(4))
    assert 0.03 < np.all(np.asarray(default_out["vector"][:, :32]) == 0, axis=1).mean() < 0.2
    sizes = conditioning.Conditioner(tiny.config.replace(ucg_rate_size=0.5))
    dropped = jax.jit(lambda p, b, r: sizes.apply({"params": p}, b, ucg_rng=r, ucg_rate=0.0))(
        tiny.params, batch, jax.random.key(5))
    np.testing.assert_array_equal(dropped["crossattn"], full["crossattn"])
    blocks = np.asarray(dropped["vector"][:, 32:]).reshape(n, 6, 256)
    per_embedder = np.all(blocks == 0, axis=2).reshape(n, 3, 2)
    assert np.all(per_embedder[..., 0] == per_embedder[..., 1])  # (h, w) of one embedder drop together
    assert 0.38 < per_embedder.mean() < 0.62


def test_unconditional_base_zeroes_text_keeps_sizes(tiny, tok):
    model, params = tiny.model, tiny.params
    cond = conditioning.encode_prompts(model, params, tok, ["a cat", "a dog"], (1024, 1024), (0, 0))
    uncond = conditioning.encode_unconditional(model, params, tok, 2, (1024, 1024), (0, 0))
    assert not np.any(np.asarray(uncond["crossattn"])) and not np.any(np.asarray(uncond["vector"][:, :32]))
    np.testing.assert_array_equal(uncond["vector"][:, 32:], cond["vector"][:, 32:])
    negative = conditioning.encode_unconditional(model, params, tok, 2, (1024, 1024),
                                                 negative_prompts=["x", ""])
    expected = conditioning.encode_prompts(model, params, tok, ["x", ""], (1024, 1024))
    np.testing.assert_array_equal(negative["crossattn"], expected["crossattn"])
    assert np.any(np.asarray(negative["crossattn"]))


def test_unconditional_refiner_encodes_negative_prompt(refiner, tok):
    model, params = refiner.model, refiner.params
    uncond = conditioning.encode_unconditional(model, params, tok, 1, (1024, 1024))
    expected = conditioning.encode_prompts(model, params, tok, [""], (1024, 1024), aesthetic_score=2.5)
    assert np.any(np.asarray(uncond["crossattn"]))
    np.testing.assert_array_equal(uncond["vector"], expected["vector"])
    np.testing.assert_array_equal(uncond["crossattn"], expected["crossattn"])
    cond = conditioning.encode_prompts(model, params, tok, [""], (1024, 1024))  # aesthetic 6.0 by default
    aesthetic = conditioning.embed_sizes(np.array([6.0, 2.5]), 256)
    np.testing.assert_allclose(cond["vector"][0, -256:], aesthetic[0], atol=1e-6)
    np.testing.assert_allclose(uncond["vector"][0, -256:], aesthetic[1], atol=1e-6)


def test_bf16_and_frozen(tiny, tok):
    batch = conditioning.make_batch(tok, ["a cat"], (512, 512), (0, 0), (512, 512))
    bf16 = conditioning.Conditioner(tiny.config.with_dtype("bfloat16"))
    out16 = jax.jit(bf16.apply)({"params": tiny.params}, batch)
    out32 = tiny.apply(tiny.params, batch)
    assert out16["crossattn"].dtype == jnp.bfloat16 and out16["vector"].dtype == jnp.float32
    err = np.abs(np.asarray(out16["crossattn"], np.float32) - np.asarray(out32["crossattn"])).max()
    assert err < 3e-2 * np.abs(np.asarray(out32["crossattn"])).max()
    loss = lambda p: tiny.model.apply({"params": p}, batch)["crossattn"].sum()
    grads = jax.jit(jax.grad(loss))(tiny.params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))  # text encoders are frozen


def test_sharded_over_a_mesh_matches_unsharded(tiny, tok):
    """Params sharded by their logical names with the default rules on a (data 2, fsdp 2, tensor 2) mesh
    of fake CPU devices: the same outputs, and the constraints inside the model resolve."""
    from configs import common as config_common
    from sdxl_jax import parallel

    config = config_common.base()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:8])
    batch = conditioning.make_batch(tok, ["a cat", "a dog"] * 2, (512, 512), (0, 0), (512, 512))
    boxed = jax.eval_shape(tiny.model.init, jax.random.key(0), batch)["params"]
    shardings = parallel.logical_shardings(boxed, mesh, config, check_large=False)
    params = jax.device_put(tiny.params, shardings)
    assert params["text_g"]["token_embedding"]["embedding"].sharding.spec[1] == "fsdp"
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules(config)):
        out = jax.jit(tiny.model.apply)({"params": params}, batch)
    ref = tiny.apply(tiny.params, batch)
    np.testing.assert_allclose(out["crossattn"], ref["crossattn"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["vector"], ref["vector"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cond,unet_name", [
    ("sdxl_base", "sdxl_base"), ("sdxl_refiner", "sdxl_refiner"), ("tiny_base", "tiny"),
    ("tiny_refiner", "tiny_refiner")])
def test_presets_fit_their_unets(cond, unet_name):
    from sdxl_jax.models import unet as unet_lib

    c, u = conditioning.PRESETS[cond], unet_lib.PRESETS[unet_name]
    assert (c.context_dim, c.vector_dim) == (u.context_dim, u.adm_in_channels)
