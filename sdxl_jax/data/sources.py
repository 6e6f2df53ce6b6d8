"""Random-access example sources, chosen by `config.data.source` with `config.data.path`.

Every source is picklable (grain sends it to its worker processes; open files are reopened lazily per
process) and has
    len(source)
    source.probe(i) -> {"size": (h, w), optional "aesthetic_score"}  # cheap: header / index only
    source.load(i)  -> {"image": path | bytes | uint8 (H, W, 3), "caption": str | bytes | None,
                        optional "aesthetic_score"}
Both raise decode.Skip for a bad example. Sources:
- folder: images under `path` (recursive) with same-stem .txt/.caption files, or metadata.jsonl /
  metadata.csv files (columns file_name, relative to the metadata file, and text or caption). Local disk
  only: mount a bucket with gcsfuse and pass the mount path.
- webdataset: tar shards (`path` is a .tar, a folder of them, a glob, or a brace pattern such as
  'gs://BUCKET/data/{00000..09999}.tar'); members grouped by key, one image member plus a .txt/.caption
  member or a .json member with "caption"/"text". Local or gs://.
- array_record: shards written by `python -m sdxl_jax.data.prepare` (see prepare.py for the format);
  local or gs:// (prepare itself writes to a local disk; copy the folder to the bucket).
- tfds: any TFDS dataset (`path` = dataset name, e.g. "coco_captions/2017") through tfds.data_source,
  features named by data.tfds_image_key / data.tfds_caption_key, data dir data.tfds_data_dir.
- shapes: the embedded procedural dataset (shapes.py).
Paths containing "://" (gs://BUCKET/...) are read through etils.epath (fsspec / gcsfs on a pod).
"""

import csv
import glob
import json
import os
import posixpath
import re
import tarfile

import numpy as np
from etils import epath

from sdxl_jax import paths
from sdxl_jax.data import decode, shapes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".jfif")
CAPTION_EXTENSIONS = (".txt", ".caption")
_NOT_IMAGES = CAPTION_EXTENSIONS + (".json", ".jsonl", ".csv", ".md", ".npy")
_GLOB_CHARS = re.compile(r"[*?[]")
_RANGE = re.compile(r"(\d+)\.\.(\d+)(?:\.\.(\d+))?")


def _open(path):
    return epath.Path(path).open("rb") if paths.is_remote(path) else open(path, "rb")


def expand_braces(pattern):
    """webdataset's shard patterns (the braceexpand convention): 'a-{000..002}.tar' -> ['a-000.tar',
    'a-001.tar', 'a-002.tar']. Groups are numeric ranges {FIRST..LAST} or {FIRST..LAST..STEP}, zero-padded
    to the width of the bounds when a bound has a leading zero, and comma lists {a,b,c} (which may nest);
    several groups give their cartesian product, the leftmost varying slowest. A group with neither a
    comma nor '..' stays literal, as in bash."""
    depth = 0
    for i, ch in enumerate(pattern):
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            raise ValueError(f"unbalanced '}}' at character {i} of the shard pattern {pattern!r}")
    if depth:
        raise ValueError(f"{depth} unclosed '{{' in the shard pattern {pattern!r}")
    return _expand(pattern, pattern)


def _expand(text, pattern):
    """expand_braces of `text`, a balanced part of `pattern` (named in errors)."""
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                heads = [text[:start] + a for a in _alternatives(text[start + 1 : i], pattern)]
                tails = _expand(text[i + 1 :], pattern)
                return [h + t for h in heads for t in tails]
    return [text]


def _alternatives(body, pattern):
    """The expansions of one brace group's inside `body`."""
    parts, depth, begin = [], 0, 0
    for i, ch in enumerate(body):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(body[begin:i])
            begin = i + 1
    if parts:
        return [x for part in parts + [body[begin:]] for x in _expand(part, pattern)]
    if ".." not in body:
        return ["{" + x + "}" for x in _expand(body, pattern)]
    match = _RANGE.fullmatch(body)
    if match is None or int(match.group(3) or 1) == 0:
        raise ValueError(
            f"malformed range {{{body}}} in the shard pattern {pattern!r}: a range is {{FIRST..LAST}} or "
            "{FIRST..LAST..STEP} of non-negative integers, e.g. {00000..09999} (padded to the bounds' width)"
        )
    first, last, step = match.group(1), match.group(2), int(match.group(3) or 1)
    padded = any(len(b) > 1 and b.startswith("0") for b in (first, last))
    width = max(len(first), len(last)) if padded else 0
    lo, hi = int(first), int(last)
    values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
    return [str(v).zfill(width) for v in values]


