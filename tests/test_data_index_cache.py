"""sdxl_jax.data.index_cache: the dataset index in data_index/, split over the hosts, kept across restarts."""

import collections
import io
import json
import os
import threading
import warnings

import numpy as np
import pytest
from etils import epath
from PIL import Image
from test_data_sources import _stub_tok, _tar_bytes

from configs import common
from sdxl_jax import paths
from sdxl_jax.data import buckets, index_cache, pipeline, sources
from sdxl_jax.data import iterator as iterator_lib

G = 4
PER_SHARD = 10


def _jpeg(h, w, seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _shard_bytes(keys, size=None):
    """Examples with every outcome: usable sizes (or all `size`), no caption, not an image, too small,
    too wide."""
    members = []
    for k in keys:
        kind = k % PER_SHARD
        if kind == 1:
            image = b"not an image"
        else:
            h, w = {2: (16, 16), 3: (24, 96)}.get(kind, size or [(48, 64), (64, 48), (40, 40)][k % 3])
            image = _jpeg(h, w, k)
        members.append((f"{k:04d}.jpg", image))
        if kind != 0:
            members.append((f"{k:04d}.txt", f"caption {k}".encode()))
    return _tar_bytes(members)


def _dataset(root, shards=4, first=0):
    """`shards` shards of PER_SHARD examples under `root` (a local folder or gs://...); returns root."""
    for s in range(first, first + shards):
        data = _shard_bytes(range(s * PER_SHARD, (s + 1) * PER_SHARD))
        path = f"{root}/shard-{s:03d}.tar"
        if paths.is_remote(root):
            epath.Path(path).write_bytes(data)
        else:
            os.makedirs(root, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
    return str(root)


def _config(path, **kw):
    c = common.data()
    c.update(dict(source="webdataset", path=str(path), buckets="square", resolution=32, random_crop=False))
    c.update(dict(random_flip=False, min_image_side=24, max_aspect_ratio=3.0, max_image_pixels=10**6))
    c.update(dict(num_workers=0, prefetch=1))
    c.update(kw)
    return c


def _build(config, cache=None):
    source = sources.from_config(config, cache=cache)
    return source, pipeline.Index(source, config, buckets.from_config(config), G, cache=cache)


def _assert_same(a, b):
    (src_a, index_a), (src_b, index_b) = a, b
    assert src_a.shards == src_b.shards
    np.testing.assert_array_equal(src_a.index, src_b.index)
    _assert_same_index(index_a, index_b)


def _assert_same_index(index_a, index_b):
    np.testing.assert_array_equal(index_a.sizes, index_b.sizes)
    assert len(index_a.members) == len(index_b.members)
    for m, n in zip(index_a.members, index_b.members, strict=True):
        np.testing.assert_array_equal(m, n)
    np.testing.assert_array_equal(index_a.counts, index_b.counts)
    assert index_a.skips == index_b.skips and index_a.fingerprint() == index_b.fingerprint()


def _cache(directory, p=0, num=1, sync=None, lines=None):
    log = lines.append if lines is not None else print
    return index_cache.IndexCache(directory, p, num, sync=sync, log=log)


class Counts:
    """Probe calls (per source object), shards indexed and shard bytes read, counted under monkeypatch."""

    def __init__(self, monkeypatch):
        self.lock = threading.Lock()
        self.reset()
        cls = sources.WebDatasetSource
        probe, read, index_shard = cls.probe, cls._read, sources._index_shard

        def counted_probe(src, i):
            with self.lock:
                self.probed[id(src)].append(i)
            return probe(src, i)

        def counted_index(shard):
            with self.lock:
                self.indexed.append(os.path.basename(shard))
            return index_shard(shard)

        def counted_read(src, shard, span):
            with self.lock:
                self.reads += 1
            return read(src, shard, span)

        monkeypatch.setattr(sources.WebDatasetSource, "probe", counted_probe)
        monkeypatch.setattr(sources, "_index_shard", counted_index)
        monkeypatch.setattr(sources.WebDatasetSource, "_read", counted_read)

    def reset(self):
        self.probed, self.indexed, self.reads = collections.defaultdict(list), [], 0

    def probes(self):
        return sum(len(v) for v in self.probed.values())


def _processes(count, fn):
    """fn(p, sync) for p < count in threads (simulated hosts) with a threading.Barrier as the sync."""
    barrier = threading.Barrier(count)
    syncs, results, errors = collections.defaultdict(list), [None] * count, []

    def run(p):
        def sync(name):
            syncs[p].append(name)
            barrier.wait(timeout=30)

        try:
            results[p] = fn(p, sync)
        except BaseException as e:  # release the other host instead of leaving it at the barrier
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, [syncs[p] for p in range(count)]


N = 4 * PER_SHARD
PHASES = ["data_index:tars", "data_index:probes"]


def test_a_second_start_reads_the_cache_and_no_shard_data(tmp_path, monkeypatch):
    config = _config(_dataset(tmp_path / "wds"))
    want = _build(config)
    assert want[1].skips == {"missing_caption": 4, "not_an_image": 4, "too_small": 4, "extreme_aspect": 4}
    counts = Counts(monkeypatch)
    idx = tmp_path / "work" / "data_index"
    lines = []
    _assert_same(_build(config, _cache(idx, lines=lines)), want)
    assert counts.probes() == N and sorted(counts.indexed) == [f"shard-{s:03d}.tar" for s in range(4)]
    assert "indexed 4 of 4 shards on this host" in lines[0]
    assert "probed the examples of 4 of 4 shards on this host" in lines[1]
    assert {"tars.npz", "probes.npz"} <= set(os.listdir(idx))
    counts.reset()
    lines.clear()
    opened = []
    monkeypatch.setattr(sources, "_open", lambda path: opened.append(path) or open(path, "rb"))
    _assert_same(_build(config, _cache(idx, lines=lines)), want)
    assert counts.probes() == 0 and counts.indexed == [] and counts.reads == 0 and opened == []
    assert len(lines) == 2 and all("read from" in line for line in lines), lines


def test_two_hosts_each_index_their_half_and_get_the_whole_index(tmp_path, monkeypatch):
    config = _config(_dataset(tmp_path / "wds"))
    want = _build(config)
    counts = Counts(monkeypatch)
    idx = tmp_path / "data_index"
    results, syncs = _processes(2, lambda p, sync: _build(config, _cache(idx, p, 2, sync, lines=[])))
    for result in results:
        _assert_same(result, want)
    assert syncs == [PHASES, PHASES]
    # Each host's source probed one contiguous half; every shard was indexed once, by one host.
    halves = sorted(sorted(v) for v in counts.probed.values())
    assert halves == [list(range(N // 2)), list(range(N // 2, N))]
    assert sorted(counts.indexed) == [f"shard-{s:03d}.tar" for s in range(4)]
    counts.reset()
    # The restart reads the combined files (host 0 wrote them), and still calls sync once per phase.
    results, syncs = _processes(2, lambda p, sync: _build(config, _cache(idx, p, 2, sync, lines=[])))
    assert counts.probes() == 0 and counts.indexed == [] and syncs == [PHASES, PHASES]
    _assert_same(results[1], want)


def test_a_host_that_cannot_see_the_others_files_indexes_the_rest_itself(tmp_path, monkeypatch):
    """Workdirs on each host's local disk: no part file is shared, and the index is still whole."""
    config = _config(_dataset(tmp_path / "wds"))
    want = _build(config)
    counts = Counts(monkeypatch)
    lines = [[], []]
    results, syncs = _processes(
        2, lambda p, sync: _build(config, _cache(tmp_path / f"host{p}", p, 2, sync, lines=lines[p]))
    )
    for result in results:
        _assert_same(result, want)
    assert syncs == [PHASES, PHASES]
    assert sorted(len(v) for v in counts.probed.values()) == [N, N]  # each host probed everything
    assert "probed the examples of 4 of 4 shards" in lines[1][1]
    assert "2 of them after the barrier" in lines[1][1]
    # Each host wrote the combined files into its own folder, so a restart probes nothing.
    counts.reset()
    results, syncs = _processes(
        2, lambda p, sync: _build(config, _cache(tmp_path / f"host{p}", p, 2, sync, lines=lines[p]))
    )
    assert counts.probes() == 0 and counts.indexed == [] and syncs == [PHASES, PHASES]
    _assert_same(results[1], want)


def test_changed_or_added_shards_and_max_pixels_are_indexed_again(tmp_path, monkeypatch):
    root = _dataset(tmp_path / "wds")
    idx = tmp_path / "data_index"
    _build(_config(root), _cache(idx, lines=[]))
    # A rewritten shard (the same examples, other images: another byte size) is indexed again alone.
    with open(f"{root}/shard-001.tar", "wb") as f:
        f.write(_shard_bytes(range(10, 20), size=(20, 30)))
    got, want = _rebuild_checked(config=_config(root), idx=idx, monkeypatch=monkeypatch)
    assert got["indexed"] == ["shard-001.tar"] and got["probed"] == ["shard-001.tar"]
    assert want[1].skips["too_small"] == 4 + 6  # the rewritten shard's images are too small now
    # An added shard: indexed and probed alone.
    _dataset(root, shards=1, first=4)
    got, _ = _rebuild_checked(config=_config(root), idx=idx, monkeypatch=monkeypatch)
    assert got["indexed"] == ["shard-004.tar"] and got["probed"] == ["shard-004.tar"]
    # A removed shard: the others' probes are kept.
    os.remove(f"{root}/shard-000.tar")
    got, _ = _rebuild_checked(config=_config(root), idx=idx, monkeypatch=monkeypatch)
    assert got["indexed"] == [] and got["probed"] == []
    # data.max_image_pixels changes probe outcomes (48x64 images are now too large): probed again.
    got, want = _rebuild_checked(config=_config(root, max_image_pixels=48 * 64 - 1), idx=idx,
                                 monkeypatch=monkeypatch, other_data=True)  # fmt: skip
    assert got["indexed"] == [] and got["probed"] == [f"shard-{s:03d}.tar" for s in range(1, 5)]
    assert want[1].skips["too_many_pixels"] > 0


def _rebuild_checked(config, idx, monkeypatch, other_data=False):
    """Builds with the cache (with other_data, a warning says it was for other data) and compares with
    no cache; returns the shards indexed and those whose examples were probed, and the uncached build."""
    with monkeypatch.context() as m:
        counts = Counts(m)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _build(config, _cache(idx, lines=[]))
        assert any("written for other data" in str(w.message) for w in caught) == other_data, caught
        probed = {got[0].shards[int(got[0].index[i, 0])] for v in counts.probed.values() for i in v}
        seen = dict(indexed=sorted(counts.indexed), probed=sorted(os.path.basename(s) for s in probed))
    want = _build(config)
    _assert_same(got, want)
    return seen, want


def test_an_error_in_one_hosts_share_reaches_every_host_without_a_deadlock(tmp_path):
    import gzip

    root = _dataset(tmp_path / "wds")
    with open(f"{root}/shard-003.tar", "rb") as f:
        data = f.read()
    with open(f"{root}/shard-003.tar", "wb") as f:  # host 1's share
        f.write(gzip.compress(data))

    def build(p, sync):
        try:
            _build(_config(root), _cache(tmp_path / "data_index", p, 2, sync, lines=[]))
        except ValueError as e:
            return e

    with pytest.warns(UserWarning, match="share failed"):  # host 1 retries after the barrier
        errors, syncs = _processes(2, build)
    assert all("shard-003.tar is a compressed tar" in str(e) for e in errors), errors
    assert syncs == [PHASES[:1], PHASES[:1]]


def test_a_shard_read_through_a_network_error_is_used_but_not_kept(tmp_path, monkeypatch):
    config = _config(_dataset(tmp_path / "wds"))
    idx = tmp_path / "data_index"
    with monkeypatch.context() as m:
        real_open = sources._open

        def flaky(path):
            if path.endswith("shard-002.tar"):
                raise OSError("503 Service Unavailable")
            return real_open(path)

        m.setattr(sources, "_open", flaky)
        failed = _build(config)
        _assert_same(_build(config, _cache(idx, lines=[])), failed)  # as without the cache: 30 examples
    assert len(failed[0]) == N - PER_SHARD
    counts = Counts(monkeypatch)
    got = _build(config, _cache(idx, lines=[]))  # the other shards' probes are kept
    assert counts.indexed == ["shard-002.tar"]
    assert sorted(i for v in counts.probed.values() for i in v) == list(range(2 * PER_SHARD, 3 * PER_SHARD))
    monkeypatch.undo()
    _assert_same(got, _build(config))


def test_damaged_cache_files_are_ignored_with_a_warning(tmp_path, monkeypatch):
    config = _config(_dataset(tmp_path / "wds"))
    want = _build(config)
    idx = tmp_path / "data_index"
    _build(config, _cache(idx, lines=[]))
    probes = (idx / "probes.npz").read_bytes()
    (idx / "probes.npz").write_bytes(b"garbage")
    (idx / "tars.npz").write_bytes((idx / "tars.npz").read_bytes()[:100])
    counts = Counts(monkeypatch)
    with pytest.warns(UserWarning, match="unreadable") as caught:
        _assert_same(_build(config, _cache(idx, lines=[])), want)
    assert sum("unreadable" in str(w.message) for w in caught) == 2
    assert counts.probes() == N and len(counts.indexed) == 4
    # Well-formed but impossible content is not used either: an unknown skip code, or a shard's probes
    # that are one example short (the shapes agree, its count differs from the tar index's).
    with np.load(io.BytesIO(probes)) as f:
        arrays = dict(f)
    unknown_code = dict(arrays, rows=arrays["rows"].copy())
    unknown_code["rows"][0, 2] = 99
    one_short = dict(arrays, rows=arrays["rows"][1:], counts=arrays["counts"] - np.eye(4, dtype=np.int64)[0])
    for damaged, why in [(unknown_code, "values out of range"), (one_short, "row count differs")]:
        buf = io.BytesIO()
        np.savez(buf, **damaged)
        (idx / "probes.npz").write_bytes(buf.getvalue())
        counts.reset()
        with pytest.warns(UserWarning, match=f"damaged \\({why}"):
            _assert_same(_build(config, _cache(idx, lines=[])), want)
        assert counts.probes() == N and counts.indexed == []
    counts.reset()  # the files were written again: a clean read
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(_build(config, _cache(idx, lines=[])), want)
    assert counts.probes() == 0 and counts.indexed == []


def test_changing_the_size_rules_reuses_the_cached_probes(tmp_path, monkeypatch):
    root = _dataset(tmp_path / "wds")
    idx = tmp_path / "data_index"
    _build(_config(root), _cache(idx, lines=[]))
    counts = Counts(monkeypatch)
    config = _config(root, min_image_side=45, max_aspect_ratio=0.0)
    got = _build(config, _cache(idx, lines=[]))
    assert counts.probes() == 0 and counts.indexed == []
    monkeypatch.undo()
    want = _build(config)
    _assert_same(got, want)
    assert want[1].skips == {"missing_caption": 4, "not_an_image": 4, "too_small": 16}  # 40x40 too


def test_a_bucket_workdir_reads_one_object_per_phase(fake_gcs, monkeypatch):
    root = _dataset("gs://bucket/wds")
    config = _config(root)
    want = _build(config)
    idx = "gs://bucket/run/data_index"
    _assert_same(_build(config, _cache(idx, lines=[])), want)
    objects = fake_gcs.objects()
    assert f"{idx}/probes.npz" in objects and f"{idx}/tars.npz" in objects
    opened = []
    method = type(fake_gcs)._open

    def counted(self, path, *args, **kw):
        opened.append(path)
        return method(self, path, *args, **kw)

    monkeypatch.setattr(type(fake_gcs), "_open", counted)
    counts = Counts(monkeypatch)
    _assert_same(_build(config, _cache(idx, lines=[])), want)
    assert counts.probes() == 0 and counts.indexed == []
    assert sorted(opened) == ["bucket/run/data_index/probes.npz", "bucket/run/data_index/tars.npz"]


def _iterator(config, **kw):
    args = dict(seed=0, global_batch_size=G, process_index=0, process_count=1, tokenizer=_stub_tok)
    return iterator_lib.make_train_iterator(config, **{**args, **kw})


def test_make_train_iterator_with_an_index_dir_gives_the_same_batches(tmp_path):
    config = _config(_dataset(tmp_path / "wds"))
    want = [next(it) for it in [_iterator(config)] for _ in range(3)]
    syncs = []
    for _ in range(2):  # cold, then warm
        it = _iterator(config, index_dir=str(tmp_path / "data_index"), sync=syncs.append)
        for a in want:
            b = next(it)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        it.close()
    assert syncs == PHASES + PHASES
    assert {"probes.npz", "tars.npz"} <= set(os.listdir(tmp_path / "data_index"))


def test_sources_with_cheap_probes_write_nothing_and_never_sync(tmp_path):
    config = common.data()
    config.update(dict(source="shapes", shapes_num_examples=32, buckets="square", resolution=32))
    config.update(dict(num_workers=0, prefetch=1))
    syncs = []
    it = _iterator(config, index_dir=str(tmp_path / "data_index"), index_process=(1, 2), sync=syncs.append)
    assert next(it)["image"].shape == (G, 32, 32, 3)
    assert syncs == [] and not os.path.exists(tmp_path / "data_index")


def _photos(root):
    """A folder dataset: p0-p5.jpg captioned by p<k>.txt, but p4 (no caption: missing_caption) and p5 (by
    p5.caption), and sub/m0-m2.jpg captioned by sub/metadata.jsonl; returns root."""
    os.makedirs(root / "sub")
    for k in range(6):
        (root / f"p{k}.jpg").write_bytes(_jpeg(*[(48, 40), (40, 48), (40, 40)][k % 3], k))
    for k in range(4):
        (root / f"p{k}.txt").write_text(f"photo {k}")
    (root / "p5.caption").write_text("photo 5")
    for k in range(3):
        (root / "sub" / f"m{k}.jpg").write_bytes(_jpeg(40, 40, 10 + k))
    _metadata(root / "sub", [f"meta photo {k}" for k in range(3)])
    return root


def _metadata(folder, texts):
    rows = [json.dumps(dict(file_name=f"m{k}.jpg", text=t)) for k, t in enumerate(texts)]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def _folder_build(root, cache=None, **kw):
    return _build(_config(root, source="folder", **kw), cache)


def _probed_images(monkeypatch):
    """The images FolderSource.probe is called for (relative paths), under monkeypatch."""
    calls, lock, probe = [], threading.Lock(), sources.FolderSource.probe

    def counted(src, i):
        with lock:
            calls.append(src.files[i])
        return probe(src, i)

    monkeypatch.setattr(sources.FolderSource, "probe", counted)
    return calls


def _rebuild_folder(root, idx, monkeypatch, **kw):
    """(images probed, the build with the cache, its UserWarnings); the build equals the uncached one."""
    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calls = _probed_images(m)
        got = _folder_build(root, _cache(idx, lines=[]), **kw)
    want = _folder_build(root, **kw)
    assert got[0].files == want[0].files
    _assert_same_index(got[1], want[1])
    return sorted(calls), got, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_a_folder_restart_probes_nothing_even_after_changes_no_probe_reads(tmp_path, monkeypatch):
    root = _photos(tmp_path / "photos")
    idx = tmp_path / "data_index"
    lines = []
    with monkeypatch.context() as m:
        calls = _probed_images(m)
        src, index = _folder_build(root, _cache(idx, lines=lines))
    assert sorted(calls) == sorted(src.files) and len(calls) == 9
    assert "probed 9 of 9 examples on this host" in lines[0]
    assert index.skips == {"missing_caption": 1}
    probed, _, caught = _rebuild_folder(root, idx, monkeypatch)
    assert probed == [] and caught == []
    # The metadata file rewritten with the same rows, a caption file for an image that has a metadata row
    # (the row wins), other files: no probe's outcome changes.
    _metadata(root / "sub", [f"meta photo {k}" for k in range(3)])
    (root / "sub" / "m0.txt").write_text("")
    (root / "README.md").write_text("photos")
    (root / "p0.json").write_text("{}")
    probed, (src, index), caught = _rebuild_folder(root, idx, monkeypatch)
    assert probed == [] and caught == []
    assert len(src) == 9 and index.skips == {"missing_caption": 1}


def test_an_added_folder_image_is_probed_alone(tmp_path, monkeypatch):
    root = _photos(tmp_path / "photos")
    idx = tmp_path / "data_index"
    _folder_build(root, _cache(idx, lines=[]))
    (root / "p6.jpg").write_bytes(_jpeg(40, 48, 6))
    (root / "p6.txt").write_text("photo 6")
    probed, (src, index), caught = _rebuild_folder(root, idx, monkeypatch)
    assert probed == ["p6.jpg"] and caught == []
    assert len(src) == 10 and tuple(index.sizes[src.files.index("p6.jpg")]) == (40, 48)


def test_a_rewritten_folder_image_is_probed_alone(tmp_path, monkeypatch):
    root = _photos(tmp_path / "photos")
    idx = tmp_path / "data_index"
    src, index = _folder_build(root, _cache(idx, lines=[]))
    assert tuple(index.sizes[src.files.index("p1.jpg")]) == (40, 48)
    (root / "p1.jpg").write_bytes(_jpeg(64, 32, 1))
    probed, (src, index), caught = _rebuild_folder(root, idx, monkeypatch)
    assert probed == ["p1.jpg"] and caught == []
    assert tuple(index.sizes[src.files.index("p1.jpg")]) == (64, 32)


def test_a_changed_folder_caption_reprobes_its_image_alone(tmp_path, monkeypatch):
    root = _photos(tmp_path / "photos")
    idx = tmp_path / "data_index"
    _folder_build(root, _cache(idx, lines=[]))
    (root / "p4.txt").write_text("photo 4")  # was missing_caption
    probed, (src, index), caught = _rebuild_folder(root, idx, monkeypatch)
    assert probed == ["p4.jpg"] and caught == []
    assert index.skips == {} and src.files.index("p4.jpg") in np.concatenate(index.members)
    os.remove(root / "p0.txt")
    (root / "p5.txt").write_text(" ")  # .txt comes before .caption: an empty caption now
    probed, (_, index), _ = _rebuild_folder(root, idx, monkeypatch)
    assert probed == ["p0.jpg", "p5.jpg"]
    assert index.skips == {"missing_caption": 1, "empty_caption": 1}
    # metadata.jsonl edited: m1's caption emptied, m2's rewritten (still a caption: its probe is kept).
    _metadata(root / "sub", ["meta photo 0", "", "another caption"])
    probed, (_, index), _ = _rebuild_folder(root, idx, monkeypatch)
    assert probed == ["sub/m1.jpg"]
    assert index.skips == {"missing_caption": 1, "empty_caption": 2}


def test_a_removed_folder_image_probes_nothing_and_max_pixels_reprobes_all(tmp_path, monkeypatch):
    root = _photos(tmp_path / "photos")
    idx = tmp_path / "data_index"
    _folder_build(root, _cache(idx, lines=[]))
    os.remove(root / "p2.jpg")
    probed, (src, _), caught = _rebuild_folder(root, idx, monkeypatch)
    assert probed == [] and caught == [] and len(src) == 8 and "p2.jpg" not in src.files
    # data.max_image_pixels changes probe outcomes (48x40 images are now too large): all probed again.
    probed, (src, index), caught = _rebuild_folder(root, idx, monkeypatch, max_image_pixels=48 * 40 - 1)
    assert probed == sorted(src.files) and any("written for other data" in w for w in caught)
    assert index.skips["too_many_pixels"] > 0


def test_index_key_is_none_where_probes_are_cheap(tmp_path):
    assert json.loads(sources.WebDatasetSource(_dataset(tmp_path / "wds", shards=1), 10**6).index_key())
    ar = sources.ArrayRecordSource.__new__(sources.ArrayRecordSource)
    assert ar.index_key() is None


def test_train_lib_keeps_the_index_in_the_workdir(tmp_path):
    from configs import stage1_256
    from sdxl_jax import train_lib

    config = stage1_256.get_config("smoke")
    config.data = _config(_dataset(tmp_path / "wds"), batch_size=G)
    want = next(_iterator(config.data))
    for _ in range(2):  # the second start reads workdir/data_index
        it = train_lib.make_iterator(config, start_step=0, data_state=None, workdir=str(tmp_path / "work"))
        np.testing.assert_array_equal(next(it)["original_size"], want["original_size"])
        it.close()
    assert {"probes.npz", "tars.npz"} <= set(os.listdir(tmp_path / "work" / "data_index"))
