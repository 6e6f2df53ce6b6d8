"""Export a trained autoencoder's VAE as safetensors (convert.save_vae), EMA weights by default.

    python -m sdxl_jax.autoencoder.export WORKDIR OUT [--format diffusers|sgm] [--which ema|raw]

diffusers: OUT is a folder (config.json + diffusion_pytorch_model.safetensors), loadable by
diffusers' AutoencoderKL.from_pretrained and by convert.load_vae; sgm: OUT is one .safetensors file
with `first_stage_model.` names (as inside SDXL single files; --prefix '' for a bare ldm VAE file).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import numpy as np


def load_workdir_vae(workdir: str, which: str = "ema"):
    """(AutoencoderKL, params as host numpy) of a training workdir: an autoencoder run's trained VAE
    (EMA or raw), or the frozen VAE of a diffusion stage."""
    from sdxl_jax import checkpoint
    from sdxl_jax.models import vae as vae_lib

    config, params = checkpoint.load_params(workdir, which=which)
    if params["vae"] is None:
        raise ValueError(f"{workdir} holds no VAE weights (its config.vae_from / init_from has them)")
    m = config.model
    vae_cfg = dataclasses.replace(vae_lib.PRESETS[m.vae], scaling_factor=float(m.latent_scale),
                                  param_dtype=m.param_dtype)
    return vae_lib.AutoencoderKL(vae_cfg), jax.tree.map(np.asarray, params["vae"])


def export(workdir: str, out: str, *, format: str = "diffusers", which: str = "ema", prefix=None) -> None:
    from sdxl_jax import convert

    vae, params = load_workdir_vae(workdir, which)
    kw = {} if prefix is None else {"prefix": prefix}
    convert.save_vae(out, vae, params, format=format, **kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdxl_jax.autoencoder.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="an autoencoder training workdir (config.task='autoencoder')")
    p.add_argument("out", help="output folder (diffusers) or .safetensors file (sgm)")
    p.add_argument("--format", choices=("diffusers", "sgm"), default="diffusers")
    p.add_argument("--which", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--prefix", default=None, help="sgm key prefix (default 'first_stage_model.')")
    args = p.parse_args(argv)
    export(args.workdir, args.out, format=args.format, which=args.which, prefix=args.prefix)
    print(f"wrote the {args.which} VAE of {args.workdir} to {args.out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
