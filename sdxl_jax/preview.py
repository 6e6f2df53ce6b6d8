"""Preview images during training: config.sample.prompts from the EMA params, every config.sample_every steps.

Sampling itself is sdxl_jax.pipeline's (CFG, the sampler, VAE decode); this module only hands it the
training run's models and current EMA weights, and writes the images to workdir/samples/ (local or gs://)
and TensorBoard.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from sdxl_jax import paths, sample_lib


def _gather_to_host(tree):
    """Sharded arrays -> host numpy on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return multihost_utils.process_allgather(tree, tiled=True)


def make_preview_fn(setup, config, workdir, writer):
    """-> preview(state, frozen, step), or None when there are no prompts to sample."""
    s = config.sample
    if not s.prompts:
        return None
    outdir = paths.as_path(workdir) / "samples"

    def preview(state, frozen, step):
        from sdxl_jax import pipeline, tokenizer

        ema = _gather_to_host(state.ema_params)
        host_frozen = _gather_to_host(frozen)
        if jax.process_index() != 0:
            return
        models = setup.models
        stage = pipeline.Stage(models.unet, ema, models.conditioner, host_frozen["text"])
        # One device: the preview must not compete with the training step for memory on the others.
        pipe = pipeline.Pipeline(
            stage, models.vae, host_frozen["vae"], tokenizer.load_pair(), devices=jax.local_devices()[:1]
        )
        images = pipe.generate(
            list(s.prompts), height=s.height, width=s.width, steps=s.steps, guidance=s.guidance,
            sampler=s.sampler, seed=s.seed,
        )
        outdir.mkdir(parents=True, exist_ok=True)
        for i, (prompt, image) in enumerate(zip(s.prompts, images, strict=True)):
            sample_lib.write_png(
                outdir / f"step{step:08d}_{i:02d}.png", image,
                {"prompt": prompt, "step": step, "seed": s.seed + i, "steps": s.steps, "guidance": s.guidance,
                 "sampler": s.sampler},
            )
        writer.images("samples", np.asarray(images), step)
        print(f"wrote {len(images)} preview images to {outdir}")

    return preview
