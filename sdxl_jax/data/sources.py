"""Random-access example sources, chosen by `config.data.source` with `config.data.path`.

Every source is picklable (grain sends it to its worker processes; open files are reopened lazily per
process) and has
    len(source)
    source.probe(i) -> {"size": (h, w), optional "aesthetic_score"}  # cheap: header / index only
    source.load(i)  -> {"image": path | bytes | uint8 (H, W, 3), "caption": str | bytes | None,
                        optional "aesthetic_score"}
Both raise decode.Skip for a bad example. Sources:
- folder: images under `path` (recursive) with same-stem .txt/.caption files, or metadata.jsonl /
  metadata.csv files (columns file_name, relative to the metadata file, and text or caption).
- webdataset: tar shards (`path` is a .tar, a folder of them, or a glob); members grouped by key, one
  image member plus a .txt/.caption member or a .json member with "caption"/"text".
- array_record: shards written by `python -m sdxl_jax.data.prepare` (see prepare.py for the format).
- tfds: any TFDS dataset (`path` = dataset name, e.g. "coco_captions/2017") through tfds.data_source,
  features named by data.tfds_image_key / data.tfds_caption_key, data dir data.tfds_data_dir.
- shapes: the embedded procedural dataset (shapes.py).
"""

import csv
import glob
import json
import os
import tarfile

import numpy as np

from sdxl_jax.data import decode, shapes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".jfif")
CAPTION_EXTENSIONS = (".txt", ".caption")
_NOT_IMAGES = CAPTION_EXTENSIONS + (".json", ".jsonl", ".csv", ".md", ".npy")


class FolderSource:
    def __init__(self, root, max_pixels):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data.path={root!r} is not a folder (data.source='folder')")
        self.root, self.max_pixels = root, max_pixels
        files, metadata = [], {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if name in ("metadata.jsonl", "metadata.csv"):
                    metadata.update(_read_metadata(full))
                elif not name.startswith(".") and not name.lower().endswith(_NOT_IMAGES):
                    # Every other file is a candidate image; one PIL cannot read is counted as not_an_image.
                    files.append(os.path.relpath(full, root))
        self.files = files
        self.metadata = {os.path.relpath(k, root): v for k, v in metadata.items()}

    def __len__(self):
        return len(self.files)

    def _caption_raw(self, rel):
        if rel in self.metadata:
            return self.metadata[rel].get("text")
        stem = os.path.join(self.root, os.path.splitext(rel)[0])
        for ext in CAPTION_EXTENSIONS:
            if os.path.exists(stem + ext):
                with open(stem + ext, "rb") as f:
                    return f.read()
        return None

    def _extra(self, rel):
        score = self.metadata.get(rel, {}).get("aesthetic_score")
        return {} if score is None else {"aesthetic_score": float(score)}

    def probe(self, i):
        rel = self.files[i]
        decode.caption_text(self._caption_raw(rel))
        return dict(size=decode.probe(os.path.join(self.root, rel), self.max_pixels), **self._extra(rel))

    def load(self, i):
        rel = self.files[i]
        return dict(image=os.path.join(self.root, rel), caption=self._caption_raw(rel), **self._extra(rel))


def _read_metadata(path):
    """metadata.jsonl / .csv -> {absolute image path: {"text": ..., "aesthetic_score": ...}}."""
    base = os.path.dirname(path)
    rows = []
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # the image then has no caption and is counted as missing_caption
    else:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            rows = list(csv.DictReader(f))
    out = {}
    for row in rows:
        if isinstance(row, dict) and row.get("file_name"):
            text = row.get("text", row.get("caption"))
            out[os.path.join(base, row["file_name"])] = dict(
                text=text, aesthetic_score=row.get("aesthetic_score")
            )
    return out


class WebDatasetSource:
    def __init__(self, path, max_pixels):
        if os.path.isdir(path):
            shards = sorted(glob.glob(os.path.join(path, "**", "*.tar"), recursive=True))
        else:
            shards = sorted(glob.glob(path))
        if not shards:
            raise FileNotFoundError(f"no .tar shards at data.path={path!r} (data.source='webdataset')")
        self.shards, self.max_pixels = shards, max_pixels
        # Per example: shard index, (offset, size) of the image and of the caption/json member or None.
        self.index = []
        for s, shard in enumerate(shards):
            groups = {}
            try:
                with tarfile.open(shard) as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        d, base = os.path.split(m.name)
                        key, _, ext = base.partition(".")
                        groups.setdefault(os.path.join(d, key), {})["." + ext.lower()] = (
                            m.offset_data,
                            m.size,
                        )
            except (tarfile.TarError, OSError):
                pass  # a truncated shard keeps the members read so far
            for key in sorted(groups):
                members = groups[key]
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                text = next((("txt", members[e]) for e in CAPTION_EXTENSIONS if e in members), None)
                if text is None and ".json" in members:
                    text = ("json", members[".json"])
                self.index.append((s, image, text))

    def __len__(self):
        return len(self.index)

    def _read(self, shard, span):
        with open(self.shards[shard], "rb") as f:
            f.seek(span[0])
            return f.read(span[1])

    def _caption(self, shard, text):
        if text is None:
            return None, {}
        kind, span = text
        raw = self._read(shard, span)
        if kind == "txt":
            return raw, {}
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, {}
        score = meta.get("aesthetic_score", meta.get("aesthetic"))
        return meta.get("caption", meta.get("text")), (
            {} if score is None else {"aesthetic_score": float(score)}
        )

    def probe(self, i):
        shard, image, text = self.index[i]
        if image is None:
            raise decode.Skip("missing_file", f"no image member in {self.shards[shard]}")
        raw, extra = self._caption(shard, text)
        decode.caption_text(raw)
        return dict(size=decode.probe(self._read(shard, image), self.max_pixels), **extra)

    def load(self, i):
        shard, image, text = self.index[i]
        raw, extra = self._caption(shard, text)
        return dict(image=self._read(shard, image), caption=raw, **extra)


class ArrayRecordSource:
    """Shards from prepare.py: <path>/index.json (shard names), <path>/sizes.npy (N, 2) int32."""

    def __init__(self, path):
        index_file = os.path.join(path, "index.json")
        if not os.path.exists(index_file):
            raise FileNotFoundError(
                f"{index_file} not found: data.source='array_record' reads shards written by "
                "`python -m sdxl_jax.data.prepare --out=DIR ...`"
            )
        with open(index_file) as f:
            index = json.load(f)
        self.paths = [os.path.join(path, s) for s in index["shards"]]
        self.sizes = np.load(os.path.join(path, "sizes.npy"), allow_pickle=False)
        # The encoding cache (data/cache.py): records hold latents and text encodings, sizes.npy buckets.
        self.encoded = index.get("format") == "sdxl_jax/array_record_encoded/v1"
        self._reader = None

    def __len__(self):
        return len(self.sizes)

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}

    def probe(self, i):
        return dict(size=tuple(int(x) for x in self.sizes[i]))

    def load(self, i):
        from sdxl_jax.data import prepare  # the record format lives with its writer

        if self._reader is None:
            import grain

            self._reader = grain.sources.ArrayRecordDataSource(self.paths)
        if self.encoded:
            from sdxl_jax.data import cache

            return cache.decode_record(self._reader[i])
        return prepare.decode_record(self._reader[i])


