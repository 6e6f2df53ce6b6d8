"""UNet weights in and out: full-size name maps against diffusers (meta device) and diffusers' own sgm
conversion table, fp32 parity with diffusers' UNet2DConditionModel through both formats, exact round trips."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from sdxl_jax import convert
from sdxl_jax.convert import common
from sdxl_jax.convert import unet as conv
from sdxl_jax.models import unet as unet_lib

# stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 unet/config.json (the numbers are SPEC.md's).
_COMMON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_norm": None, "downsample_padding": 1, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_DIFFUSERS_CONFIGS = {
    "sdxl_base": _COMMON | {
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
    },
    "sdxl_refiner": _COMMON | {
        "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
        "cross_attention_dim": 1280,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    },
}


def _zeros(shapes):
    """Full-size stand-ins without memory: zero-strided arrays with the right shapes."""
    return {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}


@pytest.mark.parametrize("name", ["sdxl_base", "sdxl_refiner"])
def test_full_size_name_maps_match_the_references(name):
    official = SDXL_DIFFUSERS_CONFIGS[name]
    config = conv.unet_config_from_diffusers(official)
    assert config.architecture() == unet_lib.PRESETS[name].architecture()
    with torch.device("meta"):
        ref = UNet2DConditionModel(**official)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}

    ours = _zeros(conv.expected_shapes(config))
    diffusers = conv.unet_to_diffusers(ours, config)
    assert {k: v.shape for k, v in diffusers.items()} == want

    # sgm names: diffusers' own single-file converter (sgm -> diffusers) must map ours onto the reference.
    sgm = conv.unet_to_sgm(ours, config)
    assert all(k.startswith("model.diffusion_model.") for k in sgm)
    back = convert_ldm_unet_checkpoint(sgm, official)
    assert len(back) == len(sgm) == len(want)
    assert {k: v.shape for k, v in back.items()} == want
    # and sgm shapes alone identify the preset (single files carry no config)
    inferred = conv.infer_sgm_config({k.removeprefix(conv.SGM_PREFIX): v for k, v in sgm.items()})
    assert inferred == unet_lib.PRESETS[name]
    assert conv.unet_from_sgm(sgm, config).keys() == ours.keys()


@pytest.mark.parametrize("name", ["sdxl_base", "sdxl_refiner", "tiny", "tiny_refiner"])
def test_config_round_trips_through_diffusers(name):
    config = unet_lib.PRESETS[name]
    d = conv.unet_config_to_diffusers(config)
    assert conv.unet_config_from_diffusers(json.loads(json.dumps(d))) == config


def test_unsupported_diffusers_configs_are_errors():
    bad = SDXL_DIFFUSERS_CONFIGS["sdxl_base"] | {"use_linear_projection": False}
    with pytest.raises(common.CheckpointError, match="use_linear_projection"):
        conv.unet_config_from_diffusers(bad)
    sd15_like = {k: v for k, v in SDXL_DIFFUSERS_CONFIGS["sdxl_base"].items()
                 if k not in ("addition_embed_type", "projection_class_embeddings_input_dim")}
    with pytest.raises(common.CheckpointError, match="projection_class_embeddings_input_dim"):
        conv.unet_config_from_diffusers(sd15_like)


# ---------------------------------------------------------------------------------- numerical parity

# Tiny SDXL-shaped configs: base-like (3 levels, attention on levels 1-2, mid depth = last) and
# refiner-like (4 levels, attention on the middle two, last level plain, mid depth 2 like the refiner's
# mid 4). 16-wide heads, addition_time_embed_dim 8, pooled 16.
TINY = {
    "base_like": unet_lib.UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2), mid_transformer_depth=2,
        head_channels=16, context_dim=48, adm_in_channels=16 + 6 * 8, addition_time_embed_dim=8,
        norm_groups=8),  # diffusers norm_num_groups=8: 4-8 channels per group
    "refiner_like": unet_lib.UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2, 2), transformer_depth=(0, 1, 1, 0), mid_transformer_depth=2,
        head_channels=16, context_dim=40, adm_in_channels=16 + 5 * 8, addition_time_embed_dim=8),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random, including the zero-initialised conv2 / proj_out ones, so that no path can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(r / np.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.2 * r)


@pytest.fixture(scope="module", params=sorted(TINY))
def reference(request, tmp_path_factory):
    config = TINY[request.param]
    ref = UNet2DConditionModel(**conv.unet_config_to_diffusers(config)).eval()
    _randomize(ref, seed=len(request.param))
    folder = str(tmp_path_factory.mktemp(request.param) / "unet")
    ref.save_pretrained(folder)  # written by diffusers itself

    b, h, w = 2, 24, 40
    n_ids = (config.adm_in_channels - 16) // config.addition_time_embed_dim
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.tensor([7, 999])
    ctx = torch.randn(b, 11, config.context_dim, generator=g)
    pooled = torch.randn(b, 16, generator=g)
    time_ids = torch.rand(b, n_ids, generator=g) * 1024
    with torch.no_grad():
        out = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        # sgm convention: the UNet receives the finished vector; build it with diffusers' own embedder.
        y = torch.cat([pooled, ref.add_time_proj(time_ids.flatten()).reshape(b, -1)], dim=-1)
    inputs = (x.numpy().transpose(0, 2, 3, 1), t.numpy(), ctx.numpy(), y.numpy())
    apply = jax.jit(unet_lib.UNet(config).apply)
    return dict(config=config, ref=ref, folder=folder, inputs=inputs, apply=apply,
                expected=out.numpy().transpose(0, 2, 3, 1))


def _check_parity(r, params, apply=None):
    got = np.asarray((apply or r["apply"])({"params": params}, *map(jnp.asarray, r["inputs"])))
    scale = np.abs(r["expected"]).max()
    err = np.abs(got - r["expected"]).max()
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} vs output scale {scale:.3g}"
    return err / scale


def test_parity_through_diffusers_folder(reference):
    unet, params = convert.load_unet(reference["folder"])
    assert unet.config == reference["config"]
    _check_parity(reference, params)


def test_parity_through_sgm_single_file(reference, tmp_path):
    config, ref = reference["config"], reference["ref"]
    torch_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    sgm = conv.unet_to_sgm(conv.unet_from_diffusers(torch_sd, config), config)
    # our sgm names are what diffusers' reference single-file converter expects, value for value
    back = convert_ldm_unet_checkpoint(sgm, conv.unet_config_to_diffusers(config))
    assert back.keys() == torch_sd.keys()
    assert all(np.array_equal(back[k], torch_sd[k]) for k in torch_sd)

    # a bare sgm file (no metadata, other tensors beside the UNet): shapes give everything but the head width
    # and the GroupNorm groups
    path = str(tmp_path / "single.safetensors")
    common.write_safetensors(path, sgm | {"first_stage_model.decoder.conv_in.bias": np.zeros(3, np.float32)})
    unet, params = convert.load_unet(path, head_channels=16, norm_groups=config.norm_groups)
    assert unet.config.architecture() == config.architecture()
    _check_parity(reference, params)


def test_round_trips_are_exact(reference, tmp_path):
    config, ref = reference["config"], reference["ref"]
    unet, params = convert.load_unet(reference["folder"])
    out = str(tmp_path / "saved_unet")
    convert.save_unet(out, unet, params, format="diffusers")
    reloaded = UNet2DConditionModel.from_pretrained(out)  # diffusers loads what we wrote
    a, b = ref.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert reloaded.config["transformer_layers_per_block"] is not None

    path = str(tmp_path / "unet.safetensors")
    convert.save_unet(path, unet, params, format="sgm")
    unet2, params2 = convert.load_unet(path)  # head width from our metadata
    assert unet2.config == config
    flat, flat2 = common.flatten(params), common.flatten(params2)
    assert flat.keys() == flat2.keys() and all(np.array_equal(flat[k], flat2[k]) for k in flat)

    half = str(tmp_path / "half")
    convert.save_unet(half, unet, params, format="diffusers", dtype=np.float16)
    _, params16 = convert.load_unet(half)
    k16 = params16["conv_in"]["kernel"]
    assert k16.dtype == np.float32
    np.testing.assert_array_equal(k16, flat["conv_in/kernel"].astype(np.float16).astype(np.float32))


def test_scanned_blocks_load_compute_and_save_exactly(reference, tmp_path):
    """load_unet(scan_blocks=True) stacks each transformer's blocks (the mid block's two here), the scanned
    model computes diffusers' output, and save_unet writes diffusers' weights back bit for bit."""
    unet, params = convert.load_unet(reference["folder"], scan_blocks=True)
    assert unet.config == dataclasses.replace(reference["config"], scan_blocks=True)
    mid = params["mid_block"]["attentions_0"]
    assert set(mid) == {"norm", "proj_in", "transformer_blocks", "proj_out"}
    assert mid["transformer_blocks"]["block"]["attn2"]["to_k"]["kernel"].shape[0] == 2
    _check_parity(reference, params, jax.jit(unet.apply))

    out = str(tmp_path / "saved_unet")
    convert.save_unet(out, unet, params, format="diffusers")
    a, b = reference["ref"].state_dict(), UNet2DConditionModel.from_pretrained(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    path = str(tmp_path / "unet.safetensors")
    convert.save_unet(path, unet, params, format="sgm")
    unet2, params2 = convert.load_unet(path)  # the file does not record the layout: unrolled by default
    assert unet2.config == reference["config"]
    flat, flat2 = common.flatten(unet_lib.relayout(params, False)), common.flatten(params2)
    assert flat.keys() == flat2.keys() and all(np.array_equal(flat[k], flat2[k]) for k in flat)


def test_mismatched_or_wrong_inputs_are_clear_errors(reference, tmp_path):
    folder = reference["folder"]
    other = dataclasses.replace(reference["config"], context_dim=reference["config"].context_dim + 8)
    broken = str(tmp_path / "broken")
    os.makedirs(broken)
    common.save_json(os.path.join(broken, "config.json"), conv.unet_config_to_diffusers(other))
    os.symlink(os.path.join(folder, "diffusion_pytorch_model.safetensors"),
               os.path.join(broken, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(common.CheckpointError, match="wrong shapes"):
        convert.load_unet(broken)
    with pytest.raises(common.CheckpointError, match="pass its folder"):
        convert.load_unet(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    flat = common.read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    flat.pop("conv_out.bias")
    with pytest.raises(common.CheckpointError, match="1 missing"):
        conv.unet_from_diffusers(flat, reference["config"])