class FolderSource:
    def __init__(self, root, max_pixels):
        if paths.is_remote(root):
            raise ValueError(
                f"data.path={root!r}: data.source='folder' reads a local disk only. Mount the bucket with "
                "gcsfuse (e.g. `gcsfuse --implicit-dirs BUCKET /gcs/BUCKET`) and pass the mount path "
                "(data.path=/gcs/BUCKET/...), or write array_record shards with `python -m "
                "sdxl_jax.data.prepare` (data.source='array_record' reads them from gs://), or use tar "
                "shards (data.source='webdataset')"
            )
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
    """Tar shards indexed at start-up: each example is the (offset, size) of its members in its shard.

    `path` is a .tar file, a folder of them, a glob ('/data/*.tar') or a brace pattern
    ('gs://BUCKET/data/{00000..09999}.tar', see expand_braces) whose pieces are any of those. A local folder
    is searched recursively; a gs:// folder gives its top-level *.tar only (epath refuses a recursive '**'
    on gs://: one listing request per pseudo-folder). Every shard named outright (not by a glob) must exist.

    Indexing reads every shard's tar headers (512 bytes before each member), which on a bucket means reading
    most of each shard once per host at start-up, and every member read opens its shard again. For large
    datasets write array_record shards once with `python -m sdxl_jax.data.prepare` (index in sizes.npy,
    no pass over the data at start-up) and train with data.source='array_record'.
    """

    def __init__(self, path, max_pixels):
        path = str(path)
        shards, missing = _find_shards(path)
        if not shards:
            named = ""
            if missing:
                named = f"; the {len(missing)} shards it names do not exist, e.g. {missing[0]!r}"
            raise FileNotFoundError(
                f"no .tar shards at data.path={path!r} (data.source='webdataset'){named}. data.path takes "
                "a .tar file, a folder of them (searched recursively on a local disk, top level only on "
                "gs://), a glob ('/data/*.tar') or a brace pattern ('gs://BUCKET/data/{00000..09999}.tar', "
                "'/data/{a,b}/*.tar')"
            )
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shards named by data.path={path!r} do not exist, e.g. {missing[0]!r} "
                "(data.source='webdataset'): correct the pattern's range, or match the shards that exist "
                "with a glob such as 'gs://BUCKET/data/*.tar'"
            )
        self.shards, self.max_pixels = shards, max_pixels
        # Per example: shard index, (offset, size) of the image and of the caption/json member or None.
        self.index = []
        for s, shard in enumerate(shards):
            groups = {}
            try:
                with _open(shard) as f:
                    if _is_compressed(f.read(10)):
                        raise ValueError(
                            f"{shard} is a compressed tar: its members cannot be read at random. "
                            "Decompress the shards (e.g. gunzip: a .tar.gz becomes a .tar) and point "
                            "data.path at the .tar files"
                        )
                    f.seek(0)
                    with tarfile.open(fileobj=f, mode="r:") as tar:
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
        path = self.shards[shard]
        if paths.is_remote(path):  # one ranged request (a file object would fetch a whole read-ahead block)
            import fsspec

            fs, name = fsspec.core.url_to_fs(path)
            return fs.cat_file(name, start=span[0], end=span[0] + span[1])
        with open(path, "rb") as f:
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


def _is_compressed(head):
    """gzip, bzip2, xz or zstd magic at the start of a file (an uncompressed tar starts with a name)."""
    bzip2 = head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY"
    return bzip2 or head.startswith((b"\x1f\x8b", b"\xfd7zXZ\x00", b"(\xb5/\xfd"))


def _find_shards(path):
    """(sorted shard paths, [named shards that do not exist]) of a webdataset `path`."""
    remote = paths.is_remote(path)
    shards, missing, listings = set(), [], {}
    for piece in expand_braces(path):
        if _GLOB_CHARS.search(piece):
            shards.update(_remote_glob(piece) if remote else glob.glob(piece))
        elif not remote and os.path.isdir(piece):
            shards.update(glob.glob(os.path.join(piece, "**", "*.tar"), recursive=True))
        elif remote and not piece.endswith(".tar") and epath.Path(piece).is_dir():
            shards.update(str(p) for p in epath.Path(piece).glob("*.tar"))
        else:
            # One listing per folder, not a request per name: '{00000..09999}.tar' is one paged listing.
            parent, name = (posixpath if remote else os.path).split(piece)
            if parent not in listings:
                listings[parent] = _names_in(parent, remote)
            if name in listings[parent]:
                shards.add(piece)
            else:
                missing.append(piece)
    return sorted(shards), missing


def _names_in(folder, remote):
    try:
        if remote:
            return {p.name for p in epath.Path(folder).iterdir()}
        return set(os.listdir(folder or "."))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _remote_glob(pattern):
    """epath globs from a folder: split 'gs://b/data/*.tar' into 'gs://b/data' and '*.tar'."""
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
    if first == 0:
        raise ValueError(f"{pattern!r}: a glob in the bucket name is not supported; name the bucket")
    base = epath.Path(f"{scheme}://" + "/".join(parts[:first]))
    return [str(p) for p in base.glob("/".join(parts[first:]))]


class ArrayRecordSource:
    """Shards from prepare.py: <path>/index.json (shard names), <path>/sizes.npy (N, 2) int32; `path` is
    a local folder or a copy of one in a bucket (gs://BUCKET/...)."""

    def __init__(self, path):
        path = str(path)
        index_file = os.path.join(path, "index.json")
        if not epath.Path(index_file).exists():
            raise FileNotFoundError(
                f"{index_file} not found: data.source='array_record' reads shards written by "
                "`python -m sdxl_jax.data.prepare --out=DIR ...`"
            )
        with _open(index_file) as f:
            index = json.load(f)
        self.paths = [os.path.join(path, s) for s in index["shards"]]
        with _open(os.path.join(path, "sizes.npy")) as f:
            self.sizes = np.load(f, allow_pickle=False)
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
