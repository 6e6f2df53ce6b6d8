"""The dataset index cache: what start-up learns about the data, kept in a folder shared by the hosts.

Indexing a dataset reads every shard's tar headers (webdataset) and every example's image header
(webdataset, folder, tfds without a fixed image shape). On a bucket that is two ranged requests per
example, and without this cache every host of a pod paid it again at every start and preemption
restart. With `make_train_iterator(..., index_dir=...)` (train_lib passes `<workdir>/data_index`,
local or gs://) each phase's results are stored once and read back afterwards:

    tars.npz      webdataset: per shard, its examples' member offsets (items named "path<TAB>size<TAB>
                  version", so an added or rewritten shard re-indexes that shard alone)
    probes.npz    every example's raw probe outcome (h, w, decode.SKIP_REASONS code or -1), for the
                  data that `source.index_key()` describes; in items named by `source.probe_groups()`
                  where the source has it: per shard for webdataset, per image for a folder (named by
                  its path, size, mtime and caption source), so an added or rewritten shard or image
                  is probed alone; one item per example otherwise (tfds); the trainer's size rules
                  (min_image_side, max_aspect_ratio) are applied after loading, so changing them keeps
                  the cache
    <phase>.<tag>.part-<p>-of-<P>.npz   process p's share of a phase (tag: a digest of the data)

Every file is an .npz of plain arrays (no pickle): "meta" (JSON: format, phase, digest of the key),
"items" (positions) or "names" (JSON list), "counts" (rows per item), "rows".

One phase, run by every process whatever it finds on disk (so that barriers pair up on a pod):
1. read the combined file; the items it lacks are missing (all of them when it is absent, unreadable or
   written for other data: a warning says which);
2. compute share p of P of the missing items (a contiguous range) and write it as a part file;
3. sync(name): exactly once per phase, on every process;
4. take the remaining items from the other processes' part files, and compute whatever none of them
   holds (a workdir on a local disk that the other hosts cannot see), so the result never depends on a
   shared file system;
5. process 0 writes the combined file when it was not complete, so the next start reads one object
   (so does a process that had to compute items in step 4: its folder is probably not shared).
Files are written whole: a temp name then os.replace on a local disk; a GCS object appears at close.
"""

import hashlib
import io
import json
import os
import time
import uuid
import warnings

import numpy as np

from sdxl_jax import paths

