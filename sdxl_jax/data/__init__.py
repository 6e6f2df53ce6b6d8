"""Data: grain pipelines with SDXL's aspect buckets and micro-conditioning (issue 6).

Contract of a training batch (a dict of numpy arrays only; captions never enter it), B host-local rows:
    "image"                 float32 (B, H, W, 3) in [-1, 1], (H, W) = the step's bucket
    "ids_l", "ids_g"        int32 (B, 77)  CLIP-L / bigG token ids (each with its encoder's padding)
    "original_size"         int32 (B, 2)   (h, w) before any resize
    "crop_coords_top_left"  int32 (B, 2)   (top, left) of the crop in pixels of the resized image
    "target_size"           int32 (B, 2)   (h, w) of the bucket
    "aesthetic_score"       float32 (B,)   data.aesthetic_score unless the source provides one

    from sdxl_jax import data
    it = data.make_train_iterator(config.data, seed=..., global_batch_size=..., process_index=...,
                                  process_count=..., tokenizer=tok, start_step=0)
    it.get_state() / it.set_state(state) / it.skip_counts() / it.batch_shapes()
    data.batch_shapes(config.data, batch_size)     # every bucket the config allows
    data.buckets.from_config(config.data); data.buckets.assign(h, w, table)
    data.shapes.COLORS / SHAPES / render(...)       # the embedded dataset, reused by evaluation
Sources: sources.py; the iterator design: pipeline.py; shards: `python -m sdxl_jax.data.prepare`.
"""

import importlib

_EXPORTS = {
    "make_train_iterator": "iterator",
    "TrainIterator": "iterator",
    "batch_shapes": "pipeline",
    "batch_spec": "pipeline",
}
_SUBMODULES = ("buckets", "decode", "iterator", "pipeline", "prepare", "process", "shapes", "sources")


def __getattr__(name):
    # Lazy: `from sdxl_jax.data import shapes` must not import grain or tensorflow_datasets.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sdxl_jax.data.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"sdxl_jax.data.{name}")
    raise AttributeError(f"module 'sdxl_jax.data' has no attribute {name!r}")
