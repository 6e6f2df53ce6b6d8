"""AutoencoderKL weights in and out: diffusers `vae/` folders and sgm single files (`first_stage_model.`).

    vae, params = load_vae("sdxl/vae")                         # or "sd_xl_base_1.0.safetensors"
    save_vae("out/vae", vae, params, format="diffusers")       # or format="sgm" -> one .safetensors file

One table (`key_table`) lists every parameter once with its Flax name, diffusers name, sgm name, kind and
Flax shape; each direction is a loop over it. Flat Flax names join the tree with "/"
("encoder/down_blocks_0/resnets_0/conv1/kernel"). Layout transforms: conv OIHW <-> HWIO; the mid-block
attention projections are Linear (out, in) in diffusers and 1x1 convs (out, in, 1, 1) in sgm, Dense
(in, out) here. Legacy diffusers attention names (query/key/value/proj_attn) are read too.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from absl import logging

from sdxl_jax.convert import common
from sdxl_jax.convert.common import CheckpointError
from sdxl_jax.models import vae as vae_lib

SGM_PREFIX = "first_stage_model."
# SD 1.x/2.x share the architecture but not the latent scale; SDXL's is SPEC.md's 0.13025.
SD1_SCALING_FACTOR = 0.18215
_SCALE_METADATA = "sdxl_jax.vae_scaling_factor"
# sgm single files cannot say their GroupNorm group count (sgm hard-codes 32): ours records it when not 32.
_GROUPS_METADATA = "sdxl_jax.vae_norm_groups"
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_TRAINING_ONLY = ("loss.",)  # sgm training checkpoints: discriminator, LPIPS, learned logvar


class Entry(NamedTuple):
    flax: str
    diffusers: str
    sgm: str
    kind: str  # "conv" (OIHW / HWIO kernel), "linear" (attention projection), "vec" (bias, norm)
    shape: tuple[int, ...]  # Flax shape


def key_table(config: vae_lib.VAEConfig) -> list[Entry]:
    """Every parameter of AutoencoderKL(config), in a fixed order."""
    out: list[Entry] = []

    def conv(f, d, s, cin, cout, k=3):
        out.append(Entry(f"{f}/kernel", f"{d}.weight", f"{s}.weight", "conv", (k, k, cin, cout)))
        out.append(Entry(f"{f}/bias", f"{d}.bias", f"{s}.bias", "vec", (cout,)))

    def norm(f, d, s, c):
        out.append(Entry(f"{f}/norm/scale", f"{d}.weight", f"{s}.weight", "vec", (c,)))
        out.append(Entry(f"{f}/norm/bias", f"{d}.bias", f"{s}.bias", "vec", (c,)))

    def linear(f, d, s, c):
        out.append(Entry(f"{f}/kernel", f"{d}.weight", f"{s}.weight", "linear", (c, c)))
        out.append(Entry(f"{f}/bias", f"{d}.bias", f"{s}.bias", "vec", (c,)))

    def resnet(f, d, s, cin, cout):
        norm(f"{f}/norm1", f"{d}.norm1", f"{s}.norm1", cin)
        conv(f"{f}/conv1", f"{d}.conv1", f"{s}.conv1", cin, cout)
        norm(f"{f}/norm2", f"{d}.norm2", f"{s}.norm2", cout)
        conv(f"{f}/conv2", f"{d}.conv2", f"{s}.conv2", cout, cout)
        if cin != cout:
            conv(f"{f}/conv_shortcut", f"{d}.conv_shortcut", f"{s}.nin_shortcut", cin, cout, k=1)

    def mid(part, c):
        resnet(f"{part}/mid_block/resnets_0", f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", c, c)
        if config.mid_attention:
            f, d, s = f"{part}/mid_block/attentions_0", f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1"
            norm(f"{f}/group_norm", f"{d}.group_norm", f"{s}.norm", c)
            for fn, dn, sn in (("to_q", "to_q", "q"), ("to_k", "to_k", "k"), ("to_v", "to_v", "v"),
                               ("to_out_0", "to_out.0", "proj_out")):
                linear(f"{f}/{fn}", f"{d}.{dn}", f"{s}.{sn}", c)
        resnet(f"{part}/mid_block/resnets_1", f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", c, c)

    chans, n, z = config.block_out_channels, len(config.block_out_channels), config.latent_channels
    conv("encoder/conv_in", "encoder.conv_in", "encoder.conv_in", config.in_channels, chans[0])
    cin = chans[0]
    for i, c in enumerate(chans):
        for j in range(config.num_res_blocks):
            resnet(f"encoder/down_blocks_{i}/resnets_{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                   f"encoder.down.{i}.block.{j}", cin, c)
            cin = c
        if i < n - 1:
            conv(f"encoder/down_blocks_{i}/downsamplers_0/conv",
                 f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", c, c)
    mid("encoder", chans[-1])
    norm("encoder/conv_norm_out", "encoder.conv_norm_out", "encoder.norm_out", chans[-1])
    conv("encoder/conv_out", "encoder.conv_out", "encoder.conv_out", chans[-1], 2 * z)
    conv("quant_conv", "quant_conv", "quant_conv", 2 * z, 2 * z, k=1)
    conv("post_quant_conv", "post_quant_conv", "post_quant_conv", z, z, k=1)

    rchans = chans[::-1]
    conv("decoder/conv_in", "decoder.conv_in", "decoder.conv_in", z, rchans[0])
    mid("decoder", rchans[0])
    cin = rchans[0]
    for i, c in enumerate(rchans):
        # sgm numbers decoder levels by resolution (up.{n-1} is the deepest), diffusers by execution order.
        s = f"decoder.up.{n - 1 - i}"
        for j in range(config.num_res_blocks + 1):
            resnet(f"decoder/up_blocks_{i}/resnets_{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                   f"{s}.block.{j}", cin, c)
            cin = c
        if i < n - 1:
            conv(f"decoder/up_blocks_{i}/upsamplers_0/conv", f"decoder.up_blocks.{i}.upsamplers.0.conv",
                 f"{s}.upsample.conv", c, c)
    norm("decoder/conv_norm_out", "decoder.conv_norm_out", "decoder.norm_out", chans[0])
    conv("decoder/conv_out", "decoder.conv_out", "decoder.conv_out", chans[0], config.out_channels)
    return out


# --- Pure table functions over flat numpy dicts ---------------------------------------------------------


def _to_flax(w: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return common.conv_to_flax(w)
    if kind == "linear":  # diffusers (out, in); sgm (out, in, 1, 1); some conversions keep (out, in, 1)
        return np.transpose(w.reshape(w.shape[:2]))
    return w


def _from_flax(w: np.ndarray, kind: str, fmt: str) -> np.ndarray:
    if kind == "conv":
        return common.conv_to_torch(w)
    if kind == "linear":
        w = np.transpose(w)
        return w[:, :, None, None] if fmt == "sgm" else w
    return w


def _import(state: dict[str, np.ndarray], config, fmt: str, where: str) -> dict[str, np.ndarray]:
    table = key_table(config)
    names = {getattr(e, fmt) for e in table}
    missing = [getattr(e, fmt) for e in table if getattr(e, fmt) not in state]
    unexpected = sorted(set(state) - names)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: the {fmt} VAE weights do not match the architecture {config_summary(config)}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
            "Is this an AutoencoderKL with the stated config?")
    out = {}
    for e in table:
        src = np.asarray(state[getattr(e, fmt)])
        w = _to_flax(src, e.kind)
        if tuple(w.shape) != e.shape:
            raise CheckpointError(f"{where}: {getattr(e, fmt)} has shape {src.shape}, which does not fit "
                                  f"{config_summary(config)} (Flax {e.flax} needs {e.shape})")
        out[e.flax] = w
    return out


def _export(flat: dict[str, np.ndarray], config, fmt: str) -> dict[str, np.ndarray]:
    table = key_table(config)
    missing = [e.flax for e in table if e.flax not in flat]
    unexpected = sorted(set(flat) - {e.flax for e in table})
    if missing or unexpected:
        raise ValueError(f"VAE params do not match {config_summary(config)}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}; pass the params of the same AutoencoderKL")
    return {getattr(e, fmt): _from_flax(np.asarray(flat[e.flax]), e.kind, fmt) for e in table}


def diffusers_to_flax(state: dict[str, np.ndarray], config, where: str = "diffusers VAE") -> dict:
    """diffusers AutoencoderKL state dict -> flat Flax params (legacy attention names accepted)."""
    return _import(_rename_legacy_attention(state), config, "diffusers", where)


def flax_to_diffusers(flat: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    return _export(flat, config, "diffusers")


def sgm_to_flax(state: dict[str, np.ndarray], config, where: str = "sgm VAE") -> dict:
    """sgm/ldm AutoencoderKL state dict (without the `first_stage_model.` prefix) -> flat Flax params."""
    state = {k: v for k, v in state.items() if not k.startswith(_TRAINING_ONLY)}
    return _import(state, config, "sgm", where)


def flax_to_sgm(flat: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Flat Flax params -> sgm names without prefix; attention projections as 1x1 conv weights."""
    return _export(flat, config, "sgm")


