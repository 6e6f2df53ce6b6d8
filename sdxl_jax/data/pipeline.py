"""The training iterator: a seeded bucket schedule over an index of usable examples, decoded by grain.

Design (issue 6): the batch at global step s is a pure function of (seed, s, global_batch_size, data):
1. The index: every example is probed once (header / metadata only; with an index cache, once per
   dataset, split over the hosts and kept in the workdir's data_index/: index_cache.py), bad ones are
   counted by reason and dropped, the rest are assigned to the nearest-aspect bucket. Buckets holding
   fewer examples than one global batch are merged into their nearest live bucket, so each batch's rows
   can be distinct.
2. The schedule: step s draws its bucket from a seeded generator weighted by bucket sizes; every host
   computes the same draws. The k-th draw of bucket b takes window k of b's per-epoch shuffled member
   list (whole windows only, so a batch never straddles two epochs and its rows are distinct).
3. Host p of P takes rows [p*G/P, (p+1)*G/P) of that window, so hosts' rows are disjoint and the global
   batch does not depend on P (a job may resume on a different number of hosts).
4. grain maps step -> local batch in worker processes; random crop and flip use a generator keyed by
   (seed, step, global row), so results do not depend on the number of workers.
A row whose pixels fail to decode (e.g. a truncated file) is replaced by the next member of the same
bucket and counted as "decode_error", so the batch keeps its shape.
"""

import collections
import hashlib
import json

import numpy as np
from PIL import Image

from sdxl_jax.data import buckets as buckets_lib
from sdxl_jax.data import decode, process, threads

_SCHEDULE_CHUNK = 4096
_MAX_SUBSTITUTES = 16
_TAG_SCHEDULE, _TAG_PERM, _TAG_ROW = 0x5C4ED, 0xB0C, 0xC209


class Index:
    """Usable examples per bucket, their sizes, and skip counts from probing.

    With `cache` (index_cache.IndexCache) the raw probe outcomes come from the training workdir's
    data_index/ when they are there for this data (source.index_key(), and per group source.probe_groups()
    where the source has it: a webdataset shard, a folder's image), else the hosts split the probing and
    store it; the size rules below are applied after, so changing them keeps the cache.
    """

    def __init__(self, source, data_config, table, global_batch_size, num_threads=16, cache=None):
        probes = probe_all(source, num_threads, cache)
        n = len(probes)
        h, w, code = probes[:, 0], probes[:, 1], probes[:, 2].copy()
        c = data_config
        if c.min_image_side:
            code[(code < 0) & (np.minimum(h, w) < c.min_image_side)] = decode.SKIP_REASONS.index("too_small")
        ok = code < 0
        if c.max_aspect_ratio:  # the scalar rule itself, once per distinct size
            pairs, inverse = np.unique(probes[ok, :2], axis=0, return_inverse=True)
            ratio = c.max_aspect_ratio
            good = np.array([process.max_aspect_ok(int(y), int(x), ratio) for y, x in pairs], bool)
            code[np.flatnonzero(ok)[~good[inverse.reshape(-1)]]] = decode.SKIP_REASONS.index("extreme_aspect")
            ok = code < 0
        sizes = np.zeros((n, 2), np.int32)
        sizes[ok] = probes[ok, :2]
        self.skips = collections.Counter(
            {decode.SKIP_REASONS[r]: int(k) for r, k in enumerate(np.bincount(code[~ok], minlength=0)) if k}
        )
        self.sizes, self.table = sizes, tuple(table)
        usable = np.flatnonzero(ok)
        if len(usable) < global_batch_size:
            raise ValueError(
                f"only {len(usable)} usable examples of {n} (skipped: {dict(self.skips)}) for a global "
                f"batch of {global_batch_size}; add data or lower the batch size"
            )
        assignment = buckets_lib.assign_many(sizes[usable, 0], sizes[usable, 1], table)
        assignment = _merge_small_buckets(assignment, table, global_batch_size)
        self.members = tuple(usable[assignment == b] for b in range(len(table)))
        self.counts = np.array([len(m) for m in self.members], np.int64)

    def fingerprint(self):
        blob = json.dumps([self.table, self.counts.tolist(), int(self.sizes.sum())])
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def probe_all(source, num_threads=16, cache=None):
    """(n, 3) int32: (h, w, -1) per usable example, (0, 0, decode.SKIP_REASONS index) per skipped one.

    The source's own verdict only: the trainer's size rules are not applied, so these can be cached."""
    n = len(source)
    key = getattr(source, "index_key", lambda: None)() if cache is not None else None
    if key is None:
        return _probe_rows(source, np.arange(n), num_threads)
    table = dict(width=3, dtype=np.int32, valid=_valid_probes)
    if not hasattr(source, "probe_groups"):  # one item per example, for this exact data

        def compute(indices):
            return np.ones(len(indices), np.int64), _probe_rows(source, indices, num_threads), None

        key = json.dumps([_PROBE_VERSION, type(source).__name__, n, key])
        return cache.table("probes", key, n, compute, counts=np.ones(n, np.int64), **table)[1]
    names, counts = source.probe_groups()  # one item per group (shard), matched by name
    starts = np.cumsum(counts) - counts
    if int(counts.sum()) != n:
        raise ValueError(f"{type(source).__name__}.probe_groups() covers {int(counts.sum())} of {n} examples")

    def compute(groups):
        examples = np.concatenate([np.arange(starts[g], starts[g] + counts[g]) for g in groups])
        return counts[groups], _probe_rows(source, examples, num_threads), None

    key = json.dumps([_PROBE_VERSION, type(source).__name__, "per group", key])
    per_example = bool((counts == 1).all())  # a folder's images; webdataset groups are shards
    unit = dict(unit="examples") if per_example else dict(unit="shards", verb="probed the examples of")
    return cache.table("probes", key, len(names), compute, names=names, counts=counts, **unit, **table)[1]


