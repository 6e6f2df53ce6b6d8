"""Random-access example sources, chosen by `config.data.source` with `config.data.path`.

Every source is picklable (grain sends it to its worker processes; open files are reopened lazily per
process) and has
    len(source)
    source.probe(i) -> {"size": (h, w), optional "aesthetic_score"}  # cheap: header / index only
    source.load(i)  -> {"image": path | bytes | uint8 (H, W, 3), "caption": str | bytes | None,
                        optional "aesthetic_score"}
    source.index_key() -> str | None  # changes whenever the examples or their probes could change;
                                      # None where probing is already cheap (nothing to cache)
    optional source.probe_groups() -> (names, counts)  # examples in order, in named groups (webdataset:
                                      # shards) whose cached probes are kept per group
Both raise decode.Skip for a bad example. With an index_cache.IndexCache, the probe results (and the
webdataset tar index) are kept in the training workdir's data_index/ across hosts and restarts. Sources:
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
import functools
import glob
import hashlib
import json
import math
import os
import posixpath
import re
import tarfile
from concurrent import futures

import numpy as np
from etils import epath

from sdxl_jax import paths
from sdxl_jax.data import decode, shapes, threads

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
    """Images under `root` with their captions (see the module docstring), listed once at start-up.

    With an index_cache.IndexCache the probes are kept per image (probe_groups), so an added, rewritten
    or re-captioned image is probed alone, where every image is a request or more on a gcsfuse mount.
    """

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
        files, metadata, captions = [], {}, set()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if name in ("metadata.jsonl", "metadata.csv"):
                    metadata.update(_read_metadata(full))
                elif not name.startswith(".") and not name.lower().endswith(_NOT_IMAGES):
                    # Every other file is a candidate image; one PIL cannot read is counted as not_an_image.
                    files.append(os.path.relpath(full, root))
                if name.endswith(CAPTION_EXTENSIONS):
                    captions.add(os.path.relpath(full, root))
        self.files = files
        self.metadata = {os.path.relpath(k, root): v for k, v in metadata.items()}
        # The caption files _caption_raw may read per image without a metadata row, in its order of
        # preference: what probe_groups stamps, known from the listing without a request per name.
        self.sidecars = {}
        for rel in files:
            stem = os.path.splitext(rel)[0]
            found = tuple(stem + ext for ext in CAPTION_EXTENSIONS if stem + ext in captions)
            if found and rel not in self.metadata:
                self.sidecars[rel] = found

    def __len__(self):
        return len(self.files)

    def __getstate__(self):  # grain's workers only load: the sidecar table serves probe_groups at start-up
        return {**self.__dict__, "sidecars": None}

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
        return _aesthetic(self.metadata.get(rel, {}).get("aesthetic_score"))

    def probe(self, i):
        rel = self.files[i]
        decode.caption_text(self._caption_raw(rel))
        return dict(size=decode.probe(os.path.join(self.root, rel), self.max_pixels), **self._extra(rel))

    def load(self, i):
        rel = self.files[i]
        return dict(image=os.path.join(self.root, rel), caption=self._caption_raw(rel), **self._extra(rel))

    def index_key(self):
        """What every image's probe depends on (max_pixels); each image's own part is in probe_groups."""
        return json.dumps(dict(source="folder", max_pixels=self.max_pixels))

    def probe_groups(self):
        """(names, counts): one group per image in self.files order, so that cached probes are kept per
        image. A name holds what the image's probe depends on: its relative path, byte size and mtime,
        and its caption's source: for a metadata row, decode.caption_text's verdict on its text (all that
        the probe takes from it, so rewriting captions re-probes only those that become valid or invalid);
        else the path, byte size and mtime of the sidecar _caption_raw reads; else none. One stat per
        image and per sidecar (the listing at start-up gave the sidecars), 16 at a time for a gcsfuse mount.
        """
        stat = list(dict.fromkeys(self.files + [s for found in self.sidecars.values() for s in found]))
        stamps = dict(zip(stat, _stamps(self.root, stat), strict=True))
        names = []
        for rel in self.files:
            if rel in self.metadata:
                caption = ["metadata", _caption_verdict(self.metadata[rel].get("text"))]
            else:  # the first one that still exists, as _caption_raw takes
                caption = next(([s, *stamps[s]] for s in self.sidecars.get(rel, ()) if stamps[s]), None)
            names.append(json.dumps([rel, stamps[rel], caption]))
        return names, np.ones(len(names), np.int64)


def _stamps(root, rels, num_threads=16):
    """[byte size, mtime in ns] of each root/rel, or None where it cannot be stat'ed; in rels order."""

    def stat(rel):
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            return None
        return [int(st.st_size), int(st.st_mtime_ns)]

    return list(threads.ordered_map(stat, rels, num_threads if len(rels) > 256 else 1))


