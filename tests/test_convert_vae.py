"""VAE converters: full-size name maps against diffusers (meta device) and its sgm conversion table,
fp32 parity with diffusers' PyTorch AutoencoderKL through both formats, exact round trips, errors."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from sdxl_jax import convert
from sdxl_jax.convert import common
from sdxl_jax.convert import vae as cv
from sdxl_jax.convert.common import CheckpointError
from sdxl_jax.models import vae as vae_lib

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json as published.
SDXL_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
ARCH = ("in_channels", "out_channels", "latent_channels", "ch", "ch_mult", "num_res_blocks", "mid_attention",
        "norm_groups", "norm_eps", "scaling_factor", "logvar_min", "logvar_max")
TINY = vae_lib.PRESETS["tiny"]


def _arch(config):
    return {k: getattr(config, k) for k in ARCH}


def _torch_model(config) -> TorchAutoencoderKL:
    kwargs = {k: v for k, v in cv.vae_config_to_diffusers(config).items() if not k.startswith("_")}
    return TorchAutoencoderKL(**kwargs)


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_config_json_maps_to_the_sdxl_preset():
    assert _arch(cv.vae_config_from_diffusers(SDXL_VAE_JSON)) == _arch(vae_lib.PRESETS["sdxl"])
    ours = cv.vae_config_to_diffusers(vae_lib.PRESETS["sdxl"])
    assert {k: ours[k] for k in SDXL_VAE_JSON if not k.startswith("_")} == {
        k: v for k, v in SDXL_VAE_JSON.items() if not k.startswith("_")}
    assert cv.vae_config_from_diffusers({**SDXL_VAE_JSON, "norm_num_groups": 16}).norm_groups == 16
    with pytest.raises(ValueError, match="multiples of norm_groups"):
        cv.vae_config_from_diffusers({**SDXL_VAE_JSON, "norm_num_groups": 48})
    with pytest.raises(CheckpointError, match="quant_conv"):
        cv.vae_config_from_diffusers({**SDXL_VAE_JSON, "use_quant_conv": False})


def test_full_size_name_maps_match_the_references():
    config = vae_lib.PRESETS["sdxl"]
    table = cv.key_table(config)
    abstract = nn.unbox(jax.eval_shape(vae_lib.AutoencoderKL(config).init, jax.random.key(0),
                                       jnp.zeros((1, 64, 64, 3))))["params"]
    assert _shapes(common.flatten(abstract)) == {e.flax: e.shape for e in table}
    # Zero-stride arrays: the full-size maps without allocating 335 MB.
    flat = {e.flax: np.broadcast_to(np.float32(0), e.shape) for e in table}
    with torch.device("meta"):
        reference = _shapes(_torch_model(config).state_dict())
    assert len(reference) == 248
    assert _shapes(cv.flax_to_diffusers(flat, config)) == reference
    sgm = cv.flax_to_sgm(flat, config)
    # diffusers' own ldm -> diffusers table must turn our sgm names into exactly the reference key set.
    via_reference = convert_ldm_vae_checkpoint({cv.SGM_PREFIX + k: v for k, v in sgm.items()},
                                               cv.vae_config_to_diffusers(config))
    assert len(sgm) == len(reference) and _shapes(via_reference) == reference
    # Spot checks against sd_xl_base_1.0.safetensors' first_stage_model names.
    assert sgm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sgm["decoder.up.3.block.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert sgm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sgm["encoder.down.2.downsample.conv.weight"].shape == (512, 512, 3, 3)
    assert _arch(cv.infer_config(sgm, "sgm", 0.13025)) == _arch(config)
    assert _arch(cv.infer_config(cv.flax_to_diffusers(flat, config), "diffusers", 0.13025)) == _arch(config)


def _randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every tensor random: weights N(0, 1/fan_in), norm scales 1 + 0.2 N, biases 0.2 N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)


_encode = jax.jit(lambda vae, p, x: vae.apply({"params": p}, x, method="encode"), static_argnums=0)
_decode = jax.jit(lambda vae, p, z: vae.apply({"params": p}, z, method="decode"), static_argnums=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny diffusers AutoencoderKL with random weights, its outputs on a non-square batch, and the
    diffusers pipeline folder it was saved to."""
    model = _torch_model(TINY).eval()
    _randomize_(model)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("pipe")
    common.save_json(str(root / "vae" / "config.json"), cv.vae_config_to_diffusers(TINY))
    common.write_safetensors(str(root / "vae" / "diffusion_pytorch_model.safetensors"), state)
    rng = np.random.RandomState(0)
    images = rng.uniform(-1, 1, (2, 48, 80, 3)).astype(np.float32)  # latents 6 x 10
    latents = rng.randn(2, 6, 10, 4).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
        decoded = model.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    return dict(state=state, root=root, images=images, latents=latents,
                mean=nhwc(dist.mean), logvar=nhwc(dist.logvar), decoded=nhwc(decoded))