FORMAT = "sdxl_jax/data_index/v1"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class IndexCache:
    """Cached, host-split phases of dataset indexing in `directory` (see the module docstring).

    process_index / process_count split the work (jax.process_index() / process_count(): not the batch
    block, which several hosts may share). sync(name) is a barrier across those processes, or None when
    there is one process (or none is available: correct, only slower, since each process then computes
    what it cannot read).
    """

    def __init__(self, directory, process_index=0, process_count=1, sync=None, log=None):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
        self.directory = paths.as_path(directory)
        self.p, self.num, self.sync, self.log = int(process_index), int(process_count), sync, log or _print

    def table(self, phase, key, n, compute, *, width, dtype, names=None, counts=None, valid=None,
              unit="examples", verb="probed"):  # fmt: skip
        """(counts (n,), rows (counts.sum(), width)): item i's rows, in item order.

        compute(indices) -> (counts, rows, cacheable or None) for the ascending int64 `indices`; items
        marked not cacheable (e.g. a shard read through a network error) are used but never written.
        key: the data the results belong to; files for another key are not used. names: n strings that
        identify items across keys (then files are matched item by item, so the combined file of an
        earlier dataset still gives the items the two share). counts: each item's number of rows when
        it is known beforehand (a file's item with another count is damaged). valid(counts, rows) ->
        bool checks a file's content beyond its shapes.
        """
        t0 = time.time()
        tag = digest(json.dumps([phase, key, names]))[:16]
        spec = dict(phase=phase, key=digest(key), n=n, width=width, dtype=np.dtype(dtype), names=names,
                    counts=None if counts is None else np.asarray(counts, np.int64), valid=valid)  # fmt: skip
        combined = self.directory / f"{phase}.npz"
        part = lambda q: self.directory / f"{phase}.{tag}.part-{q:05d}-of-{self.num:05d}.npz"
        found = _Found(n, width, dtype)
        got = dict(combined=found.add(*self._read(combined, spec)), own=0, parts=0, after=0)
        if got["combined"] < n:
            if self.num > 1:  # this host's share from a start that was interrupted before step 5
                got["parts"] += found.add(*self._read(part(self.p), spec))
            missing = found.missing()
            share = missing[len(missing) * self.p // self.num : len(missing) * (self.p + 1) // self.num]
            if len(share):
                try:
                    result = compute(share)
                except Exception as e:  # retried after the barrier, where a lasting error is raised
                    warnings.warn(
                        f"data index ({phase}): this host's share failed ({e!r}); retrying", stacklevel=2
                    )
                else:
                    got["own"] = found.add(share, *result)
                    if self.num > 1:  # alone, the combined file follows at once
                        self._write(part(self.p), spec, *_cacheable(share, *result))
        if self.sync is not None:
            self.sync(f"data_index:{phase}")  # every process, once per phase, whatever it found
        if got["combined"] == n:
            self.log(f"data index ({phase}): {n} {unit} read from {combined} in {time.time() - t0:.1f} s")
            return found.assemble()
        for q in range(self.num):
            if q != self.p and not found.complete():
                got["parts"] += found.add(*self._read(part(q), spec))
        rest = found.missing()
        if len(rest):
            got["after"] = found.add(rest, *compute(rest))
        counts, rows = found.assemble()
        # Process 0 writes for everyone; a process that could not read the others' parts writes too, as
        # its folder is probably its own (in a shared one it writes the same content as process 0).
        wrote = self.p == 0 or got["after"] > 0
        if wrote:
            keep = np.flatnonzero(found.stored)
            self._write(combined, spec, keep, counts[keep], rows[np.repeat(found.stored, counts)])
        if self.p == 0:
            self._remove_stale_parts(phase, tag)
        said = [f"data index ({phase}): {verb} {got['own'] + got['after']} of {n} {unit} on this host "
                f"(process {self.p} of {self.num}) in {time.time() - t0:.1f} s"]  # fmt: skip
        if got["after"] and self.num > 1:
            said.append(f"{got['after']} of them after the barrier, as no part file held them")
        if got["parts"]:
            said.append(f"{got['parts']} read from part files")
        if got["combined"]:
            said.append(f"{got['combined']} from {combined}")
        if wrote:
            said.append(f"wrote {combined}")
        self.log("; ".join(said))
        return counts, rows

    def _remove_stale_parts(self, phase, tag):
        """Part files of earlier data (another tag): no process reads them any more. This data's parts
        stay, as the other processes may still be reading them."""
        try:
            for path in self.directory.glob(f"{phase}.*.part-*.npz"):
                if not path.name.startswith(f"{phase}.{tag}."):
                    path.unlink(missing_ok=True)
        except Exception as e:  # only space is at stake
            _warn(f"cannot remove old part files from {self.directory} ({e!r})")

    def _read(self, path, spec):
        """(positions, counts, rows) of a valid file for `spec`; empty ones (with a warning if the file
        exists but is damaged or for other data) otherwise."""
        width, dtype = spec["width"], spec["dtype"]
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, width), dtype))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return empty
        except Exception as e:  # a bucket or disk error: the cache only ever saves time
            _warn(f"cannot read {path} ({e!r}); computing its content instead")
            return empty
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                meta = json.loads(bytes(f["meta"]).decode())
                counts, rows = f["counts"], f["rows"]
                if spec["names"] is None:
                    items, names = f["items"], None
                else:
                    names = json.loads(bytes(f["names"]).decode())
                    items = np.zeros(len(names), np.int64)
        except Exception as e:  # truncated, not an npz, arrays missing: whatever a damaged file gives
            _warn(f"{path} is unreadable ({e!r}); ignoring it and indexing again")
            return empty
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("phase") != spec["phase"]:
            _warn(f"{path} is not a {spec['phase']} file of {FORMAT}; ignoring it and indexing again")
            return empty
        if meta.get("key") != spec["key"]:
            _warn(f"{path} was written for other data (the dataset changed, or a setting its index "
                  "depends on such as data.max_image_pixels); indexing again")  # fmt: skip
            return empty
        problem = _check(items, counts, rows, spec)
        if problem:
            _warn(f"{path} is damaged ({problem}); ignoring it and indexing again")
            return empty
        counts = counts.astype(np.int64)
        if names is None:
            position, keep = items.astype(np.int64), np.ones(len(items), bool)
        else:
            where = {name: i for i, name in enumerate(spec["names"])}  # other shards' items are dropped
            position = np.array([where.get(k, -1) if isinstance(k, str) else -1 for k in names], np.int64)
            keep = position >= 0
            keep[keep] = _first_occurrences(position[keep])
        if spec["counts"] is not None and (counts[keep] != spec["counts"][position[keep]]).any():
            _warn(f"{path} is damaged (row count differs from the data's for an item); ignoring it and "
                  "indexing again")  # fmt: skip
            return empty
        return position[keep], counts[keep], rows[np.repeat(keep, counts)]

    def _write(self, path, spec, items, counts, rows):
        if not len(items):
            return
        meta = dict(format=FORMAT, phase=spec["phase"], key=spec["key"], process=self.p, processes=self.num)
        arrays = dict(meta=_json_bytes(meta), counts=np.asarray(counts, np.int64), rows=rows)
        if spec["names"] is None:
            arrays["items"] = np.asarray(items, np.int64)
        else:
            arrays["names"] = _json_bytes([spec["names"][i] for i in items])
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if paths.is_remote(path):  # a GCS object appears whole when its upload closes
                path.write_bytes(buf.getvalue())
            else:
                tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
                tmp.write_bytes(buf.getvalue())
                os.replace(tmp, path)
        except Exception as e:  # a read-only or full workdir costs only the next start's time
            _warn(f"cannot write {path} ({e!r}); the next start indexes again")