def _caption_verdict(raw):
    """The skip reason that decode.caption_text gives the caption `raw`, or "ok"."""
    try:
        decode.caption_text(raw)
    except decode.Skip as e:
        return e.reason
    return "ok"


def _aesthetic(score):
    """{"aesthetic_score": float} for a finite number (or numeric text), else {}: a missing, empty or
    malformed score ("n/a", a list) gives the example data.aesthetic_score, as a missing one does, rather
    than stopping the run."""
    try:
        value = float(score)
    except (TypeError, ValueError):
        return {}
    return {"aesthetic_score": value} if math.isfinite(value) else {}


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

    Indexing reads every shard's tar headers (512 bytes before each member; on a bucket most of each
    shard), 16 shards at a time, and every member read is one ranged request. With an
    index_cache.IndexCache (`cache`) the hosts split that work once and later starts read the result
    (per shard, keyed by its path, byte size and GCS generation or local mtime, so a new or rewritten
    shard is indexed and probed alone: probe_groups). For very large datasets array_record shards (`python -m
    sdxl_jax.data.prepare`, index in sizes.npy) avoid the pass over the data altogether.
    """

    def __init__(self, path, max_pixels, cache=None):
        path = str(path)
        found, missing = _find_shards(path)
        if not found:
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
        self.shards, self.max_pixels = sorted(found), max_pixels
        self.stamps = [found[s] for s in self.shards]  # (byte size, version): what the cache is keyed by
        compute = functools.partial(_index_shards, self.shards)
        if cache is None:
            counts, spans, _ = compute(np.arange(len(self.shards)))
        else:
            names = [f"{s}\t{size}\t{v}" for s, (size, v) in zip(self.shards, self.stamps, strict=True)]
            counts, spans = cache.table("tars", "webdataset tar index/v1", len(self.shards), compute,
                                        width=len(_SPAN_COLUMNS), dtype=np.int64, names=names,
                                        valid=_valid_spans, unit="shards", verb="indexed")  # fmt: skip
        # Per example (numpy, as grain pickles the source to every worker): shard, then _SPAN_COLUMNS.
        shard = np.repeat(np.arange(len(self.shards), dtype=np.int64), counts)
        self.index = np.concatenate([shard[:, None], spans], axis=1)

    def __len__(self):
        return len(self.index)

    def index_key(self):
        """What every shard's probes depend on (max_pixels); each shard's own part is in probe_groups."""
        return json.dumps(dict(source="webdataset", max_pixels=self.max_pixels))

    def probe_groups(self):
        """(names, counts): the examples in shard order, grouped per shard, so that cached probes are kept
        per shard (an added or rewritten shard is probed alone). A name changes with the shard's path,
        byte size, GCS generation or local mtime, and its part of the tar index (a shard read only in
        part through a network error lists fewer examples)."""
        counts = np.bincount(self.index[:, 0], minlength=len(self.shards)).astype(np.int64)
        ends = np.cumsum(counts)
        names = []
        for s, (size, version), end, count in zip(self.shards, self.stamps, ends, counts, strict=True):
            spans = np.ascontiguousarray(self.index[end - count : end, 1:], np.int64)
            names.append(f"{s}\t{size}\t{version}\t{hashlib.sha256(spans.tobytes()).hexdigest()[:16]}")
        return names, counts

    def _read(self, shard, span):
        path = self.shards[shard]
        if paths.is_remote(path):  # one ranged request (a file object would fetch a whole read-ahead block)
            import fsspec

            fs, name = fsspec.core.url_to_fs(path)
            return fs.cat_file(name, start=span[0], end=span[0] + span[1])
        with open(path, "rb") as f:
            f.seek(span[0])
            return f.read(span[1])

    def _caption(self, shard, kind, span):
        if kind == _NO_TEXT:
            return None, {}
        raw = self._read(shard, span)
        if kind == _TXT:
            return raw, {}
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, {}
        if not isinstance(meta, dict):  # e.g. a list: no caption, counted as missing_caption
            return None, {}
        score = meta.get("aesthetic_score", meta.get("aesthetic"))
        return meta.get("caption", meta.get("text")), _aesthetic(score)

    def _example(self, i):
        shard, image_offset, image_size, kind, text_offset, text_size = (int(x) for x in self.index[i])
        return shard, (image_offset, image_size), kind, (text_offset, text_size)

    def probe(self, i):
        shard, image, kind, text = self._example(i)
        if image[0] < 0:
            raise decode.Skip("missing_file", f"no image member in {self.shards[shard]}")
        raw, extra = self._caption(shard, kind, text)
        decode.caption_text(raw)
        return dict(size=decode.probe(self._read(shard, image), self.max_pixels), **extra)

    def load(self, i):
        shard, image, kind, text = self._example(i)
        raw, extra = self._caption(shard, kind, text)
        return dict(image=self._read(shard, image), caption=raw, **extra)


# The columns of a shard's tar index, one row per example in key order; an example without an image has
# image offset -1, one without a caption kind _NO_TEXT.
_SPAN_COLUMNS = ("image_offset", "image_size", "text_kind", "text_offset", "text_size")
_NO_TEXT, _TXT, _JSON = 0, 1, 2


def _index_shard(shard):
    """(spans (examples, 5) int64, complete): the member spans of one shard's examples. complete is False
    when reading stopped at an OSError (perhaps a passing network error: such a result is not cached)."""
    groups, complete = {}, True
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
                    groups.setdefault(os.path.join(d, key), {})["." + ext.lower()] = (m.offset_data, m.size)
    except tarfile.TarError:
        pass  # a truncated shard keeps the members read so far
    except OSError:
        complete = False  # as above, but not kept in the index cache
    spans = np.zeros((len(groups), len(_SPAN_COLUMNS)), np.int64)
    for row, key in enumerate(sorted(groups)):
        members = groups[key]
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), (-1, 0))
        text = next(((_TXT, members[e]) for e in CAPTION_EXTENSIONS if e in members), None)
        kind, text = text or (_NO_TEXT, (0, 0))
        if kind == _NO_TEXT and ".json" in members:
            kind, text = _JSON, members[".json"]
        spans[row] = (*image, kind, *text)
    return spans, complete


def _index_shards(shards, indices, num_threads=16):
    """(examples per shard, their spans, complete per shard) of shards[indices]; I/O bound on a bucket."""
    indices = [int(i) for i in indices]
    with futures.ThreadPoolExecutor(max(1, min(num_threads, len(indices)))) as ex:
        results = list(ex.map(lambda i: _index_shard(shards[i]), indices))
    counts = np.array([len(spans) for spans, _ in results], np.int64)
    spans = [s for s, _ in results] or [np.zeros((0, len(_SPAN_COLUMNS)), np.int64)]
    return counts, np.concatenate(spans), np.array([complete for _, complete in results], bool)


def _valid_spans(counts, spans):
    """A cached tar index's values are possible ones (offsets and sizes, caption kinds)."""
    image_offset, image_size, kind, text_offset, text_size = spans.T
    return bool(
        (image_offset >= -1).all() and (image_size >= 0).all() and (text_offset >= 0).all()
        and (text_size >= 0).all() and np.isin(kind, (_NO_TEXT, _TXT, _JSON)).all()
    )  # fmt: skip