def _check_parity(vae, params, ref):
    mean, logvar = _encode(vae, params, ref["images"])
    decoded = _decode(vae, params, ref["latents"])
    for ours, theirs in ((mean, ref["mean"]), (logvar, ref["logvar"]), (decoded, ref["decoded"])):
        err = np.max(np.abs(np.asarray(ours) - theirs))
        # Measured ~2e-6 of the output scale (fp32 conv/matmul summation order, CPU).
        assert err <= 1e-4 * np.max(np.abs(theirs)), err


def test_parity_with_diffusers_via_both_formats(reference, tmp_path):
    vae, params = convert.load_vae(str(reference["root"]))  # finds vae/ inside a pipeline folder
    assert _arch(vae.config) == _arch(TINY)
    _check_parity(vae, params, reference)

    single = str(tmp_path / "sd_xl_tiny.safetensors")
    convert.save_vae(single, vae, params, format="sgm")
    sgm = common.read_safetensors(single)
    assert all(k.startswith("first_stage_model.") for k in sgm)
    # The reference sgm -> diffusers conversion recovers every tensor bit for bit.
    back = convert_ldm_vae_checkpoint(sgm, cv.vae_config_to_diffusers(TINY))
    model = _torch_model(TINY)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), reference["state"][k], err_msg=k)

    vae2, params2 = convert.load_vae(single)
    assert vae2.config == vae.config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    _check_parity(vae2, params2, reference)


def test_round_trips_are_exact(reference, tmp_path):
    vae, params = convert.load_vae(str(reference["root"] / "vae"))
    convert.save_vae(str(tmp_path / "vae"), vae, params, format="diffusers")
    saved = common.read_safetensors(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == reference["state"].keys()
    for k, v in saved.items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, reference["state"][k], err_msg=k)
    with open(tmp_path / "vae" / "config.json") as f:
        assert json.load(f) == cv.vae_config_to_diffusers(TINY)

    # A bare ldm VAE file (no prefix) with a non-default latent scale, kept in the metadata.
    custom = vae_lib.AutoencoderKL(dataclasses.replace(vae.config, scaling_factor=0.5))
    bare = str(tmp_path / "bare.safetensors")
    convert.save_vae(bare, custom, {"params": params}, format="sgm", prefix="")
    vae2, params2 = convert.load_vae(bare)
    assert vae2.config.scaling_factor == 0.5 and _arch(vae2.config)["ch_mult"] == TINY.ch_mult
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    flat = common.flatten(params)
    assert cv.sgm_to_flax(cv.flax_to_sgm(flat, TINY), TINY).keys() == flat.keys()


def test_legacy_names_and_latent_scale_detection(reference, tmp_path):
    _, params = convert.load_vae(str(reference["root"]))
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
              .replace("to_out.0.", "proj_attn."): v for k, v in reference["state"].items()}
    assert legacy.keys() != reference["state"].keys()
    flat = cv.diffusers_to_flax(legacy, TINY)
    jax.tree.map(np.testing.assert_array_equal, common.unflatten(flat), params)

    sgm = {cv.SGM_PREFIX + k: v for k, v in cv.flax_to_sgm(common.flatten(params), TINY).items()}
    dummy = np.zeros((1,), np.float32)
    for other, scale in (("conditioner.embedders.0.x", 0.13025), ("cond_stage_model.x", 0.18215)):
        path = str(tmp_path / f"{scale}.safetensors")
        common.write_safetensors(path, {**sgm, other: dummy})
        assert convert.load_vae(path)[0].config.scaling_factor == scale
        assert convert.load_vae(path, scaling_factor=0.3)[0].config.scaling_factor == 0.3


def test_errors_say_what_is_wrong(reference, tmp_path):
    state = dict(reference["state"])
    del state["decoder.conv_out.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing .*decoder\.conv_out\.bias"):
        cv.diffusers_to_flax(state, TINY)
    state = {**reference["state"], "encoder.conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)}
    with pytest.raises(CheckpointError, match=r"encoder\.conv_in\.weight has shape \(32, 4, 3, 3\)"):
        cv.diffusers_to_flax(state, TINY)
    with pytest.raises(CheckpointError, match="unexpected"):
        cv.diffusers_to_flax({**reference["state"], "encoder.extra.weight": np.zeros(1)}, TINY)
    path = str(tmp_path / "not_a_vae.safetensors")
    common.write_safetensors(path, {"model.diffusion_model.x": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match="no AutoencoderKL weights"):
        convert.load_vae(path)
    os.makedirs(tmp_path / "pickled")
    common.save_json(str(tmp_path / "pickled" / "config.json"), SDXL_VAE_JSON)
    (tmp_path / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="never unpickle"):
        convert.load_vae(str(tmp_path / "pickled"))
