"""Writes the latent and text-embedding cache (format: cache.py) from array_record shards.

    python -m sdxl_jax.data.prepare --encode --input=DIR --out=DIR_ENC \\
        --config=configs/stage2_512.py [--config_arg=...] [--weights_from=sd_xl_base_1.0.safetensors]

Then train with `--config.data.source=array_record --config.data.path=DIR_ENC` and the SAME data config
(buckets, resolution, batch size): each example is cached in the bucket the training index would give it.
Without --input the config's own data source is encoded (e.g. the built-in shapes data).
The frozen weights come from --weights_from (a diffusers folder or sgm single file with the VAE and both
text encoders), else exactly as a fresh training run gets them (train_lib.initial_frozen): the config's
vae_from / text_from / init_from, and the config seed's random init for what none of them gives.
"""

from __future__ import annotations

import json
import os

import numpy as np

from sdxl_jax import paths
from sdxl_jax.data import buckets as buckets_lib
from sdxl_jax.data import cache, decode, pipeline, prepare, process, sources


def load_config(path: str, arg: str | None = None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_encode_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def load_frozen(config, weights_from: str):
    """{"vae": params, "text": params} as numpy trees from one diffusers folder or sgm single file."""
    from sdxl_jax import convert

    return {"vae": convert.load_vae(weights_from)[1], "text": convert.load_text_encoders(weights_from)[1]}


def text_encodings(conditioner, ids_l, ids_g) -> dict:
    """Conditioner method: the cached text arrays (cache.TEXT_KEYS) of token ids, before any dropout."""
    out = {}
    if conditioner.config.text_l is not None:
        out["text_l"] = conditioner.text_l(ids_l)[0]
    out["text_g"], out["pooled_g"] = conditioner.text_g(ids_g)
    return out


def make_encoder(models, seed: int = 0):
    """jitted (frozen, images, ids_l, ids_g, example_ids) -> {"latents" (scaled), text arrays}."""
    import jax

    from sdxl_jax.models import vae as vae_lib

    base = jax.random.PRNGKey(seed)

    def fn(frozen, images, ids_l, ids_g, example_ids):
        mean, logvar = models.vae.apply({"params": frozen["vae"]}, images, method="encode")
        # One seeded posterior draw per example: the cache does not depend on the encoding batch size.
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(example_ids)
        z = jax.vmap(lambda k, m, lv: vae_lib.sample_posterior(k, m, lv))(keys, mean, logvar)
        out = models.conditioner.apply({"params": frozen["text"]}, ids_l, ids_g, method=text_encodings)
        out["latents"] = models.latent_scale * z
        return out

    return jax.jit(fn)


def encode(input_dir: str, out_dir: str, config, frozen, *, batch_size: int = 8, cache_dtype="float32",
           records_per_shard: int = 2048, seed: int = 0, tokenizer=None, log=print) -> dict:  # fmt: skip
    """Encodes every usable example of the array_record folder `input_dir` ("": of the config's own data
    source); returns the index.json dict."""
    prepare.check_local_out(out_dir)

    from array_record.python.array_record_module import ArrayRecordWriter
    from PIL import Image

    from sdxl_jax import train_state

    if tokenizer is None:
        from sdxl_jax import tokenizer as tokenizer_lib

        tokenizer = tokenizer_lib.load_pair(path=None)
    source = sources.ArrayRecordSource(input_dir) if input_dir else sources.from_config(config.data)
    if getattr(source, "encoded", False):
        raise ValueError(f"{input_dir} is already an encoded cache; --input takes the image shards")
    table = buckets_lib.from_config(config.data)
    # The training index's own bucket assignment (with its merge of buckets smaller than one global
    # batch), so training on the cache draws the same buckets as training on the images would.
    index = pipeline.Index(source, config.data, table, config.data.batch_size)
    models = train_state.build_models(config)
    encoder = make_encoder(models, seed)
    store = cache._dtype(cache_dtype)
    os.makedirs(out_dir, exist_ok=True)
    names, sizes, writer, count = [], [], None, 0
    for b, members in enumerate(index.members):
        bh, bw = table[b]
        for start in range(0, len(members), batch_size):
            chunk = [int(i) for i in members[start : start + batch_size]]
            n = len(chunk)
            images = np.zeros((batch_size, bh, bw, 3), np.float32)  # padded: one compile per bucket
            rows = []
            for j, i in enumerate(chunk):
                ex = source.load(i)
                h, w = (int(x) for x in index.sizes[i])
                # Deterministic centre crop, no flip: the crop whose conditioning the cache stores.
                params = process.crop_params(h, w, bh, bw, random_crop=False, flip=False)
                if isinstance(ex["image"], np.ndarray):  # procedural sources give pixels
                    img = Image.fromarray(ex["image"])
                else:
                    img = decode.decode(ex["image"], config.data.max_image_pixels, min_size=params["resized"])
                process.to_float(process.render_crop(img, params), out=images[j])
                rows.append((ex, params))
            captions = [decode.caption_text(ex.get("caption")) for ex, _ in rows]
            ids = tokenizer(captions + [""] * (batch_size - n))
            ids_l, ids_g = (np.asarray(ids[k], np.int32) for k in ("ids_l", "ids_g"))
            example_ids = np.asarray(chunk + [0] * (batch_size - n), np.int32)
            out = {k: np.asarray(v) for k, v in encoder(frozen, images, ids_l, ids_g, example_ids).items()}
            for j, (ex, params) in enumerate(rows):
                arrays = {"latents": out["latents"][j].astype(store)}
                arrays.update({k: out[k][j].astype(store) for k in cache.TEXT_KEYS if k in out})
                record = cache.encode_record(arrays, captions[j], params, ex.get("aesthetic_score"))
                if count % records_per_shard == 0:
                    if writer is not None:
                        writer.close()
                    names.append(f"encoded-{len(names):05d}.array_record")
                    writer = ArrayRecordWriter(os.path.join(out_dir, names[-1]), "group_size:1")
                writer.write(record)
                sizes.append((bh, bw))
                count += 1
        log(f"encoded bucket {table[b]}: {len(members)} examples")
    if writer is not None:
        writer.close()
    # sizes.npy holds each record's bucket, so the training index assigns it to exactly that bucket.
    np.save(os.path.join(out_dir, "sizes.npy"), np.asarray(sizes, np.int32).reshape(-1, 2))
    summary = {
        "format": cache.FORMAT,
        "shards": names,
        "count": count,
        "skipped": dict(index.skips),
        "source": str(paths.as_path(input_dir)) if input_dir else f"data.source={config.data.source}",
        "buckets": [list(t) for t, m in zip(table, index.members, strict=True) if len(m)],
        "model": {k: config.model[k] for k in ("vae", "text", "latent_scale")},
        "global_batch_size": int(config.data.batch_size),
        "dtype": str(np.dtype(store)),
        "seed": int(seed),
    }
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"wrote {count} encoded examples in {len(names)} shards to {out_dir}; skipped {dict(index.skips)}")
    return summary
