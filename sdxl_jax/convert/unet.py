"""UNet weights in and out: diffusers `unet/` folders and sgm single files (keys `model.diffusion_model.*`).

    unet, params = load_unet(path)                       # folder, pipeline root, or single .safetensors
    save_unet(path, unet, params, format="diffusers")    # or "sgm" (path is then a .safetensors file)

Pure tables over flat dicts of numpy arrays:
    unet_to_diffusers / unet_from_diffusers   our flat names "down_blocks_0/resnets_1/conv1/kernel" <->
                                              "down_blocks.0.resnets.1.conv1.weight" (+ layout transposes)
    unet_to_sgm / unet_from_sgm               diffusers names <-> sgm UNetModel names, one table built
                                              from the config (the inverse of diffusers'
                                              convert_ldm_unet_checkpoint)
    unet_config_to_diffusers / unet_config_from_diffusers
Our module names follow diffusers, so the first pair is a rename plus the PyTorch <-> Flax layouts.
The flat tables use the unrolled block layout (`transformer_blocks_{i}`); load_unet gives params in the
layout of its config (scan_blocks=True: stacked, unet.relayout) and save_unet takes either.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import flax.linen as nn
import jax
import numpy as np

from sdxl_jax.convert import common
from sdxl_jax.models import unet as unet_lib

SGM_PREFIX = "model.diffusion_model."
_METADATA_KEY = "sdxl_jax_unet_config"  # our config in the sgm file's metadata (head width is not in shapes)
_INDEXED = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|to_out|net)_(\d+)$")
_NORMS = ("norm", "norm1", "norm2", "norm3", "conv_norm_out")

# ---------------------------------------------------------------------------------------------- configs


def unet_config_to_diffusers(config: unet_lib.UNetConfig) -> dict:
    """A diffusers UNet2DConditionModel config.json dict (SDXL style: linear projections, text_time)."""
    # diffusers' mid block takes transformer_layers_per_block[-1]; levels without attention ignore theirs.
    depth = [d or 1 for d in config.transformer_depth]
    if not config.transformer_depth[-1]:
        depth[-1] = config.mid_transformer_depth
    elif config.transformer_depth[-1] != config.mid_transformer_depth:
        raise ValueError("diffusers cannot express a mid-block depth that differs from an attention level's "
                         f"depth ({config.transformer_depth[-1]} vs {config.mid_transformer_depth})")
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in config.transformer_depth]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(config.transformer_depth)]
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": config.addition_time_embed_dim,
        # diffusers' "attention_head_dim" is the number of heads per level (a known misnomer there).
        "attention_head_dim": [c // config.head_channels for c in config.level_channels],
        "block_out_channels": list(config.level_channels),
        "center_input_sample": False,
        "class_embed_type": None,
        "cross_attention_dim": config.context_dim,
        "down_block_types": down,
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": config.in_channels,
        "layers_per_block": config.num_res_blocks,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": config.norm_groups,
        "out_channels": config.out_channels,
        "projection_class_embeddings_input_dim": config.adm_in_channels,
        "resnet_time_scale_shift": "default",
        "sample_size": config.sample_size,
        "time_embedding_type": "positional",
        "transformer_layers_per_block": depth,
        "up_block_types": up,
        "upcast_attention": False,
        "use_linear_projection": True,
    } | ({"dropout": config.dropout} if config.dropout else {})


# What our UNet implements (accepted values); anything else in a diffusers config is an error rather than a
# silent mismatch. Keys absent from a config take diffusers' defaults, which agree.
_REQUIRED = {
    "act_fn": ("silu",), "addition_embed_type": ("text_time",), "center_input_sample": (False,),
    "class_embed_type": (None,), "dual_cross_attention": (False,), "flip_sin_to_cos": (True,),
    "freq_shift": (0,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "norm_eps": (1e-5,), "resnet_time_scale_shift": ("default",), "time_embedding_type": ("positional",),
    "upcast_attention": (False, None), "use_linear_projection": (True,), "encoder_hid_dim": (None,),
    "num_class_embeds": (None,), "time_cond_proj_dim": (None,), "transformer_layers_per_mid_block": (None,),
    "reverse_transformer_layers_per_block": (None,), "num_attention_heads": (None,),
    "downsample_padding": (1,), "mid_block_scale_factor": (1,), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "only_cross_attention": (False,), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "resnet_out_scale_factor": (1,),
    "resnet_skip_time_act": (False,), "class_embeddings_concat": (False,), "attention_type": ("default",),
    "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
}


def unet_config_from_diffusers(d: dict, **overrides) -> unet_lib.UNetConfig:
    """UNetConfig from a diffusers config.json dict; `overrides` set dtype, attention, remat, ..."""
    for key, ok in _REQUIRED.items():
        if key in d and d[key] not in ok:
            raise common.CheckpointError(f"UNet config has {key}={d[key]!r}; only SDXL-style UNets "
                                         f"({key} in {ok}) are supported")
    blocks = list(d["block_out_channels"])
    levels = len(blocks)
    if blocks[0] and any(b % blocks[0] for b in blocks):
        raise common.CheckpointError(f"block_out_channels {blocks} are not multiples of the first level")
    listify = lambda v: list(v) if isinstance(v, list | tuple) else [v] * levels
    heads = listify(d.get("attention_head_dim", 8))
    layers_per_block = listify(d.get("layers_per_block", 2))
    if len(set(layers_per_block)) != 1:
        raise common.CheckpointError(f"layers_per_block {layers_per_block} differ per level; not supported")
    depth_list = listify(d.get("transformer_layers_per_block", 1))
    if any(isinstance(x, list | tuple) for x in depth_list):
        raise common.CheckpointError("per-resnet transformer depths are not supported")
    attn = [t.startswith("CrossAttn") for t in d["down_block_types"]]
    if list(reversed(attn)) != [t.startswith("CrossAttn") for t in d["up_block_types"]]:
        raise common.CheckpointError(
            f"up_block_types {d['up_block_types']} do not mirror {d['down_block_types']}")
    head_widths = {blocks[i] // heads[i] for i in range(levels) if attn[i]} | {blocks[-1] // heads[-1]}
    if len(head_widths) != 1:
        raise common.CheckpointError(f"attention head widths differ per level ({sorted(head_widths)}); "
                                     "only one head width is supported")
    if d.get("projection_class_embeddings_input_dim") is None:
        raise common.CheckpointError(
            "UNet config lacks projection_class_embeddings_input_dim (not an SDXL UNet)")
    kw = dict(
        model_channels=blocks[0],
        channel_mult=tuple(b // blocks[0] for b in blocks),
        num_res_blocks=int(layers_per_block[0]),
        transformer_depth=tuple(int(depth_list[i]) if attn[i] else 0 for i in range(levels)),
        mid_transformer_depth=int(depth_list[-1]),
        head_channels=head_widths.pop(),
        context_dim=int(d["cross_attention_dim"]),
        adm_in_channels=int(d["projection_class_embeddings_input_dim"]),
        in_channels=int(d.get("in_channels", 4)),
        out_channels=int(d.get("out_channels", 4)),
        dropout=float(d.get("dropout", 0.0)),
        norm_groups=int(d.get("norm_num_groups", 32)),
        addition_time_embed_dim=int(d.get("addition_time_embed_dim", 256)),
        sample_size=int(d.get("sample_size", 128)),
    )
    return unet_lib.UNetConfig(**(kw | overrides))


# -------------------------------------------------------------------------------- flax <-> diffusers


def _flax_to_diffusers_name(key: str) -> str:
    *parts, leaf = key.split("/")
    # layers.GroupNorm / LayerNorm wrap nn.GroupNorm / nn.LayerNorm as a submodule named "norm"
    if leaf in ("scale", "bias") and parts[-1] == "norm":
        parts = parts[:-1]
    parts = [".".join(m.groups()) if (m := _INDEXED.match(p)) else p for p in parts]
    return ".".join(parts) + (".bias" if leaf == "bias" else ".weight")


def _diffusers_to_flax_name(name: str) -> str:
    *parts, leaf = name.split(".")
    out = []
    for p in parts:
        if p.isdigit():
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    if out[-1] in _NORMS:
        return "/".join(out + ["norm", "scale" if leaf == "weight" else "bias"])
    return "/".join(out + ["kernel" if leaf == "weight" else "bias"])


def unet_to_diffusers(flat_params: dict, config: unet_lib.UNetConfig) -> dict[str, np.ndarray]:
    """Our flat params {"conv_in/kernel": HWIO, ...} -> diffusers state dict names and PyTorch layouts."""
    _check_keys(set(flat_params), set(expected_shapes(config)), "our UNet parameters")
    out = {}
    for key, value in flat_params.items():
        a = np.asarray(value)
        name = _flax_to_diffusers_name(key)
        if key.endswith("/kernel"):
            a = common.conv_to_torch(a) if a.ndim == 4 else common.linear_to_torch(a)
        out[name] = a
    return out


def unet_from_diffusers(flat: dict, config: unet_lib.UNetConfig) -> dict[str, np.ndarray]:
    """diffusers UNet2DConditionModel state dict -> our flat params; checks names and shapes."""
    out = {}
    for name, value in flat.items():
        a = np.asarray(value)
        key = _diffusers_to_flax_name(name)
        if key.endswith("/kernel"):
            a = common.conv_to_flax(a) if a.ndim == 4 else common.linear_to_flax(a)
        out[key] = a
    _check_keys(set(out), set(expected_shapes(config)), "the diffusers UNet weights",
                rename=_flax_to_diffusers_name)
    _check_shapes(out, config, _flax_to_diffusers_name)
    return out


# ------------------------------------------------------------------------------------ diffusers <-> sgm

_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


@functools.cache
def _sgm_table(config: unet_lib.UNetConfig) -> tuple[dict, dict]:
    """Module prefix tables {diffusers_prefix: (sgm_prefix, is_resnet)} and its inverse. sgm numbering
    (UNetModel): input_blocks[0] is conv_in, then per level `num_res_blocks` TimestepEmbedSequential
    [ResBlock, SpatialTransformer?] and a [Downsample] (`.op`) between levels; output_blocks per level
    num_res_blocks + 1 [ResBlock, SpatialTransformer?, Upsample?]; middle_block [ResBlock, ST, ResBlock]."""
    t = {
        "time_embedding.linear_1": ("time_embed.0", False),
        "time_embedding.linear_2": ("time_embed.2", False),
        "add_embedding.linear_1": ("label_emb.0.0", False),
        "add_embedding.linear_2": ("label_emb.0.2", False),
        "conv_in": ("input_blocks.0.0", False),
        "conv_norm_out": ("out.0", False),
        "conv_out": ("out.2", False),
        "mid_block.resnets.0": ("middle_block.0", True), "mid_block.attentions.0": ("middle_block.1", False),
        "mid_block.resnets.1": ("middle_block.2", True),
    }
    levels, nr = len(config.channel_mult), config.num_res_blocks
    n = 1
    for i in range(levels):
        for j in range(nr):
            t[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{n}.0", True)
            if config.transformer_depth[i]:
                t[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{n}.1", False)
            n += 1
        if i < levels - 1:
            t[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", False)
            n += 1
    n = 0
    for i in range(levels):
        has_attn = bool(config.transformer_depth[levels - 1 - i])
        for j in range(nr + 1):
            t[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{n}.0", True)
            if has_attn:
                t[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{n}.1", False)
            if j == nr and i < levels - 1:
                up = f"output_blocks.{n}.{2 if has_attn else 1}.conv"
                t[f"up_blocks.{i}.upsamplers.0.conv"] = (up, False)
            n += 1
    inverse = {sgm: (d, is_res) for d, (sgm, is_res) in t.items()}
    return t, inverse


def _rename(name: str, table: dict, resnet_map: dict, what: str) -> str:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            new_prefix, is_resnet = table[prefix]
            rest = ".".join(parts[cut:])
            if is_resnet:
                sub, _, leaf = rest.rpartition(".")
                if sub not in resnet_map:
                    raise common.CheckpointError(f"{what}: unexpected resnet parameter {name}")
                rest = f"{resnet_map[sub]}.{leaf}"
            return f"{new_prefix}.{rest}"
    raise common.CheckpointError(f"{what}: parameter {name} does not belong to this UNet architecture")


def unet_to_sgm(flat_params: dict, config: unet_lib.UNetConfig) -> dict[str, np.ndarray]:
    """Our flat params -> sgm single-file names (with the `model.diffusion_model.` prefix)."""
    table, _ = _sgm_table(config)
    return {SGM_PREFIX + _rename(k, table, _SGM_RESNET, "to sgm"): v
            for k, v in unet_to_diffusers(flat_params, config).items()}


def unet_from_sgm(flat: dict, config: unet_lib.UNetConfig) -> dict[str, np.ndarray]:
    """sgm UNetModel state dict (names with or without `model.diffusion_model.`) -> our flat params."""
    _, inverse = _sgm_table(config)
    back = {v: k for k, v in _SGM_RESNET.items()}
    diffusers = {_rename(k.removeprefix(SGM_PREFIX), inverse, back, "sgm UNet"): v for k, v in flat.items()}
    return unet_from_diffusers(diffusers, config)


def infer_sgm_config(flat: dict, metadata: dict | None = None, **overrides) -> unet_lib.UNetConfig:
    """The architecture of an sgm UNet from its tensor shapes. The head width and the GroupNorm groups are
    not visible in shapes: they come from our metadata when the file was written by save_unet, else SDXL's
    64 and 32 (or `overrides`). A result equal in architecture to a preset is that preset (so sdxl_base /
    sdxl_refiner are recognised)."""
    if metadata and _METADATA_KEY in metadata:
        d = json.loads(metadata[_METADATA_KEY])
        d["channel_mult"], d["transformer_depth"] = tuple(d["channel_mult"]), tuple(d["transformer_depth"])
        return unet_lib.UNetConfig(**(d | overrides))
    shape = lambda k: flat[k].shape
    if "input_blocks.0.0.weight" not in flat or "label_emb.0.0.weight" not in flat:
        raise common.CheckpointError("not an SDXL sgm UNet: input_blocks.0.0.weight / label_emb.0.0.weight "
                                     "missing (SD 1.x/2.x UNets have no vector conditioning)")
    mc, in_ch = shape("input_blocks.0.0.weight")[:2]
    n_in = 1 + max(int(k.split(".")[1]) for k in flat if k.startswith("input_blocks."))
    n_ops = sum(1 for k in flat if k.startswith("input_blocks.") and k.endswith(".op.weight"))
    levels = n_ops + 1
    nr = (n_in - 1 - n_ops) // levels

    def depth(prefix):
        ids = {k[len(prefix):].split(".")[0] for k in flat if k.startswith(prefix)}
        return len(ids)

    mult, depths = [], []
    for i in range(levels):
        first = 1 + i * (nr + 1)
        mult.append(shape(f"input_blocks.{first}.0.out_layers.3.weight")[0] // mc)
        depths.append(depth(f"input_blocks.{first}.1.transformer_blocks."))
    ctx = next(v.shape[1] for k, v in flat.items() if k.endswith("attn2.to_k.weight"))
    kw = dict(
        model_channels=mc, channel_mult=tuple(mult), num_res_blocks=nr, transformer_depth=tuple(depths),
        mid_transformer_depth=depth("middle_block.1.transformer_blocks."), context_dim=ctx,
        adm_in_channels=shape("label_emb.0.0.weight")[1], in_channels=in_ch,
        out_channels=shape("out.2.weight")[0], head_channels=64,
    )
    cfg = unet_lib.UNetConfig(**(kw | overrides))
    for preset in unet_lib.PRESETS.values():
        if preset.architecture() == cfg.architecture():
            return dataclasses.replace(preset, **overrides)
    return cfg


# ------------------------------------------------------------------------------------- checks and I/O


@functools.cache
def _expected(config: unet_lib.UNetConfig) -> dict[str, tuple[int, ...]]:
    abstract = nn.meta.unbox(unet_lib.abstract_params(config))
    return {"/".join(str(getattr(p, "key", p)) for p in path): tuple(v.shape)
            for path, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def expected_shapes(config: unet_lib.UNetConfig) -> dict[str, tuple[int, ...]]:
    """Our flat parameter names and shapes for `config` in the unrolled layout (abstract; nothing is
    allocated)."""
    return _expected(dataclasses.replace(config, dtype="float32", attention="xla", remat="none",
                                         scan_blocks=False))


def _check_keys(got: set, want: set, what: str, rename=lambda k: k) -> None:
    missing, extra = sorted(want - got), sorted(got - want)
    if missing or extra:
        def show(ks):
            return ", ".join(rename(k) for k in ks[:5]) + (f" (+{len(ks) - 5} more)" if len(ks) > 5 else "")

        raise common.CheckpointError(
            f"{what} do not match the UNet architecture: {len(missing)} missing [{show(missing)}], "
            f"{len(extra)} unexpected [{show(extra)}]; is the config for the same model?")


def _check_shapes(flat: dict, config, rename) -> None:
    want = expected_shapes(config)
    bad = [f"{rename(k)} {v.shape} (expected {want[k]})"
           for k, v in flat.items() if tuple(v.shape) != want[k]]
    if bad:
        raise common.CheckpointError(f"UNet weights have wrong shapes for this config: {'; '.join(bad[:5])}")


def _to_numpy_flat(params) -> dict[str, np.ndarray]:
    """Params (boxed or not, either block layout, on any devices) -> our flat names, unrolled, numpy."""
    params = nn.meta.unbox(params)
    if "params" in params and len(params) == 1:
        params = params["params"]
    params = jax.tree.map(lambda v: np.asarray(jax.device_get(v)), params)
    return common.flatten(unet_lib.relayout(params, False))


def _finish(config, flat) -> tuple[unet_lib.UNet, dict]:
    dtype = np.dtype(config.param_dtype)
    tree = common.unflatten({k: v.astype(dtype) for k, v in flat.items()})
    return unet_lib.UNet(config), unet_lib.relayout(tree, config.scan_blocks)


def load_unet(path: str, **overrides) -> tuple[unet_lib.UNet, dict]:
    """(UNet, params) from a diffusers `unet/` folder (or a pipeline folder containing one), or an sgm
    single-file .safetensors (UNet under `model.diffusion_model.`). `overrides` are UNetConfig fields
    such as dtype="bfloat16", attention="cudnn", remat="full", scan_blocks=True. Params come back as numpy
    in param_dtype, in the config's block layout."""
    if os.path.isdir(path):
        sub = os.path.join(path, "unet")
        folder = sub if os.path.isfile(os.path.join(sub, "config.json")) else path
        config = unet_config_from_diffusers(common.read_json(os.path.join(folder, "config.json")),
                                            **overrides)
        flat = common.read_safetensors(common.find_weights(folder))
        return _finish(config, unet_from_diffusers(flat, config))
    flat = common.read_safetensors(path, prefix=SGM_PREFIX)
    if not flat:
        everything = common.read_safetensors(path)
        if "input_blocks.0.0.weight" in everything:  # a bare sgm UNet state dict
            flat = everything
        elif "conv_in.weight" in everything:
            raise common.CheckpointError(f"{path} holds diffusers UNet weights; pass its folder (with "
                                         "config.json) instead of the file")
        else:
            raise common.CheckpointError(f"{path}: no UNet weights (no keys under {SGM_PREFIX!r})")
    config = infer_sgm_config(flat, common.read_safetensors_metadata(path), **overrides)
    return _finish(config, unet_from_sgm(flat, config))