def _is_compressed(head):
    """gzip, bzip2, xz or zstd magic at the start of a file (an uncompressed tar starts with a name)."""
    bzip2 = head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY"
    return bzip2 or head.startswith((b"\x1f\x8b", b"\xfd7zXZ\x00", b"(\xb5/\xfd"))


def _find_shards(path):
    """({shard path: (byte size, version)}, [named shards that do not exist]) of a webdataset `path`.

    The version is the object's generation on GCS (when the listing gives it), the mtime in ns on a local
    disk: a shard rewritten at the same size (tar pads to 10 KiB records) still changes its stamp. Remote
    stamps come from the listings that find the shards, not from a request per shard."""
    remote = paths.is_remote(path)
    shards, missing, listings = {}, [], {}
    for piece in expand_braces(path):
        if _GLOB_CHARS.search(piece):
            shards.update(_remote_glob(piece) if remote else _local_stamps(glob.glob(piece)))
        elif not remote and os.path.isdir(piece):
            shards.update(_local_stamps(glob.glob(os.path.join(piece, "**", "*.tar"), recursive=True)))
        elif remote and not piece.endswith(".tar") and epath.Path(piece).is_dir():
            base = piece.rstrip("/")
            listing = _names_in(base, remote)
            shards.update({f"{base}/{n}": stamp for n, stamp in listing.items() if n.endswith(".tar")})
        else:
            # One listing per folder, not a request per name: '{00000..09999}.tar' is one paged listing.
            parent, name = (posixpath if remote else os.path).split(piece)
            if parent not in listings:
                listings[parent] = _names_in(parent, remote)
            if name in listings[parent]:
                shards[piece] = listings[parent][name] or _local_stamps([piece])[piece]
            else:
                missing.append(piece)
    return shards, missing


