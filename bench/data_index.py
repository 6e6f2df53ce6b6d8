"""Start-up cost of indexing a webdataset in a bucket, or a folder on a gcsfuse mount, with and without the
data index cache.

    .venv/bin/python bench/data_index.py [--examples=2000] [--shards=8] [--latency_ms=20]
                                         [--sources=webdataset,folder,scale] [--scale_examples=1000000]

webdataset:
Writes --examples small JPEGs with captions in --shards tar shards to the in-memory fake bucket
(tests/fake_gcs.py) and adds --latency_ms to every object open or ranged read and every listing, a stand-in
for a GCS round trip (the fake reads a shard's headers in one open, where gcsfs fetches read-ahead
blocks: indexing costs more on a real bucket). Then times make_train_iterator (shard discovery, tar index,
probes, bucket index; no batch drawn):
1. uncached: what every host paid at every start and restart before data/index_cache.py;
2. cold cache, 1 process: the same work plus writing gs://.../data_index;
3. warm cache: a restart, which reads tars.npz and probes.npz;
4. cold cache split over 2 simulated processes (threads, a threading.Barrier as the sync): wall time until
   both are done;
5. one shard added (as many examples as the others): a restart on the warm cache, which indexes and
   probes that shard alone, against the grown dataset uncached.
folder: --examples small JPEGs with .txt captions in a local folder, where every os.stat and open of a file
in it waits --latency_ms, a stand-in for a gcsfuse mount whose stat cache misses (a probe stats and opens
the image and its caption: 4 round trips; the cache stamps each image and caption: 2). Times:
1. uncached; 2. cold cache; 3. warm cache (stats only); 4. one image added: a restart on the warm cache,
   which probes that image alone, against the grown folder uncached.
scale: the host cost of probing --scale_examples examples with nothing to read (a synthetic source whose
probe returns a size), uncached, in a fresh process: wall time and the memory the probe pass adds (peak
RSS minus RSS before it). This is the thread pool's own bookkeeping, which grows with the dataset.
Prints the requests each run made and one JSON line of times and ratios per source.
"""