# Bump when what a probe returns changes (decode.probe's rules, a source's probe): cached probes then expire.
_PROBE_VERSION = 1


def _probe_rows(source, indices, num_threads):
    def probe(i):
        try:
            h, w = source.probe(int(i))["size"]
            return h, w, -1
        except decode.Skip as e:
            return 0, 0, decode.SKIP_REASONS.index(e.reason)

    rows = np.zeros((len(indices), 3), np.int32)
    workers = num_threads if len(indices) > 64 else 1
    for row, result in enumerate(threads.ordered_map(probe, indices, workers)):
        rows[row] = result
    return rows


def _valid_probes(counts, rows):
    h, w, code = rows.T
    usable = code == -1
    return bool(
        ((code >= -1) & (code < len(decode.SKIP_REASONS))).all() and (h[usable] > 0).all()
        and (w[usable] > 0).all()
    )  # fmt: skip


def _merge_small_buckets(assignment, table, g):
    """Moves the members of buckets with fewer than g examples to the nearest (log aspect) live bucket."""
    la = buckets_lib.log_aspects(table)
    counts = np.bincount(assignment, minlength=len(table))
    while True:
        small = [b for b in range(len(table)) if 0 < counts[b] < g]
        if not small:
            return assignment
        b = min(small, key=lambda x: (counts[x], x))
        others = [o for o in range(len(table)) if o != b and counts[o] > 0]
        target = min(others, key=lambda o: (abs(la[o] - la[b]), o))
        assignment = np.where(assignment == b, target, assignment)
        counts[target] += counts[b]
        counts[b] = 0


class Schedule:
    """Step -> (bucket, how many times that bucket was drawn before), the same on every host."""

    def __init__(self, counts, seed):
        self.p = np.asarray(counts, np.float64) / np.sum(counts)
        self.seed = int(seed)
        self._prefix = [np.zeros(len(self.p), np.int64)]  # draws per bucket before chunk c
        self._cache = {}

    def _chunk(self, c):
        if c not in self._cache:
            rng = np.random.default_rng([self.seed, _TAG_SCHEDULE, c])
            self._cache = {c: rng.choice(len(self.p), _SCHEDULE_CHUNK, p=self.p)}
        return self._cache[c]

    def lookup(self, step):
        c, r = divmod(int(step), _SCHEDULE_CHUNK)
        while len(self._prefix) <= c:
            k = len(self._prefix) - 1
            self._prefix.append(self._prefix[k] + np.bincount(self._chunk(k), minlength=len(self.p)))
        draws = self._chunk(c)
        b = int(draws[r])
        return b, int(self._prefix[c][b] + np.count_nonzero(draws[:r] == b))