def _local_stamps(files):
    out = {}
    for f in files:
        st = os.stat(f)
        out[f] = (int(st.st_size), str(st.st_mtime_ns))
    return out


def _remote_stamp(info):
    return int(info.get("size") or 0), str(info.get("generation") or "")


def _names_in(folder, remote):
    """{name: stamp} of a remote folder's objects; {name: None} of a local folder's entries."""
    try:
        if remote:
            import fsspec

            fs, name = fsspec.core.url_to_fs(folder)
            return {
                posixpath.basename(info["name"].rstrip("/")): _remote_stamp(info)
                for info in fs.ls(name, detail=True)
                if info.get("type") == "file"
            }
        return dict.fromkeys(os.listdir(folder or "."))
    except (FileNotFoundError, NotADirectoryError):
        return {}


def _remote_glob(pattern):
    """{shard: stamp} of a remote glob, from one fsspec glob (a listing) from its first literal folder."""
    import fsspec

    scheme, rest = pattern.split("://", 1)
    if _GLOB_CHARS.search(rest.split("/")[0]):
        raise ValueError(f"{pattern!r}: a glob in the bucket name is not supported; name the bucket")
    fs, name = fsspec.core.url_to_fs(pattern)
    matches = fs.glob(name, detail=True)
    return {f"{scheme}://{k}": _remote_stamp(v) for k, v in matches.items() if v.get("type") != "directory"}


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

    def index_key(self):
        return None  # probes read sizes.npy, loaded once: nothing to cache

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

    def index_key(self):
        """The dataset (name, resolved version, split, data dir, features read), its length and max_pixels;
        None when the image feature has a fixed shape (probes then read no example)."""
        if self.fixed_size is not None:
            return None
        name, split, data_dir, image_key = self.args
        info = getattr(self._source(), "dataset_info", None)
        version = str(getattr(info, "version", ""))
        return json.dumps(dict(source="tfds", name=name, version=version, split=split, data_dir=data_dir,
                               image_key=image_key, caption_key=self.caption_key, len=len(self),
                               max_pixels=self.max_pixels))  # fmt: skip

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


def from_config(data_config, cache=None):
    """The source of `data_config`; `cache` (index_cache.IndexCache) keeps a webdataset's tar index."""
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
        return WebDatasetSource(c.path, c.max_image_pixels, cache=cache)
    if c.source == "array_record":
        return ArrayRecordSource(c.path)
    if c.source == "tfds":
        return TfdsSource(
            c.path, c.split, c.tfds_data_dir, c.tfds_image_key, c.tfds_caption_key, c.max_image_pixels
        )
    raise ValueError(
        f"unknown data.source={c.source!r}; choose shapes | folder | webdataset | array_record | tfds"
    )