class TfdsSource:
    def __init__(self, name, split, data_dir, image_key, caption_key, max_pixels):
        self.args = (name, split, data_dir or None, image_key)
        self.image_key, self.caption_key, self.max_pixels = image_key, caption_key, max_pixels
        self._ds = None
        ds = self._source()
        self.fixed_size = None
        try:
            shape = ds.dataset_info.features[image_key].shape
            if shape[0] and shape[1]:
                self.fixed_size = (int(shape[0]), int(shape[1]))
        except (AttributeError, KeyError, TypeError, IndexError):
            pass

    def _source(self):
        if self._ds is None:
            import tensorflow_datasets as tfds

            name, split, data_dir, image_key = self.args
            # Encoded bytes: we decode with our own policies (EXIF, modes, size guard) in the workers.
            self._ds = tfds.data_source(
                name,
                split=split,
                data_dir=data_dir,
                download=False,
                decoders={image_key: tfds.decode.SkipDecoding()},
            )
        return self._ds

    def __getstate__(self):
        return {**self.__dict__, "_ds": None}

    def __len__(self):
        return len(self._source())

    def probe(self, i):
        if self.fixed_size is not None:
            return dict(size=self.fixed_size)
        ex = self._source()[i]
        decode.caption_text(ex.get(self.caption_key))
        return dict(size=decode.probe(_image_bytes(ex[self.image_key]), self.max_pixels))

    def load(self, i):
        ex = self._source()[i]
        return dict(image=_image_bytes(ex[self.image_key]), caption=ex.get(self.caption_key))


def _image_bytes(value):
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
        return value if value.shape[-1] == 3 else np.repeat(value[..., :1], 3, axis=-1)
    return bytes(value)


def from_config(data_config):
    c = data_config
    if c.source == "shapes":
        return shapes.ShapesSource(
            c.shapes_num_examples,
            min_side=c.shapes_min_side,
            max_side=c.shapes_max_side,
            holdout=c.shapes_holdout,
        )
    if not c.path:
        raise ValueError(f"data.source={c.source!r} needs data.path (a folder, shard pattern or TFDS name)")
    if c.source == "folder":
        return FolderSource(c.path, c.max_image_pixels)
    if c.source == "webdataset":
        return WebDatasetSource(c.path, c.max_image_pixels)
    if c.source == "array_record":
        return ArrayRecordSource(c.path)
    if c.source == "tfds":
        return TfdsSource(
            c.path, c.split, c.tfds_data_dir, c.tfds_image_key, c.tfds_caption_key, c.max_image_pixels
        )
    raise ValueError(
        f"unknown data.source={c.source!r}; choose shapes | folder | webdataset | array_record | tfds"
    )
