"""The latent and text-embedding cache: record format, and the conditioning built from cached encodings.

`python -m sdxl_jax.data.prepare --encode` (encode_cache.py) runs the frozen VAE encoder and both text
encoders once per example and writes array_record shards of these records; training reads them with
`--config.data.source=array_record --config.data.path=<the encoded folder>` and the train step skips the
frozen encoders (train_step.py: "latents" replaces the VAE, "text_g" etc. replace the text encoders).

Each example is cached in ONE bucket and ONE crop, chosen at encode time exactly as the training pipeline
would choose them without randomness (centre crop, no flip, pipeline.Index's bucket assignment including
its merge of small buckets), and its size conditioning (original_size, crop_coords_top_left,
target_size) is stored with it, so the conditioning matches the latents exactly (SDXL sec. 2.2).
Random crops and flips are not available from a cache (a flipped latent is not the latent of the flipped
image).

Latents are stored scaled (z = latent_scale * sample(posterior), SPEC.md), one posterior sample per
example drawn at encode time (seeded by the example index).

Record: b"SXE1" | uint32 little-endian header length | UTF-8 JSON header {"caption", "original_size",
"crop_coords_top_left", "target_size", optional "aesthetic_score", "arrays": [[name, dtype, shape], ...]}
| the arrays' raw little-endian bytes, concatenated in that order.
Arrays: "latents" (h/8, w/8, C), "text_l" (77, 768) (base only), "text_g" (77, 1280), "pooled_g" (1280):
the penultimate hidden states of CLIP-L and bigG and bigG's pooled projection (SPEC.md), before any
conditioning dropout.
"""

from __future__ import annotations

import json
import struct

import numpy as np

MAGIC = b"SXE1"
FORMAT = "sdxl_jax/array_record_encoded/v1"
TEXT_KEYS = ("text_l", "text_g", "pooled_g")
SIZE_KEYS = ("original_size", "crop_coords_top_left", "target_size")


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def encode_record(arrays: dict, caption: str, sizes: dict, aesthetic_score=None) -> bytes:
    header = {"caption": caption, **{k: [int(v) for v in sizes[k]] for k in SIZE_KEYS}}
    if aesthetic_score is not None:
        header["aesthetic_score"] = float(aesthetic_score)
    header["arrays"] = [[k, str(v.dtype), list(v.shape)] for k, v in arrays.items()]
    blob = json.dumps(header).encode("utf-8")
    parts = [MAGIC, struct.pack("<I", len(blob)), blob]
    parts += [np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes() for v in arrays.values()]
    return b"".join(parts)


def decode_record(record: bytes) -> dict:
    """-> {"caption", size keys as int32 (2,), optional "aesthetic_score", and every cached array}."""
    if record[:4] != MAGIC:
        raise ValueError("not an encoded (latent cache) record: bad magic; was the folder written by "
                         "`python -m sdxl_jax.data.prepare --encode`?")
    (n,) = struct.unpack("<I", record[4:8])
    header = json.loads(record[8 : 8 + n].decode("utf-8"))
    out = {"caption": header["caption"]}
    for k in SIZE_KEYS:
        out[k] = np.asarray(header[k], np.int32)
    if "aesthetic_score" in header:
        out["aesthetic_score"] = header["aesthetic_score"]
    offset = 8 + n
    view = memoryview(record)
    for name, dtype, shape in header["arrays"]:
        dt = _dtype(dtype).newbyteorder("<")
        size = int(np.prod(shape)) * dt.itemsize
        arr = np.frombuffer(view[offset : offset + size], dt).reshape(shape)
        out[name] = arr.astype(dt.newbyteorder("="))
        offset += size
    return out


def has_cached_text(batch) -> bool:
    return "text_g" in batch


