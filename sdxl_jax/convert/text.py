"""SDXL text encoders in and out: diffusers folders (HF CLIPTextModel / CLIPTextModelWithProjection) and
sgm single files (CLIP-L in HF layout, OpenCLIP bigG in open_clip layout with the fused in_proj).

    conditioner, params = load_text_encoders(path)        # diffusers folder or .safetensors single file
    save_text_encoders(path, conditioner, params, format="diffusers")   # or "sgm"

Each layout is one key table per text model: (flax path, checkpoint key, transform). Linear weights are
transposed ((out, in) <-> (in, out)); open_clip's attn.in_proj_weight is q|k|v stacked by rows; its
text_projection is already used as x @ P. Conversions are pure functions over flat numpy dicts.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from sdxl_jax import conditioning
from sdxl_jax.convert import common
from sdxl_jax.convert.common import CheckpointError
from sdxl_jax.models import clip_text

HF_PREFIX = "text_model."  # published SDXL checkpoints (and the sgm CLIP-L) use it; transformers 5 reads both
SGM_L = "conditioner.embedders.0.transformer."  # + text_model.*
SGM_G_BASE, SGM_G_REFINER = "conditioner.embedders.1.model.", "conditioner.embedders.0.model."
METADATA_KEY = "sdxl_jax_conditioner"
# Checkpoint tensors that hold no weights we use: HF's old position_ids buffer, open_clip's CLIP logit scale.
_IGNORED_SUFFIXES = ("position_ids", "logit_scale", "attn_mask")
OPEN_CLIP_LOGIT_SCALE = np.log(1 / 0.07)  # open_clip's init; written so sgm finds the tensor it expects


# ---------------------------------------------------------------------------------------------- key tables


def hf_table(config: clip_text.CLIPTextConfig, prefix: str = HF_PREFIX) -> list[tuple[str, str, str]]:
    """(flax path, HF key, transform) for transformers' CLIPTextModel(WithProjection) state dicts."""
    rows = [
        ("token_embedding/embedding", f"{prefix}embeddings.token_embedding.weight", "copy"),
        ("position_embedding", f"{prefix}embeddings.position_embedding.weight", "copy"),
    ]
    for i in range(config.layers):
        ours, theirs = f"layers_{i}", f"{prefix}encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rows += [
                (f"{ours}/self_attn/{n}/kernel", f"{theirs}.self_attn.{n}.weight", "linear"),
                (f"{ours}/self_attn/{n}/bias", f"{theirs}.self_attn.{n}.bias", "copy"),
            ]
        for n in ("fc1", "fc2"):
            rows += [
                (f"{ours}/{n}/kernel", f"{theirs}.mlp.{n}.weight", "linear"),
                (f"{ours}/{n}/bias", f"{theirs}.mlp.{n}.bias", "copy"),
            ]
        for n in ("layer_norm1", "layer_norm2"):
            rows += _norm_rows(f"{ours}/{n}", f"{theirs}.{n}")
    rows += _norm_rows("final_layer_norm", f"{prefix}final_layer_norm")
    if config.projection_dim is not None:  # CLIPTextModelWithProjection: outside text_model.
        rows.append(("text_projection/kernel", "text_projection.weight", "linear"))
    return rows


