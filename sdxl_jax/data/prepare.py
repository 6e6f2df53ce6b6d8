"""Writes array_record shards from a folder or webdataset tar shards, validated once, read fast later.

    python -m sdxl_jax.data.prepare --input=/data/photos --out=/data/photos_ar [--input_format=folder]
    python -m sdxl_jax.data.prepare --input='/data/shards/*.tar' --input_format=webdataset --out=DIR
    python -m sdxl_jax.data.prepare --input='gs://BUCKET/wds/{00000..09999}.tar' --input_format=webdataset \
        --out=DIR

Then train with `--config.data.source=array_record --config.data.path=DIR`. --out is a local folder; to
train from a bucket, copy it there (`gsutil -m cp -r DIR gs://BUCKET/data/`) and train with
`--config.data.path=gs://BUCKET/data/NAME` (NAME: DIR's last component).

    python -m sdxl_jax.data.prepare --encode --input=DIR --out=DIR_ENC --config=configs/stage2_512.py \
        --weights_from=sd_xl_base_1.0.safetensors

adds the latent and text-embedding cache (encode_cache.py, format in cache.py): training with
`--config.data.path=DIR_ENC` (same data config) skips the frozen VAE and text encoders.

Output: DIR/shard-NNNNN.array_record, DIR/sizes.npy ((N, 2) int32 upright (h, w), so the
training index needs no pass over the data) and DIR/index.json (shard names, count, skip counts).
Every example is fully decoded once here; bad ones are skipped and counted, never written.
Record: b"SXR1" | uint32 little-endian header length | UTF-8 JSON header {"caption", "size" [h, w],
optional "aesthetic_score"} | the original encoded image bytes (no re-encoding, no quality loss).
"""

import argparse
import collections
import json
import os
import struct
import sys

import numpy as np

from sdxl_jax import config_lib, paths
from sdxl_jax.data import decode, sources, threads

MAGIC = b"SXR1"
FORMAT = "sdxl_jax/array_record/v1"


def encode_record(image_bytes, caption, size, aesthetic_score=None):
    header = {"caption": caption, "size": [int(size[0]), int(size[1])]}
    if aesthetic_score is not None:
        header["aesthetic_score"] = float(aesthetic_score)
    blob = json.dumps(header).encode("utf-8")
    return MAGIC + struct.pack("<I", len(blob)) + blob + bytes(image_bytes)


def decode_record(record):
    if record[:4] != MAGIC:
        raise decode.Skip("not_an_image", "not an sdxl_jax array_record record (bad magic)")
    (n,) = struct.unpack("<I", record[4:8])
    header = json.loads(record[8 : 8 + n].decode("utf-8"))
    out = dict(image=record[8 + n :], caption=header["caption"])
    if "aesthetic_score" in header:
        out["aesthetic_score"] = header["aesthetic_score"]
    return out


def _validated(source, i, max_pixels):
    """(record bytes, size) or raises Skip; decodes the pixels fully to catch truncated files."""
    meta = source.probe(i)
    ex = source.load(i)
    caption = decode.caption_text(ex.get("caption"))
    image = ex["image"]
    if not isinstance(image, (bytes, bytearray)):
        with open(image, "rb") as f:
            image = f.read()
    decode.decode(image, max_pixels)
    size = meta["size"]
    return encode_record(image, caption, size, ex.get("aesthetic_score")), size


def check_local_out(out_dir):
    """Raises ValueError, telling what to do instead, when `out_dir` is a bucket URL: the writers here
    write a local disk (os.makedirs would make a folder named 'gs:')."""
    if not paths.is_remote(out_dir):
        return
    url = str(out_dir).rstrip("/")
    parent, _, name = url.rpartition("/")
    if parent.endswith(":/"):  # the bucket itself
        parent, name = url, "DIR"
    raise ValueError(
        f"--out={out_dir!r}: prepare writes to a local disk only. Write to a local folder "
        f"(--out=/local/disk/{name}), copy it to the bucket "
        f"(`gsutil -m cp -r /local/disk/{name} {parent}/`), then train with "
        f"--config.data.source=array_record --config.data.path={parent}/{name}"
    )


