"""Params held in their model's compute dtype: the frozen VAE and text encoders for the train step
(train_state.hold_frozen) and every model of a sampling Pipeline (held.params). Exactly the same
outputs, norms kept fp32, and the frozen/ checkpoint keeps the precision the weights were loaded in."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage1_256
from sdxl_jax import checkpoint, conditioning, held, parallel, pipeline, train_lib, train_state
from sdxl_jax.convert import text as convert_text
from sdxl_jax.models import unet as unet_lib
from sdxl_jax.models import vae as vae_lib


def _config(**model):
    c = stage1_256.get_config("smoke")
    c.mesh.update(data=1, fsdp=1)
    c.model.update(dtype="bfloat16", **model)
    return c


def _norm_leaves(tree):
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return [x for path, x in flat if "norm" in jax.tree_util.keystr(path)]


def _perturbed(tree, seed=0):
    """Every leaf moved off its init (LayerNorm's ones and zeros survive a bf16 rounding unchanged). On the
    host: per-leaf device ops would each compile a kernel."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32), tree)


@pytest.fixture(scope="module")
def setup_and_params():
    config = _config(vae_dtype="bfloat16")  # holds the VAE too (the SDXL configs run it in fp32)
    setup = train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
    params = jax.jit(lambda r: train_state.init_frozen(setup.models, config, r))(jax.random.key(0))
    params = _perturbed(nn.meta.unbox(params))
    return setup, params


def test_held_dtypes_are_the_compute_dtype_except_the_norms(setup_and_params):
    setup, params = setup_and_params
    frozen = setup.abstract_frozen
    text_l = frozen["text"]["text_l"]
    assert text_l["token_embedding"]["embedding"].dtype == jnp.bfloat16
    assert text_l["position_embedding"].dtype == jnp.bfloat16
    assert text_l["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert text_l["layers_0"]["self_attn"]["q_proj"]["bias"].dtype == jnp.bfloat16
    assert text_l["layers_0"]["layer_norm1"]["norm"]["scale"].dtype == jnp.float32
    assert text_l["final_layer_norm"]["norm"]["bias"].dtype == jnp.float32
    assert frozen["vae"]["encoder"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    norms = _norm_leaves(frozen["vae"])
    assert norms and all(x.dtype == jnp.float32 for x in norms)
    # The models themselves keep their param_dtype: a random init is drawn in fp32, as loaded weights are.
    assert params["text"]["text_l"]["layers_0"]["fc1"]["kernel"].dtype == jnp.float32


def test_held_frozen_encoders_compute_exactly_what_the_loaded_ones_do(setup_and_params):
    setup, params = setup_and_params
    kept = train_state.hold_frozen(setup, params)
    models = setup.models
    batch = conditioning.dummy_batch(models.conditioner.config, 2)
    batch["ids_l"][:, :5] = batch["ids_g"][:, :5] = [49406, 320, 2368, 530, 49407]
    batch.update(original_size=np.full((2, 2), 256), crop_coords_top_left=np.zeros((2, 2)),
                 target_size=np.full((2, 2), 256))
    image = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)

    def run(p):
        cond = models.conditioner.apply({"params": p["text"]}, batch)
        moments = models.vae.apply({"params": p["vae"]}, image, method=models.vae.encode)
        return cond["crossattn"], cond["vector"], moments

    run = jax.jit(run)
    for a, b in zip(run(params), run(kept), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # The same comparison can fail: rounding the norms too changes the outputs.
    all_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert any(not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
               for a, b in zip(run(params), run(all_bf16), strict=True))


def test_a_run_saves_the_loaded_precision_and_steps_with_the_held_copy(tmp_path):
    """text_from weights in fp32: frozen/ keeps them bit for bit, the compiled step (made for the held
    bf16 copy, it refuses an fp32 argument) runs."""
    cfg = conditioning.PRESETS["tiny_base"]
    text = _perturbed(conditioning.init_params(cfg, jax.random.key(3)))
    convert_text.save_text_encoders(str(tmp_path / "weights"), conditioning.Conditioner(cfg), text,
                                    tokenizers=False)
    config = _config()
    config.mesh.update(data=-1)  # the 8 fake devices
    config.update(text_from=str(tmp_path / "weights"), total_steps=1, sample_every=1000,
                  checkpoint_every=1)
    workdir = str(tmp_path / "run")
    train_lib.train_and_evaluate(config, workdir)
    saved = checkpoint.load_frozen(workdir)
    for a, b in zip(jax.tree.leaves(saved["text"]), jax.tree.leaves(text), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert checkpoint.latest_step(workdir) == 1


@pytest.fixture(scope="module")
def tiny_unet():
    """The tiny UNet in bf16 with perturbed fp32 params."""
    config = dataclasses.replace(unet_lib.PRESETS["tiny"], dtype="bfloat16")
    unet = unet_lib.UNet(config)
    init = jax.jit(lambda r: nn.meta.unbox(unet.init(r, *_unet_inputs(config))["params"]))
    return unet, _perturbed(init(jax.random.key(0)))


def _unet_inputs(config):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, config.in_channels)).astype(np.float32)
    t = np.array([10, 900], np.int32)
    ctx = rng.standard_normal((2, 77, config.context_dim)).astype(np.float32)
    y = rng.standard_normal((2, config.adm_in_channels)).astype(np.float32)
    return x, t, ctx, y


def test_a_held_unet_denoises_exactly_as_the_fp32_one(tiny_unet):
    """Every block kind (resnets, transformers with self- and cross-attention, the time and vector
    embeddings) in bf16 with perturbed fp32 params vs held.params' copy: the same bits."""
    unet, params = tiny_unet
    kept = held.params(unet, params)
    assert kept["conv_in"]["kernel"].dtype == jnp.bfloat16
    norms = _norm_leaves(kept)
    assert norms and all(x.dtype == jnp.float32 for x in norms)
    run = jax.jit(lambda p: unet.apply({"params": p}, *_unet_inputs(unet.config)))
    np.testing.assert_array_equal(np.asarray(run(params), np.float32), np.asarray(run(kept), np.float32))


def test_a_pipeline_holds_its_params_and_keeps_an_fp32_vae(tiny_unet):
    unet, uparams = tiny_unet
    cond = conditioning.Conditioner(conditioning.PRESETS["tiny_base"].with_dtype("bfloat16"))
    vae = vae_lib.AutoencoderKL(vae_lib.PRESETS["tiny"])  # fp32, as pipeline.load runs it by default
    vparams = jax.jit(lambda r: nn.meta.unbox(vae.init(r, np.zeros((1, 32, 32, 3), np.float32))["params"]))(
        jax.random.key(1))
    text = conditioning.init_params(cond.config, jax.random.key(2))
    pipe = pipeline.Pipeline(pipeline.Stage(unet, uparams, cond, text), vae, vparams, tokenizers=None,
                             devices=jax.local_devices()[:1])
    assert pipe._unet_params["base"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    assert pipe.base.text_params["text_g"]["layers_0"]["fc1"]["kernel"].dtype == jnp.bfloat16
    assert pipe.base.text_params["text_g"]["final_layer_norm"]["norm"]["scale"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pipe._vae_params))
