"""Reconstructions during autoencoder training, and their error, EMA vs raw weights.

Every config.sample_every steps: the same `autoencoder.preview_images` images are encoded (posterior
mean) and decoded with the raw and the EMA VAE. Written: workdir/samples/step<N>_recon.png (rows:
originals, raw, EMA), TensorBoard images "reconstructions", and one line per preview in
workdir/eval.jsonl {"step", "l1_raw", "l1_ema", "mse_raw", "mse_ema", "psnr_raw", "psnr_ema"} (images
in [-1, 1]; PSNR on [0, 1]), also as TensorBoard scalars "eval/...".

The images are held out for the shapes data (examples past data.shapes_num_examples, which training
never draws); for other sources they are the source's first examples (training images: a
reconstruction check, not a held-out score); centre crops of config.sample.height x width (the VAE is
fully convolutional: it may be trained on smaller crops than it is checked on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def eval_images(data_config, n: int, height: int, width: int) -> np.ndarray:
    """float32 (n, height, width, 3) in [-1, 1], centre crops."""
    from PIL import Image

    from sdxl_jax.data import decode, process, shapes, sources

    c = data_config
    if c.source == "shapes":
        first = int(c.shapes_num_examples)
        source = shapes.ShapesSource(first + n, min_side=c.shapes_min_side, max_side=c.shapes_max_side,
                                     holdout=c.shapes_holdout)
    else:
        first, source = 0, sources.from_config(c)
    out = np.empty((n, height, width, 3), np.float32)
    got, i = 0, first
    while got < n and i < len(source):
        try:
            h, w = source.probe(i)["size"]
            params = process.crop_params(h, w, height, width, random_crop=False, flip=False)
            image = source.load(i)["image"]
            img = (Image.fromarray(image) if isinstance(image, np.ndarray)
                   else decode.decode(image, c.max_image_pixels, min_size=params["resized"]))
            process.to_float(process.render_crop(img, params), out=out[got])
            got += 1
        except decode.Skip:
            pass
        i += 1
    if got < n:
        raise ValueError(f"only {got} usable preview images in data.source={c.source!r}; lower "
                         "config.autoencoder.preview_images")
    return out


def reconstruction_errors(x: np.ndarray, recon: np.ndarray) -> dict:
    """Mean L1 and MSE on [-1, 1] images and PSNR (dB) on [0, 1]."""
    d = np.asarray(recon, np.float64) - np.asarray(x, np.float64)
    mse = float(np.mean(d * d))
    return {"l1": float(np.mean(np.abs(d))), "mse": mse, "psnr": float(10 * np.log10(4.0 / max(mse, 1e-12)))}


def to_uint8(x) -> np.ndarray:
    return np.asarray(np.clip((np.asarray(x) + 1.0) * 127.5 + 0.5, 0, 255), np.uint8)


def make_preview_fn(setup, config, workdir, writer):
    """-> preview(state, frozen, step), or None when config.autoencoder.preview_images is 0."""
    n = int(config.autoencoder.preview_images)
    if n <= 0:
        return None
    from sdxl_jax.preview import _gather_to_host

    images = eval_images(config.data, n, config.sample.height, config.sample.width)
    vae = setup.models.vae
    device = jax.local_devices()[0]

    @jax.jit
    def reconstruct(params, x):
        mean, _ = vae.apply({"params": params}, x, method="encode")
        return vae.apply({"params": params}, mean, method="decode")

    def preview(state, frozen, step):
        # Sharded arrays -> host on every process (a collective), then one device: the preview must not
        # compete with the training step for memory on the others.
        raw = _gather_to_host(state.params["vae"])
        ema = _gather_to_host(state.ema_params["vae"])
        if jax.process_index() != 0:
            return
        x = jax.device_put(jnp.asarray(images), device)
        recs = {k: np.asarray(reconstruct(jax.device_put(p, device), x))
                for k, p in (("raw", raw), ("ema", ema))}
        record = {"step": int(step)}
        for k, rec in recs.items():
            record.update({f"{m}_{k}": v for m, v in reconstruction_errors(images, rec).items()})
        rows = [np.concatenate(list(to_uint8(a)), axis=1) for a in (images, recs["raw"], recs["ema"])]
        grid = np.concatenate(rows, axis=0)
        from sdxl_jax import paths, sample_lib

        outdir = paths.as_path(workdir) / "samples"  # local or gs://
        outdir.mkdir(parents=True, exist_ok=True)
        sample_lib.write_png(outdir / f"step{step:08d}_recon.png", grid,
                             {"step": int(step), "rows": "original, raw, ema", **record})
        scores = {k: v for k, v in record.items() if k != "step"}
        writer.scalars(step, scores, prefix="eval", jsonl="eval.jsonl")
        writer.images("reconstructions", grid[None], step)
        print(f"step {step}: preview reconstruction L1 raw {record['l1_raw']:.4f} "
              f"ema {record['l1_ema']:.4f}, "
              f"PSNR raw {record['psnr_raw']:.2f} ema {record['psnr_ema']:.2f} dB; wrote {outdir}")

    return preview
