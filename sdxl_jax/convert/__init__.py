"""Weights in and out: sgm single files, diffusers folders, HF/open_clip CLIP layouts (safetensors only).

    unet, params = convert.load_unet(path);  convert.save_unet(path, unet, params, format="diffusers")
    vae, params = convert.load_vae(path);    convert.save_vae(path, vae, params, format="sgm")
    text, params = convert.load_text_encoders(path);  convert.save_text_encoders(path, text, params, ...)
"""

import importlib

_EXPORTS = {
    "load_unet": "unet",
    "save_unet": "unet",
    "load_vae": "vae",
    "save_vae": "vae",
    "load_text_encoders": "text",
    "save_text_encoders": "text",
}


def __getattr__(name):
    # Lazy: importing sdxl_jax.convert must not import every model family.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sdxl_jax.convert.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sdxl_jax.convert' has no attribute {name!r}")