import argparse
import builtins
import collections
import io
import json
import os
import sys
import tarfile
import tempfile
import threading
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def make_dataset(fs, root, examples, shards, first=0):
    """Shards first..first + shards - 1 of ceil(examples / shards) examples each (the last may hold fewer)."""
    rng = np.random.default_rng(first)
    per = -(-examples // shards)
    for s in range(first, first + shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for k in range(s * per, min(examples + first * per, (s + 1) * per)):
                h, w = [(48, 64), (64, 48), (40, 40)][k % 3]
                img = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(img, "JPEG", quality=80)
                for name, data in ((f"{k:06d}.jpg", img.getvalue()), (f"{k:06d}.txt", f"photo {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with fs.open(f"{root}/shard-{s:05d}.tar", "wb") as f:
            f.write(buf.getvalue())


def add_latency(fs_class, latency_s, requests):
    """Every open (a read, a ranged read through cat_file, a write) and listing waits latency_s."""
    lock = threading.Lock()
    for name in ("_open", "cat_file", "ls", "glob"):
        method = getattr(fs_class, name)

        def slow(self, path, *args, _method=method, _name=name, **kw):
            path = str(path)
            kind = "shard" if path.endswith(".tar") else "data_index" if "data_index" in path else "listing"
            with lock:
                requests[f"{_name}:{kind}"] += 1
            time.sleep(latency_s)
            return _method(self, path, *args, **kw)

        setattr(fs_class, name, slow)


def _stub_tok(captions):
    ids = np.zeros((len(captions), 77), np.int32)
    return {"ids_l": ids, "ids_g": ids}


def start(config, **kw):
    from sdxl_jax.data import iterator

    it = iterator.make_train_iterator(config, seed=0, global_batch_size=4, process_index=0, process_count=1,
                                      tokenizer=_stub_tok, **kw)  # fmt: skip
    fingerprint = it.get_state()["fingerprint"]
    it.close()
    return fingerprint


def timed(requests, fn):
    requests.clear()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out, dict(requests)


def two_processes(config, index_dir):
    barrier = threading.Barrier(2)
    out, errors = [None, None], []

    def run(p):
        try:
            sync = lambda name: barrier.wait()
            out[p] = start(config, index_dir=index_dir, index_process=(p, 2), sync=sync)
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert out[0] == out[1], out
    return out[0]


def make_folder(root, examples, first=0):
    """Images first..first + examples - 1 as NNNNNN.jpg, each with a NNNNNN.txt caption."""
    rng = np.random.default_rng(first)
    os.makedirs(root, exist_ok=True)
    for k in range(first, first + examples):
        h, w = [(48, 64), (64, 48), (40, 40)][k % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(f"{root}/{k:06d}.jpg", quality=80)
        with open(f"{root}/{k:06d}.txt", "w") as f:
            f.write(f"photo {k}")


def slow_files(root, latency_s, requests):
    """Every os.stat and open of a path under root waits latency_s; returns the function that undoes it."""
    lock, real_stat, real_open = threading.Lock(), os.stat, builtins.open

    def wait(kind, path):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(root):
            with lock:
                requests[kind] += 1
            time.sleep(latency_s)

    def stat(path, *args, **kw):
        wait("stat", path)
        return real_stat(path, *args, **kw)

    def open_(path, *args, **kw):
        wait("open", path)
        return real_open(path, *args, **kw)

    os.stat, builtins.open = stat, open_
    return lambda: (setattr(os, "stat", real_stat), setattr(builtins, "open", real_open))


def bench_folder(args):
    from configs import common

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "photos")
        make_folder(root, args.examples)
        config = common.data()
        config.update(dict(source="folder", path=root, buckets="square", resolution=32))
        config.update(dict(num_workers=0, prefetch=1))
        start(config)  # imports and first-call costs, before any timing
        requests = collections.Counter()
        undo = slow_files(root, args.latency_ms / 1e3, requests)
        log = {}
        try:
            uncached, want, log["uncached"] = timed(requests, lambda: start(config))
            idx = os.path.join(tmp, "work", "data_index")
            cold, got, log["cold"] = timed(requests, lambda: start(config, index_dir=idx))
            assert got == want
            warm, got, log["warm"] = timed(requests, lambda: start(config, index_dir=idx))
            assert got == want
            undo()
            make_folder(root, 1, first=args.examples)
            undo = slow_files(root, args.latency_ms / 1e3, requests)
            grown_uncached, want, log["grown_uncached"] = timed(requests, lambda: start(config))
            added, got, log["added_image"] = timed(requests, lambda: start(config, index_dir=idx))
            assert got == want
        finally:
            undo()
    for name, counts in log.items():
        print(f"requests, folder {name}: {counts}")
    print(json.dumps(dict(
        source="folder", examples=args.examples, latency_ms=args.latency_ms, uncached_s=round(uncached, 3),
        cold_s=round(cold, 3), warm_s=round(warm, 3), warm_speedup=round(uncached / warm, 1),
        grown_uncached_s=round(grown_uncached, 3), added_image_s=round(added, 3),
        added_image_speedup=round(grown_uncached / added, 2),
    )))  # fmt: skip


def bench_webdataset(args):
    import fake_gcs

    from configs import common

    fs = fake_gcs.install()
    try:
        make_dataset(fs, "bench/wds", args.examples, args.shards)
        config = common.data()
        config.update(dict(source="webdataset", path="gs://bench/wds", buckets="square", resolution=32))
        config.update(dict(num_workers=0, prefetch=1))
        start(config)  # imports and first-call costs, before any timing
        requests = collections.Counter()
        add_latency(fake_gcs.FakeGCS, args.latency_ms / 1e3, requests)
        log = {}
        uncached, want, log["uncached"] = timed(requests, lambda: start(config))
        idx = "gs://bench/work/data_index"
        cold, got, log["cold_1_process"] = timed(requests, lambda: start(config, index_dir=idx))
        assert got == want
        warm, got, log["warm"] = timed(requests, lambda: start(config, index_dir=idx))
        assert got == want
        split_dir = "gs://bench/work2/data_index"
        split, got, log["cold_2_processes"] = timed(requests, lambda: two_processes(config, split_dir))
        assert got == want
        make_dataset(fs, "bench/wds", -(-args.examples // args.shards), 1, first=args.shards)
        grown_uncached, want, log["grown_uncached"] = timed(requests, lambda: start(config))
        added, got, log["added_shard"] = timed(requests, lambda: start(config, index_dir=idx))
        assert got == want
    finally:
        fake_gcs.uninstall()
    for name, counts in log.items():
        print(f"requests, {name}: {counts}")
    print(json.dumps(dict(
        examples=args.examples, shards=args.shards, latency_ms=args.latency_ms,
        uncached_s=round(uncached, 3), cold_1_process_s=round(cold, 3), warm_s=round(warm, 3),
        cold_2_processes_s=round(split, 3), warm_speedup=round(uncached / warm, 1),
        cold_overhead=round(cold / uncached, 3), split_speedup=round(uncached / split, 2),
        grown_uncached_s=round(grown_uncached, 3), added_shard_s=round(added, 3),
        added_shard_speedup=round(grown_uncached / added, 2),
    )))  # fmt: skip


class _SizesOnly:
    """n examples whose probe is free: what is left is the probing machinery's own cost."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def probe(self, i):
        return {"size": (512 + i % 3 * 64, 512)}


def _rss_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def scale_child(n):
    from sdxl_jax.data import pipeline

    before = _rss_mib("VmRSS")
    t = time.perf_counter()
    rows = pipeline.probe_all(_SizesOnly(n), num_threads=16)
    wall = time.perf_counter() - t
    assert rows.shape == (n, 3) and (rows[:, 2] == -1).all()
    return dict(source="scale", examples=n, probe_all_s=round(wall, 2),
                added_peak_mib=round(_rss_mib("VmHWM") - before, 1))  # fmt: skip


def bench_scale(args):
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), f"--scale_child={args.scale_examples}"]
    print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--latency_ms", type=float, default=20.0)
    parser.add_argument("--sources", default="webdataset,folder",
                        help="comma-separated: webdataset, folder, scale")
    parser.add_argument("--scale_examples", type=int, default=1_000_000)
    parser.add_argument("--scale_child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale_child:
        print(json.dumps(scale_child(args.scale_child)))
        return
    chosen = args.sources.split(",")
    if set(chosen) - {"webdataset", "folder", "scale"}:
        parser.error(f"--sources={args.sources!r}: choose from webdataset, folder, scale")
    if "scale" in chosen:
        bench_scale(args)
    if "webdataset" in chosen:
        bench_webdataset(args)
    if "folder" in chosen:
        bench_folder(args)


if __name__ == "__main__":
    main()