class StepLoader:
    """step -> this host's batch dict (plus "_skips" counts and "_step"); runs in grain workers."""

    def __init__(self, source, index, data_config, *, seed, global_batch_size, process_index, process_count,
                 tokenizer):  # fmt: skip
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch {global_batch_size} does not split over {process_count} processes"
            )
        self.source, self.tokenizer, self.seed = source, tokenizer, int(seed)
        self.members, self.sizes, self.table = index.members, index.sizes, index.table
        self.schedule = Schedule(index.counts, seed)
        self.g, self.local = global_batch_size, global_batch_size // process_count
        self.offset = process_index * self.local
        c = data_config
        self.random_crop, self.flip, self.shuffle = bool(c.random_crop), bool(c.random_flip), bool(c.shuffle)
        self.aesthetic_score, self.max_pixels = float(c.aesthetic_score), c.max_image_pixels
        self.cover_scale = float(c.cover_scale)
        self._perms = {}

    def _perm(self, b, epoch):
        key = (b, epoch)
        if key not in self._perms:
            n = len(self.members[b])
            if len(self._perms) > 64:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, _TAG_PERM, b, epoch])
            self._perms[key] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._perms[key]

    def _row(self, example, bucket, rng):
        try:
            ex = self.source.load(example)
        except OSError as e:  # the file went away or became unreadable after indexing
            raise decode.Skip("missing_file", str(e)) from e
        caption = decode.caption_text(ex.get("caption"))
        h, w = (int(x) for x in self.sizes[example])
        bh, bw = self.table[bucket]
        params = process.crop_params(h, w, bh, bw, random_crop=self.random_crop, flip=self.flip, rng=rng,
                                     cover_scale=self.cover_scale)
        image = ex["image"]
        if isinstance(image, np.ndarray):
            img = Image.fromarray(image)
        else:
            img = decode.decode(image, self.max_pixels, min_size=params["resized"])
        return (
            process.render_crop(img, params),
            caption,
            params,
            ex.get("aesthetic_score", self.aesthetic_score),
        )

    def _plan(self, step):
        """(bucket, its members, epoch permutation, position of this step's first global row)."""
        b, k = self.schedule.lookup(step)
        members = self.members[b]
        epoch, window = divmod(k, len(members) // self.g)
        return b, members, self._perm(b, epoch), window * self.g

    def example_ids(self, step):
        """(bucket, this host's example indices at `step`), before any decode-failure substitution."""
        b, members, perm, start = self._plan(int(step))
        return b, members[perm[start + self.offset : start + self.offset + self.local]]

    def __call__(self, step):
        step = int(step)
        if getattr(self.source, "encoded", False):  # the encoding cache: no decode, crop or tokenizer
            from sdxl_jax.data import cache

            b, ids = self.example_ids(step)
            rows = [self.source.load(int(i)) for i in ids]
            return cache.stack_rows(rows, self.table[b], step, self.aesthetic_score)
        b, members, perm, start = self._plan(step)
        n = len(members)
        bh, bw = self.table[b]
        images = np.empty((self.local, bh, bw, 3), np.float32)
        meta = np.zeros((self.local, 6), np.int32)
        scores = np.zeros((self.local,), np.float32)
        captions = []
        skips = np.zeros(len(decode.SKIP_REASONS), np.int64)
        for j in range(self.local):
            row = self.offset + j
            pos = start + row
            rng = np.random.default_rng([self.seed, _TAG_ROW, step, row])
            for t in range(_MAX_SUBSTITUTES + 1):
                example = int(members[perm[(pos + t * self.g + t) % n]])
                try:
                    img, caption, params, score = self._row(example, b, rng)
                    break
                except decode.Skip as e:
                    skips[decode.SKIP_REASONS.index(e.reason)] += 1
                    last_error = e
            else:
                raise RuntimeError(
                    f"{_MAX_SUBSTITUTES + 1} examples in a row failed to load in bucket {self.table[b]} "
                    f"at step {step}; the data looks broken (last error: {last_error}); check data.path"
                )
            process.to_float(img, out=images[j])
            meta[j] = (*params["original_size"], *params["crop_coords_top_left"], *params["target_size"])
            scores[j] = score
            captions.append(caption)
        ids = self.tokenizer(captions)
        return {
            "image": images,
            "ids_l": np.asarray(ids["ids_l"], np.int32),
            "ids_g": np.asarray(ids["ids_g"], np.int32),
            "original_size": meta[:, 0:2].copy(),
            "crop_coords_top_left": meta[:, 2:4].copy(),
            "target_size": meta[:, 4:6].copy(),
            "aesthetic_score": scores,
            "_skips": skips,
            "_step": np.int64(step),
        }


def batch_spec(bucket, batch_size):
    """{key: (shape, numpy dtype)} of a batch of `batch_size` rows from the (h, w) bucket."""
    h, w = bucket
    return {
        "image": ((batch_size, h, w, 3), np.dtype(np.float32)),
        "ids_l": ((batch_size, 77), np.dtype(np.int32)),
        "ids_g": ((batch_size, 77), np.dtype(np.int32)),
        "original_size": ((batch_size, 2), np.dtype(np.int32)),
        "crop_coords_top_left": ((batch_size, 2), np.dtype(np.int32)),
        "target_size": ((batch_size, 2), np.dtype(np.int32)),
        "aesthetic_score": ((batch_size,), np.dtype(np.float32)),
    }


def batch_shapes(data_config, batch_size):
    """batch_spec for every bucket the config allows (an iterator's `batch_shapes()` lists the live ones)."""
    return [batch_spec(b, batch_size) for b in buckets_lib.from_config(data_config)]


def steps_per_epoch(index, global_batch_size):
    """Steps for one pass over the usable examples (whole windows only)."""
    return int(sum(c // global_batch_size for c in index.counts if c))