def _print(line):
    print(line, flush=True)


def _warn(message):
    warnings.warn(f"data index: {message}", stacklevel=3)


def _json_bytes(value):
    return np.frombuffer(json.dumps(value).encode(), np.uint8)


def _check(items, counts, rows, spec):
    """What is wrong with a file's arrays for `spec`, or None."""
    m = len(items)
    if items.ndim != 1 or counts.shape != (m,) or counts.dtype.kind not in "iu" or (counts < 0).any():
        return "inconsistent item counts"
    if rows.dtype != spec["dtype"] or rows.shape != (int(counts.sum()), spec["width"]):
        want = (int(counts.sum()), spec["width"])
        return f"rows of {rows.dtype} {rows.shape}, not {spec['dtype']} {want}"
    if spec["names"] is None:
        if items.dtype.kind not in "iu" or (m and (items.min() < 0 or items.max() >= spec["n"])):
            return "item positions out of range"
        if len(np.unique(items)) != m:
            return "repeated items"
    if spec["valid"] is not None and not spec["valid"](counts, rows):
        return "values out of range"
    return None


def _first_occurrences(values):
    first = np.zeros(len(values), bool)
    first[np.unique(values, return_index=True)[1]] = True
    return first


def _cacheable(indices, counts, rows, cacheable=None):
    """(items, counts, rows): the part of compute's result that may be written."""
    if cacheable is None:
        return indices, counts, rows
    cacheable = np.asarray(cacheable, bool)
    return indices[cacheable], np.asarray(counts)[cacheable], rows[np.repeat(cacheable, counts)]


class _Found:
    """Items found so far (the first to give an item wins), assembled in item order at the end."""

    def __init__(self, n, width, dtype):
        self.have = np.zeros(n, bool)
        self.stored = np.zeros(n, bool)  # may be written to the combined file (not a network-error result)
        self.chunks = []
        self.width, self.dtype = width, dtype

    def add(self, positions, counts, rows, cacheable=None):
        """Adds the items not found yet; returns how many."""
        positions, counts = np.asarray(positions, np.int64), np.asarray(counts, np.int64)
        rows = np.asarray(rows, self.dtype).reshape(-1, self.width)
        cacheable = np.ones(len(positions), bool) if cacheable is None else np.asarray(cacheable, bool)
        new = ~self.have[positions]
        if not new.all():
            positions, counts, rows = positions[new], counts[new], rows[np.repeat(new, counts)]
            cacheable = cacheable[new]
        self.have[positions] = True
        self.stored[positions] = cacheable
        self.chunks.append((positions, counts, rows))
        return len(positions)

    def complete(self):
        return bool(self.have.all())

    def missing(self):
        return np.flatnonzero(~self.have)

    def assemble(self):
        """(counts (n,), rows) in item order."""
        assert self.complete()
        if not self.chunks:
            return np.zeros(0, np.int64), np.zeros((0, self.width), self.dtype)
        pos = np.concatenate([c[0] for c in self.chunks])
        counts = np.concatenate([c[1] for c in self.chunks])
        rows = np.concatenate([c[2] for c in self.chunks])
        order = np.argsort(pos, kind="stable")
        c, start = counts[order], (np.cumsum(counts) - counts)[order]
        take = np.repeat(start - (np.cumsum(c) - c), c) + np.arange(int(c.sum()))
        return c, rows[take]