def prepare(input_path, out_dir, *, input_format="folder", records_per_shard=2048,
            max_pixels=178_956_970, num_threads=8, log=print):  # fmt: skip
    """Writes the shards; returns {"count": n, "skipped": {reason: count}}."""
    from array_record.python.array_record_module import ArrayRecordWriter

    check_local_out(out_dir)
    if input_format == "folder":
        source = sources.FolderSource(input_path, max_pixels)
    elif input_format == "webdataset":
        source = sources.WebDatasetSource(input_path, max_pixels)
    else:
        raise ValueError(f"--input_format={input_format!r}: choose folder or webdataset")
    os.makedirs(out_dir, exist_ok=True)
    skipped = collections.Counter()

    def work(i):
        try:
            return _validated(source, i, max_pixels)
        except decode.Skip as e:
            return e.reason

    # Streamed in source order, one image per task and at most 2 * num_threads ahead of the writer, so
    # memory stays at one shard's writer (Executor.map would hold every finished image the writer has
    # not reached).
    sizes, names, writer = [], [], None
    for result in threads.ordered_map(work, range(len(source)), num_threads, chunk_size=1):
        if isinstance(result, str):
            skipped[result] += 1
            continue
        if len(sizes) % records_per_shard == 0:
            if writer is not None:
                writer.close()
            names.append(f"shard-{len(names):05d}.array_record")
            # group_size:1 keeps every record independently addressable for random access.
            writer = ArrayRecordWriter(os.path.join(out_dir, names[-1]), "group_size:1")
        writer.write(result[0])
        sizes.append(result[1])
    if writer is not None:
        writer.close()
    np.save(os.path.join(out_dir, "sizes.npy"), np.asarray(sizes, np.int32).reshape(-1, 2))
    summary = {"format": FORMAT, "shards": names, "count": len(sizes), "skipped": dict(skipped)}
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"wrote {len(sizes)} examples in {len(names)} shards to {out_dir}; skipped {dict(skipped)}")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", default="", help="a folder, or tar shards: a .tar, folder, glob or brace "
                        "pattern (local or gs://); --encode: the prepared folder (local or gs://), or none "
                        "to encode the config's own data source (e.g. shapes)")
    parser.add_argument("--out", required=True, help="local output folder for the array_record shards")
    parser.add_argument("--input_format", default="folder", choices=("folder", "webdataset"))
    parser.add_argument("--records_per_shard", type=int, default=2048)
    parser.add_argument("--max_image_pixels", type=int, default=178_956_970)
    parser.add_argument("--num_threads", type=int, default=8)
    parser.add_argument("--encode", action="store_true",
                        help="--input is a prepared folder: write its latent/text-embedding cache to --out")
    parser.add_argument("--config", default="", help="--encode: the training config file (models, buckets)")
    parser.add_argument("--config_arg", default=None, help="--encode: the config's variant argument")
    parser.add_argument("--weights_from", default="", help="--encode: VAE + text encoder weights (default: "
                        "those a fresh run of the config starts with: vae_from, text_from, init_from, seed)")
    parser.add_argument("--random_weights", action="store_true",
                        help="--encode: random frozen weights (benchmarks and tests only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--encode: a config override, e.g. data.batch_size=64 (repeatable)")
    parser.add_argument("--encode_batch_size", type=int, default=8)
    parser.add_argument("--cache_dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    try:
        check_local_out(args.out)  # before loading any data, config or weights
    except ValueError as e:
        parser.error(str(e))
    if args.encode:
        return _encode(args)
    if not args.input:
        parser.error("--input is required (a folder, or tar shards: a .tar, folder, glob or brace pattern)")
    prepare(args.input, args.out, input_format=args.input_format, records_per_shard=args.records_per_shard,
            max_pixels=args.max_image_pixels, num_threads=args.num_threads)  # fmt: skip
    return 0


def _encode(args):
    from sdxl_jax.data import encode_cache

    if not args.config:
        raise SystemExit("--encode needs --config=configs/<file>.py (the models and data config of the run)")
    config = encode_cache.load_config(args.config, args.config_arg)
    config_lib.apply_overrides(config, args.set)
    if args.weights_from:
        frozen = encode_cache.load_frozen(config, args.weights_from)
    else:
        from sdxl_jax import parallel, train_lib, train_state

        setup = train_state.make_setup(config, parallel.make_mesh(config.mesh))
        if args.random_weights:
            frozen = train_state.init_frozen_params(setup, config)
        else:  # exactly the frozen weights a fresh run of this config starts with
            frozen = train_lib.initial_frozen(setup, config)
    encode_cache.encode(args.input, args.out, config, frozen, batch_size=args.encode_batch_size,
                        cache_dtype=args.cache_dtype, records_per_shard=args.records_per_shard)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