def open_clip_table(config: clip_text.CLIPTextConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(flax path, open_clip key, transform) for an open_clip CLIP text tower (sgm's `model.` submodule).
    q/k/v map to one fused tensor each for weight and bias: transforms "qkv_weight:i" / "qkv_bias:i"."""
    rows = [
        ("token_embedding/embedding", f"{prefix}token_embedding.weight", "copy"),
        ("position_embedding", f"{prefix}positional_embedding", "copy"),
    ]
    for i in range(config.layers):
        ours, theirs = f"layers_{i}", f"{prefix}transformer.resblocks.{i}"
        for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
            rows += [
                (f"{ours}/self_attn/{n}/kernel", f"{theirs}.attn.in_proj_weight", f"qkv_weight:{j}"),
                (f"{ours}/self_attn/{n}/bias", f"{theirs}.attn.in_proj_bias", f"qkv_bias:{j}"),
            ]
        rows += [
            (f"{ours}/self_attn/out_proj/kernel", f"{theirs}.attn.out_proj.weight", "linear"),
            (f"{ours}/self_attn/out_proj/bias", f"{theirs}.attn.out_proj.bias", "copy"),
            (f"{ours}/fc1/kernel", f"{theirs}.mlp.c_fc.weight", "linear"),
            (f"{ours}/fc1/bias", f"{theirs}.mlp.c_fc.bias", "copy"),
            (f"{ours}/fc2/kernel", f"{theirs}.mlp.c_proj.weight", "linear"),
            (f"{ours}/fc2/bias", f"{theirs}.mlp.c_proj.bias", "copy"),
        ]
        rows += _norm_rows(f"{ours}/layer_norm1", f"{theirs}.ln_1") + _norm_rows(
            f"{ours}/layer_norm2", f"{theirs}.ln_2"
        )
    rows += _norm_rows("final_layer_norm", f"{prefix}ln_final")
    if config.projection_dim is not None:
        rows.append(("text_projection/kernel", f"{prefix}text_projection", "copy"))  # used as x @ P
    return rows


def _norm_rows(ours: str, theirs: str):
    return [
        (f"{ours}/norm/scale", f"{theirs}.weight", "copy"),
        (f"{ours}/norm/bias", f"{theirs}.bias", "copy"),
    ]


def to_flax(flat: dict[str, np.ndarray], table, config: clip_text.CLIPTextConfig, where: str = "") -> dict:
    """Checkpoint tensors -> nested Flax params (param_dtype), shape-checked against the model."""
    expected = common.flatten(clip_text.abstract_params(config))
    missing = sorted({key for _, key, _ in table if key not in flat})
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} text-encoder tensors missing, e.g. {missing[:3]}; "
            "is this an SDXL checkpoint of the expected layout?"
        )
    out = {}
    for path, key, transform in table:
        a = np.asarray(flat[key])
        if transform == "linear":
            a = common.linear_to_flax(a)
        elif transform.startswith(("qkv_weight", "qkv_bias")):
            j = int(transform.split(":")[1])
            a = np.split(a, 3, axis=0)[j]
            a = a.T if transform.startswith("qkv_weight") else a
        if a.shape != expected[path].shape:
            raise CheckpointError(
                f"{where}: {key} has shape {a.shape}, the model expects "
                f"{expected[path].shape} for {path}; the config does not match the weights"
            )
        out[path] = a.astype(expected[path].dtype)
    return common.unflatten(out)


def from_flax(params: dict, table) -> dict[str, np.ndarray]:
    """Nested Flax params -> checkpoint tensors (fused q|k|v re-stacked for open_clip)."""
    flat = common.flatten(params)
    out, fused = {}, {}
    for path, key, transform in table:
        a = np.asarray(flat[path])
        if transform == "linear":
            out[key] = common.linear_to_torch(a)
        elif transform.startswith(("qkv_weight", "qkv_bias")):
            fused.setdefault(key, [None] * 3)[int(transform.split(":")[1])] = (
                a.T if transform.startswith("qkv_weight") else a
            )
        else:
            out[key] = a
    out.update({k: np.concatenate(parts, axis=0) for k, parts in fused.items()})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _check_unused(flat: dict, table, where: str) -> None:
    used = {key for _, key, _ in table}
    extra = sorted(k for k in flat if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(
            f"{where}: unexpected text-encoder tensors {extra[:3]} ({len(extra)} in all); "
            "the weights do not match the config (layer count or projection)"
        )


# --------------------------------------------------------------------------------------- HF config helpers


def text_config_from_hf(d: dict, **overrides) -> clip_text.CLIPTextConfig:
    """transformers CLIPTextConfig dict (config.json) -> CLIPTextConfig."""
    if d.get("hidden_act") not in clip_text.ACTIVATIONS:
        raise CheckpointError(
            f"text encoder hidden_act {d.get('hidden_act')!r} is not supported "
            f"(expected one of {clip_text.ACTIVATIONS})"
        )
    with_projection = "CLIPTextModelWithProjection" in (d.get("architectures") or [])
    return clip_text.CLIPTextConfig(
        vocab_size=d["vocab_size"],
        max_length=d.get("max_position_embeddings", 77),
        width=d["hidden_size"],
        layers=d["num_hidden_layers"],
        heads=d["num_attention_heads"],
        mlp_dim=d["intermediate_size"],
        activation=d["hidden_act"],
        projection_dim=d.get("projection_dim") if with_projection else None,
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        **overrides,
    )


def text_config_to_hf(c: clip_text.CLIPTextConfig) -> dict:
    """CLIPTextConfig -> transformers config.json dict (CLIPTextModel, or ...WithProjection with a
    projection). eos_token_id 2 as in the published SDXL configs: pool at the argmax id (SPEC.md)."""
    arch = "CLIPTextModel" if c.projection_dim is None else "CLIPTextModelWithProjection"
    return {
        "architectures": [arch],
        "model_type": "clip_text_model",
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_length,
        "hidden_size": c.width,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "intermediate_size": c.mlp_dim,
        "hidden_act": c.activation,
        "projection_dim": c.projection_dim or c.width,
        "layer_norm_eps": c.layer_norm_eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }


# ------------------------------------------------------------------------------------------ load / save


def load_text_encoders(path: str, dtype=None) -> tuple[conditioning.Conditioner, dict]:
    """(Conditioner, params) from a diffusers SDXL folder (base or refiner) or an sgm single file.
    `dtype` sets the compute dtype (params stay fp32)."""
    if os.path.isdir(path):
        config, params = _load_diffusers(path)
    elif os.path.isfile(path):
        config, params = _load_single_file(path)
    else:
        raise CheckpointError(
            f"{path}: no such file or folder; pass a diffusers folder or a .safetensors file"
        )
    if dtype is not None:
        config = config.with_dtype(dtype)
    return conditioning.Conditioner(config), params


def _load_diffusers(path: str):
    folder_g = os.path.join(path, "text_encoder_2")
    if not os.path.isdir(folder_g):
        raise CheckpointError(
            f"{path}: no text_encoder_2/ folder; SDXL diffusers folders have one (base and refiner)"
        )
    text_g = text_config_from_hf(common.read_json(os.path.join(folder_g, "config.json")))
    folder_l = os.path.join(path, "text_encoder")
    text_l = None
    if os.path.isdir(folder_l):
        text_l = text_config_from_hf(common.read_json(os.path.join(folder_l, "config.json")))
    if text_g.projection_dim is None:
        raise CheckpointError(f"{folder_g}: expected CLIPTextModelWithProjection (the pooled bigG embedding)")
    unet_cfg = os.path.join(path, "unet", "config.json")
    size_dim = (
        common.read_json(unet_cfg).get("addition_time_embed_dim", 256) if os.path.isfile(unet_cfg) else 256
    )
    preset = conditioning.PRESETS["sdxl_base" if text_l is not None else "sdxl_refiner"]
    config = preset.replace(text_l=text_l, text_g=text_g, size_embed_dim=size_dim)
    params = {"text_g": _load_hf_folder(folder_g, text_g)}
    if text_l is not None:
        params["text_l"] = _load_hf_folder(folder_l, text_l)
    return config, params


def _load_hf_folder(folder: str, config: clip_text.CLIPTextConfig) -> dict:
    weights = common.find_weights(folder, stems=("model",))
    flat = common.read_safetensors(weights)
    # transformers 4 wrote CLIPTextModel keys under text_model.; transformers 5 writes them bare.
    prefix = HF_PREFIX if any(k.startswith(HF_PREFIX) for k in flat) else ""
    table = hf_table(config, prefix)
    _check_unused(flat, table, weights)
    return to_flax(flat, table, config, weights)


def _load_single_file(path: str):
    metadata = common.read_safetensors_metadata(path)
    flat = common.read_safetensors(path, prefix="conditioner.embedders.")
    flat = {"conditioner.embedders." + k: v for k, v in flat.items()}
    is_base = any(k.startswith(SGM_L) for k in flat)
    prefix_g = SGM_G_BASE if is_base else SGM_G_REFINER
    if not any(k.startswith(prefix_g) for k in flat):
        raise CheckpointError(f"{path}: no OpenCLIP bigG weights under {prefix_g}; not an SDXL single file")
    if METADATA_KEY in metadata:
        config = _config_from_json(metadata[METADATA_KEY])
    else:
        config = _infer_single_file_config(flat, is_base, prefix_g)
        adm = common.read_safetensors(path, prefix="model.diffusion_model.label_emb.0.0.weight")
        if adm:  # the UNet's vector input = pooled + n_scalars * size_embed_dim
            n_scalars = sum(conditioning._SIZE_WIDTH[k] for k in config.size_keys)
            config = config.replace(
                size_embed_dim=(adm[""].shape[1] - config.text_g.projection_dim) // n_scalars
            )
    params = {}
    if config.text_l is not None:
        sub = {k: v for k, v in flat.items() if k.startswith(SGM_L)}
        table = hf_table(config.text_l, SGM_L + HF_PREFIX)
        _check_unused(sub, table, path)
        params["text_l"] = to_flax(sub, table, config.text_l, path)
    sub = {k: v for k, v in flat.items() if k.startswith(prefix_g)}
    table = open_clip_table(config.text_g, prefix_g)
    _check_unused(sub, table, path)
    params["text_g"] = to_flax(sub, table, config.text_g, path)
    return config, params


def _infer_single_file_config(flat: dict, is_base: bool, prefix_g: str) -> conditioning.ConditionerConfig:
    """Text configs from tensor shapes. Heads are not in the shapes: head_dim 64 as in both SDXL encoders
    (files we write carry the exact config in their metadata instead)."""

    def common_dims(emb_key, layer_fmt, fc_key):
        vocab, width = flat[emb_key].shape
        n = 0
        while f"{layer_fmt.format(n)}{fc_key}" in flat:
            n += 1
        mlp = flat[f"{layer_fmt.format(0)}{fc_key}"].shape[0]
        return dict(vocab_size=vocab, width=width, layers=n, heads=max(width // 64, 1), mlp_dim=mlp)

    g = common_dims(
        f"{prefix_g}token_embedding.weight", prefix_g + "transformer.resblocks.{}.", "mlp.c_fc.weight"
    )
    proj = flat.get(f"{prefix_g}text_projection")
    text_g = clip_text.CLIPTextConfig(
        **g,
        max_length=flat[f"{prefix_g}positional_embedding"].shape[0],
        activation="gelu",
        projection_dim=None if proj is None else proj.shape[1],
    )
    if not is_base:
        return conditioning.PRESETS["sdxl_refiner"].replace(text_g=text_g)
    p = SGM_L + HF_PREFIX
    dims = common_dims(f"{p}embeddings.token_embedding.weight", p + "encoder.layers.{}.", "mlp.fc1.weight")
    text_l = clip_text.CLIPTextConfig(
        **dims, max_length=flat[f"{p}embeddings.position_embedding.weight"].shape[0], activation="quick_gelu"
    )
    return conditioning.PRESETS["sdxl_base"].replace(text_l=text_l, text_g=text_g)


def save_text_encoders(
    path: str,
    conditioner: conditioning.Conditioner,
    params: dict,
    format: str = "diffusers",
    dtype=None,
    tokenizers: bool = True,
) -> None:
    """Writes the text encoders. format="diffusers": path/text_encoder[_2]/{config.json,model.safetensors}
    (plus tokenizer/ and tokenizer_2/ vocabularies when `tokenizers`). format="sgm": the tensors go into the
    single file `path` under conditioner.embedders.*; an existing file keeps its other tensors (UNet, VAE).
    `dtype` (e.g. "float16") casts the stored tensors."""
    config = conditioner.config
    if format == "diffusers":
        folders = [("text_encoder_2", "text_g", config.text_g, "!")]
        if config.text_l is not None:
            folders.append(("text_encoder", "text_l", config.text_l, "<|endoftext|>"))
        for folder, name, text_config, pad in folders:
            tensors = from_flax(params[name], hf_table(text_config))
            common.write_safetensors(
                os.path.join(path, folder, "model.safetensors"),
                _cast(tensors, dtype),
                metadata={"format": "pt"},
            )
            common.save_json(os.path.join(path, folder, "config.json"), text_config_to_hf(text_config))
            if tokenizers:
                _write_tokenizer(os.path.join(path, folder.replace("text_encoder", "tokenizer")), pad)
    elif format == "sgm":
        tensors = _cast(to_sgm_tensors(config, params), dtype)
        metadata = {}
        if os.path.isfile(path):
            metadata = common.read_safetensors_metadata(path)
            old = common.read_safetensors(path)
            tensors = {
                **{k: np.array(v) for k, v in old.items() if not k.startswith("conditioner.")},
                **tensors,
            }
        metadata[METADATA_KEY] = _config_to_json(config)
        common.write_safetensors(path, tensors, metadata=metadata)
    else:
        raise ValueError(f"format {format!r}: choose 'diffusers' or 'sgm'")


def to_sgm_tensors(config: conditioning.ConditionerConfig, params: dict) -> dict[str, np.ndarray]:
    """The conditioner's tensors under sgm single-file names (for writers that combine all parts)."""
    prefix_g = SGM_G_BASE if config.text_l is not None else SGM_G_REFINER
    out = from_flax(params["text_g"], open_clip_table(config.text_g, prefix_g))
    out[f"{prefix_g}logit_scale"] = np.asarray(OPEN_CLIP_LOGIT_SCALE, np.float32)
    if config.text_l is not None:
        out.update(from_flax(params["text_l"], hf_table(config.text_l, SGM_L + HF_PREFIX)))
    return out


def _cast(tensors: dict, dtype) -> dict:
    return tensors if dtype is None else {k: v.astype(dtype) for k, v in tensors.items()}


def _write_tokenizer(folder: str, pad: str) -> None:
    from sdxl_jax import tokenizer

    tokenizer.write_vocab_files(folder)
    common.save_json(
        os.path.join(folder, "tokenizer_config.json"),
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "pad_token": pad,
            "bos_token": tokenizer.BOS,
            "eos_token": tokenizer.EOS,
            "unk_token": tokenizer.EOS,
        },
    )


def _config_to_json(config: conditioning.ConditionerConfig) -> str:
    def text(c):
        return (
            None
            if c is None
            else {k: jnp.dtype(v).name if k in ("dtype", "param_dtype") else v for k, v in vars(c).items()}
        )

    d = {k: v for k, v in vars(config).items() if k not in ("text_l", "text_g")}
    return json.dumps({**d, "text_l": text(config.text_l), "text_g": text(config.text_g)})


def _config_from_json(s: str) -> conditioning.ConditionerConfig:
    d = json.loads(s)
    text = {k: None if d[k] is None else clip_text.CLIPTextConfig(**d[k]) for k in ("text_l", "text_g")}
    rest = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k not in text}
    return conditioning.ConditionerConfig(**text, **rest)
