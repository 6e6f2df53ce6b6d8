"""Start-up cost of indexing a webdataset in a bucket, with and without the data index cache.

    .venv/bin/python bench/data_index.py [--examples=2000] [--shards=8] [--latency_ms=20]

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
Prints the requests each run made and one JSON line of times and ratios.
"""

import argparse
import collections
import io
import json
import os
import sys
import tarfile
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--latency_ms", type=float, default=20.0)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