def save_unet(path: str, unet: unet_lib.UNet, params, format: str = "diffusers", dtype=None) -> str:
    """Writes a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or, for format="sgm",
    a single .safetensors file with keys under `model.diffusion_model.`. `dtype` (e.g. np.float16) casts
    the stored weights. `params` may be in either block layout. Returns the weights file written."""
    config = unet.config
    flat = _to_numpy_flat(params)
    cast = (lambda t: {k: v.astype(dtype) for k, v in t.items()}) if dtype is not None else (lambda t: t)
    if format == "diffusers":
        common.save_json(os.path.join(path, "config.json"), unet_config_to_diffusers(config))
        out = os.path.join(path, "diffusion_pytorch_model.safetensors")
        common.write_safetensors(out, cast(unet_to_diffusers(flat, config)), metadata={"format": "pt"})
        return out
    if format == "sgm":
        if not path.endswith(".safetensors"):
            raise ValueError(f"sgm single files end in .safetensors; got {path}")
        d = dataclasses.asdict(config)
        numerics = ("dtype", "param_dtype", "attention", "remat", "scan_blocks")
        d = {k: v for k, v in d.items() if k not in numerics}
        common.write_safetensors(path, cast(unet_to_sgm(flat, config)),
                                 metadata={"format": "pt", _METADATA_KEY: json.dumps(d)})
        return path
    raise ValueError(f"format={format!r}; choose 'diffusers' or 'sgm'")