def conditioning(config, batch: dict, ucg_rng=None) -> dict:
    """{"crossattn", "vector"} from cached text encodings, equal to Conditioner(config).apply(...) on the
    original token ids with the same `ucg_rng`: the same per-embedder, per-sample dropout draws (fold_in
    indices in sgm's loop order: L hidden, G hidden, G pooled, then the size embedders), the same dtypes
    (crossattn in the text compute dtype, vector in fp32).

    config: the conditioning.ConditionerConfig of the run.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from sdxl_jax import conditioning as cond_lib
    from sdxl_jax.models import layers

    dtype = jnp.dtype(config.text_g.dtype)
    crossattn = ([batch["text_l"].astype(dtype)] if config.text_l is not None else []) + [
        batch["text_g"].astype(dtype)
    ]
    text_vector = [batch["pooled_g"].astype(dtype)]
    crossattn, text_vector = jax.lax.stop_gradient((crossattn, text_vector))
    sizes = [cond_lib.embed_sizes(batch[k], config.size_embed_dim) for k in config.size_keys]
    outputs = crossattn + text_vector + sizes
    rates = [config.ucg_rate_text] * (len(crossattn) + len(text_vector)) + [config.ucg_rate_size] * len(sizes)
    if ucg_rng is not None:
        keys = [jax.random.fold_in(ucg_rng, i) for i in range(len(outputs))]
        outputs = [cond_lib.drop(k, x, r) for k, x, r in zip(keys, outputs, rates, strict=True)]
    crossattn, vector = outputs[: len(crossattn)], outputs[len(crossattn) :]
    crossattn = jnp.concatenate(crossattn, axis=-1)
    vector = jnp.concatenate([v.astype(jnp.float32) for v in vector], axis=-1)
    return {"crossattn": nn.with_logical_constraint(crossattn, layers.TOKEN_AXES), "vector": vector}


def example_batch(config, latent_channels: int, downsample: int, batch_size: int, height: int, width: int,
                  dtype=np.float32) -> dict:  # fmt: skip
    """Zero host arrays shaped like a cached batch (AOT compilation, benchmarks); config as above."""
    b, length = batch_size, config.text_g.max_length
    out = {"latents": np.zeros((b, height // downsample, width // downsample, latent_channels), np.float32)}
    if config.text_l is not None:
        out["text_l"] = np.zeros((b, length, config.text_l.width), dtype)
    out["text_g"] = np.zeros((b, length, config.text_g.width), dtype)
    out["pooled_g"] = np.zeros((b, config.text_g.projection_dim), dtype)
    out["original_size"] = np.full((b, 2), (height, width), np.int32)
    out["crop_coords_top_left"] = np.zeros((b, 2), np.int32)
    out["target_size"] = np.full((b, 2), (height, width), np.int32)
    out["aesthetic_score"] = np.full((b,), 6.0, np.float32)
    return out


def stack_rows(rows: list[dict], bucket, step: int, default_aesthetic_score: float) -> dict:
    """Decoded records of one bucket -> a training batch (the StepLoader's output for a cached source)."""
    from sdxl_jax.data import decode

    for r in rows:
        if tuple(int(x) for x in r["target_size"]) != tuple(bucket):
            raise ValueError(
                f"a cached example of bucket {tuple(r['target_size'])} was drawn for bucket {tuple(bucket)}: "
                "the cache was encoded with other data.buckets / resolution / batch_size than this run; "
                "train with the data config used for `prepare --encode`, or encode again"
            )
    batch = {k: np.stack([r[k] for r in rows]) for k in ("latents",) + TEXT_KEYS if k in rows[0]}
    for k in SIZE_KEYS:
        batch[k] = np.stack([r[k] for r in rows]).astype(np.int32)
    batch["aesthetic_score"] = np.asarray(
        [r.get("aesthetic_score", default_aesthetic_score) for r in rows], np.float32
    )
    batch["_skips"] = np.zeros(len(decode.SKIP_REASONS), np.int64)
    batch["_step"] = np.int64(step)
    return batch