def _rename_legacy_attention(state: dict) -> dict:
    pat = re.compile(r"(mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.")
    rename = lambda m: m.group(1) + _LEGACY_ATTENTION[m.group(2)] + "."
    return {pat.sub(rename, k): v for k, v in state.items()}


# --- Configs ----------------------------------------------------------------------------------------


def config_summary(config: vae_lib.VAEConfig) -> str:
    return (f"(ch={config.ch}, ch_mult={config.ch_mult}, num_res_blocks={config.num_res_blocks}, "
            f"latent_channels={config.latent_channels}, mid_attention={config.mid_attention})")


def vae_config_to_diffusers(config: vae_lib.VAEConfig) -> dict:
    """The config.json of a diffusers AutoencoderKL with this architecture and latent scale."""
    n = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "force_upcast": True,  # SPEC.md: fp16 gives NaNs
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "latent_channels": config.latent_channels,
        "layers_per_block": config.num_res_blocks,
        "mid_block_add_attention": config.mid_attention,
        "norm_num_groups": config.norm_groups,
        "sample_size": 1024,
        "scaling_factor": config.scaling_factor,
    }


def vae_config_from_diffusers(d: dict, where: str = "config.json") -> vae_lib.VAEConfig:
    def unsupported(what):
        raise CheckpointError(f"{where}: {what} is not supported by sdxl_jax's AutoencoderKL "
                              "(it implements the SD/SDXL KL-f8 family only)")

    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        unsupported(f"_class_name={d['_class_name']!r}")
    if d.get("act_fn", "silu") != "silu":
        unsupported(f"act_fn={d['act_fn']!r}")
    if any(t != "DownEncoderBlock2D" for t in d.get("down_block_types", [])) or any(
            t != "UpDecoderBlock2D" for t in d.get("up_block_types", [])):
        unsupported(f"block types {d.get('down_block_types')} / {d.get('up_block_types')}")
    if not d.get("use_quant_conv", True) or not d.get("use_post_quant_conv", True):
        unsupported("a VAE without quant_conv/post_quant_conv")
    for k in ("shift_factor", "latents_mean", "latents_std"):
        if d.get(k) is not None:
            unsupported(f"{k}={d[k]!r}")
    boc = list(d.get("block_out_channels", [64]))
    if any(c % boc[0] for c in boc):
        unsupported(f"block_out_channels={boc} (not multiples of the first)")
    return vae_lib.VAEConfig(
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
        latent_channels=d.get("latent_channels", 4), ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=d.get("layers_per_block", 1), mid_attention=d.get("mid_block_add_attention", True),
        norm_groups=d.get("norm_num_groups", vae_lib.NORM_GROUPS),
        scaling_factor=d.get("scaling_factor", SD1_SCALING_FACTOR))


def infer_config(state: dict[str, np.ndarray], fmt: str, scaling_factor: float,
                 norm_groups: int = vae_lib.NORM_GROUPS) -> vae_lib.VAEConfig:
    """The architecture of an un-prefixed diffusers or sgm VAE state dict, read from its shapes (all but
    the GroupNorm group count, which shapes do not show)."""
    down, res = ("down_blocks", "resnets") if fmt == "diffusers" else ("down", "block")
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(rf"encoder\.{down}\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in state if (m := re.match(rf"encoder\.{down}\.0\.{res}\.(\d+)\.", k))}
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        outs = [state[f"encoder.{down}.{i}.{res}.0.conv1.weight"].shape[0] for i in levels]
        attn = "mid_block.attentions.0" if fmt == "diffusers" else "mid.attn_1"
        return vae_lib.VAEConfig(
            in_channels=state["encoder.conv_in.weight"].shape[1],
            out_channels=state["decoder.conv_out.weight"].shape[0],
            latent_channels=state["decoder.conv_in.weight"].shape[1], ch=ch,
            ch_mult=tuple(c // ch for c in outs), num_res_blocks=len(blocks),
            mid_attention=any(k.startswith(f"encoder.{attn}.") for k in state), norm_groups=norm_groups,
            scaling_factor=scaling_factor)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"cannot infer the VAE architecture from this {fmt} checkpoint ({e}); "
                              "is it an SD/SDXL AutoencoderKL?") from e


# --- Files ------------------------------------------------------------------------------------------


def load_vae(path: str, scaling_factor: float | None = None, **config_overrides):
    """(AutoencoderKL, params) from a diffusers vae/ folder (a pipeline folder's vae/ is found too) or a
    single .safetensors file: sgm with `first_stage_model.` (full SDXL checkpoints), a bare ldm VAE file,
    or diffusers-named weights. Params are a nested dict of numpy arrays in config.param_dtype.

    The latent scale comes from config.json, else from our own metadata, else 0.13025 (SDXL) unless the
    file is an SD 1.x/2.x checkpoint (0.18215); `scaling_factor` overrides it. `config_overrides` set
    non-architecture fields (dtype, attention, tiling)."""
    if os.path.isdir(path):
        folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
        config = vae_config_from_diffusers(common.read_json(os.path.join(folder, "config.json")),
                                           os.path.join(folder, "config.json"))
        if scaling_factor is not None:
            config = dataclasses.replace(config, scaling_factor=scaling_factor)
        weights = common.find_weights(folder)
        config = dataclasses.replace(config, **config_overrides)
        flat = diffusers_to_flax(common.read_safetensors(weights), config, weights)
    else:
        state = common.read_safetensors(path)
        if any(k.startswith(SGM_PREFIX) for k in state):
            guess = 0.13025 if any(k.startswith("conditioner.") for k in state) else None
            if guess is None and any(k.startswith("cond_stage_model.") for k in state):
                guess = SD1_SCALING_FACTOR
            state = {k[len(SGM_PREFIX):]: v for k, v in state.items() if k.startswith(SGM_PREFIX)}
        else:
            guess = None
        meta = common.read_safetensors_metadata(path)
        if scaling_factor is None:
            scaling_factor = float(meta.get(_SCALE_METADATA, guess if guess is not None else 0.13025))
            logging.info("%s: VAE latent scale %s (pass scaling_factor= to override)", path, scaling_factor)
        if "encoder.down.0.block.0.conv1.weight" in state:
            fmt = "sgm"
        elif "encoder.down_blocks.0.resnets.0.conv1.weight" in state:
            fmt = "diffusers"
        else:
            raise CheckpointError(f"{path}: no AutoencoderKL weights found (neither "
                                  f"`{SGM_PREFIX}encoder.`, `encoder.down.` nor `encoder.down_blocks.`)")
        groups = int(meta.get(_GROUPS_METADATA, vae_lib.NORM_GROUPS))
        config = dataclasses.replace(infer_config(state, fmt, scaling_factor, groups), **config_overrides)
        flat = (sgm_to_flax if fmt == "sgm" else diffusers_to_flax)(state, config, path)
    dtype = jnp.dtype(config.param_dtype)
    # np.array copies: the arrays must not alias the memory-mapped file, which a later save may replace.
    params = common.unflatten({k: np.array(v, dtype=dtype) for k, v in flat.items()})
    return vae_lib.AutoencoderKL(config), params


def save_vae(path: str, vae: vae_lib.AutoencoderKL, params, format: str = "diffusers",
             prefix: str = SGM_PREFIX) -> None:
    """format="diffusers": `path` is a folder that gets config.json + diffusion_pytorch_model.safetensors.
    format="sgm": `path` is one .safetensors file with names under `prefix` (as in SDXL single files;
    prefix="" for a bare ldm VAE file); the latent scale is kept in its metadata."""
    if format not in ("diffusers", "sgm"):
        raise ValueError(f"save_vae: format must be 'diffusers' or 'sgm', not {format!r}")
    if "params" in params:
        params = params["params"]
    flat = {k: np.asarray(getattr(v, "value", v)) for k, v in common.flatten(params).items()}
    config = vae.config
    if format == "diffusers":
        common.save_json(os.path.join(path, "config.json"), vae_config_to_diffusers(config))
        common.write_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors"),
                                 flax_to_diffusers(flat, config), metadata={"format": "pt"})
    else:
        state = {prefix + k: v for k, v in flax_to_sgm(flat, config).items()}
        meta = {"format": "pt", _SCALE_METADATA: config.scaling_factor}
        if config.norm_groups != vae_lib.NORM_GROUPS:
            meta[_GROUPS_METADATA] = config.norm_groups
            logging.warning("%s: this VAE uses GroupNorm(%d); sgm's own Encoder/Decoder hard-code 32 groups, "
                            "so only sdxl_jax reads this file correctly (use format='diffusers' elsewhere)",
                            path, config.norm_groups)
        common.write_safetensors(path, state, metadata=meta)
