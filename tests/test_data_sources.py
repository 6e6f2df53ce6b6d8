"""sdxl_jax.data.sources and prepare: folder / webdataset / array_record / tfds, and a corpus of bad files."""

import collections
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from etils import epath
from PIL import Image

from configs import common
from sdxl_jax.data import decode, prepare, sources
from sdxl_jax.data import iterator as iterator_lib

G = 4


def _stub_tok(captions):
    # Stand-in of tokenizer.load_pair()'s contract; the real one is exercised in test_data_iterator.py.
    ids = np.zeros((len(captions), 77), np.int32)
    for i, c in enumerate(captions):
        b = list(c.encode())[:77]
        ids[i, : len(b)] = b
    return {"ids_l": ids, "ids_g": ids + 1}


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def _config(source, path, **kw):
    c = common.data()
    c.update(dict(source=source, path=str(path), buckets="square", resolution=32, random_crop=False))
    c.update(dict(random_flip=False, shuffle=True, min_image_side=32, max_image_pixels=200 * 200))
    c.update(dict(num_workers=0, prefetch=1))
    c.update(kw)
    return c


def _make(config, **kw):
    args = dict(seed=0, global_batch_size=G, process_index=0, process_count=1, tokenizer=_stub_tok)
    return iterator_lib.make_train_iterator(config, **{**args, **kw})


def _good_jpeg(h=48, w=64, seed=0):
    return _encode(Image.fromarray(_noise(h, w, seed)), "JPEG", quality=90)


@pytest.fixture
def corpus(tmp_path):
    """12 usable files (odd modes, EXIF, metadata captions, one truncated) and 9 bad ones."""
    d = tmp_path / "corpus"
    gray = Image.fromarray(_noise(40, 40)[..., 0], "L")
    good = {
        "good.jpg": _good_jpeg(),
        "odd/gray.png": _encode(gray, "PNG"),
        "odd/la.png": _encode(gray.convert("LA"), "PNG"),
        "odd/palette.png": _encode(gray.convert("P"), "PNG", transparency=0),
        "odd/cmyk.jpg": _encode(Image.new("CMYK", (48, 40), (10, 200, 30, 0)), "JPEG"),
        "odd/rgba.png": _encode(Image.fromarray(_noise(40, 56)).convert("RGBA"), "PNG"),
        "odd/16bit.png": _encode(
            Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16)), "PNG"
        ),
        "truncated.jpg": _good_jpeg(128, 128)[:3000],
    }
    exif = Image.Exif()
    exif[0x0112] = 6
    good["exif.jpg"] = _encode(Image.fromarray(_noise(40, 80)), "JPEG", exif=exif)
    for name, data in good.items():
        _write(d / name, data)
        _write(
            d / (os.path.splitext(name)[0] + (".caption" if "gray" in name else ".txt")), f"caption of {name}"
        )
    # Captions from metadata files instead of sidecars.
    _write(d / "meta/a.jpg", _good_jpeg(seed=1))
    _write(d / "meta/b.png", _encode(Image.fromarray(_noise(40, 40, 2)), "PNG"))
    _write(d / "meta/metadata.jsonl", '{"file_name": "a.jpg", "text": "meta a", "aesthetic_score": 7.5}\n'
           '{"file_name": "b.png", "text": "meta b", "aesthetic_score": "n/a"}\nnot json\n')  # fmt: skip
    _write(d / "csv/c.jpg", _good_jpeg(seed=3))
    _write(d / "csv/metadata.csv", "file_name,text\nc.jpg,csv caption\n")
    bad = {
        "bad/empty.jpg": (b"", "caption"),
        "bad/corrupt.jpg": (os.urandom(500), "caption"),
        "bad/drawing.svg": (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "caption"),
        "bad/nocaption.jpg": (_good_jpeg(), None),
        "bad/emptycaption.jpg": (_good_jpeg(), "  \n "),
        "bad/latin1.jpg": (_good_jpeg(), b"caf\xe9"),
        "bad/tiny.png": (_encode(Image.fromarray(_noise(16, 16)), "PNG"), "caption"),
        "bad/strip.png": (_encode(Image.fromarray(_noise(32, 200)), "PNG"), "caption"),
        "bad/bomb.png": (_encode(Image.fromarray(_noise(250, 250)), "PNG"), "caption"),
    }
    for name, (data, caption) in bad.items():
        _write(d / name, data)
        if caption is not None:
            _write(d / (os.path.splitext(name)[0] + ".txt"), caption)
    _write(d / "orphan.txt", "a caption without an image is ignored")
    return d


EXPECTED_INDEX_SKIPS = dict(empty_file=1, not_an_image=2, missing_caption=1, empty_caption=1,
                            caption_not_utf8=1, too_small=1, extreme_aspect=1, too_many_pixels=1)  # fmt: skip


def test_broken_and_odd_files_run_through_with_every_skip_counted(corpus):
    it = _make(_config("folder", corpus))
    assert it.bucket_counts() == {(32, 32): 12}
    assert it.steps_per_epoch() == 3
    counts = it.skip_counts()
    assert {k: v for k, v in counts.items() if v} == EXPECTED_INDEX_SKIPS
    batches = [next(it) for _ in range(3)]  # one epoch: each usable file once
    counts = it.skip_counts()
    assert counts["decode_error"] == 1  # the truncated file, found while decoding and substituted
    assert sum(counts.values()) == 10
    for b in batches:
        assert b["image"].shape == (G, 32, 32, 3) and np.isfinite(b["image"]).all()
    scores = np.concatenate([b["aesthetic_score"] for b in batches])
    # metadata.jsonl's score for meta/a.jpg; b.png's malformed one ("n/a") gives data.aesthetic_score
    assert sorted(set(scores.tolist())) == [6.0, 7.5]
    sizes = {tuple(s) for b in batches for s in b["original_size"]}
    assert (80, 40) in sizes  # the EXIF-rotated 80x40 (w x h) photo is upright 80 high
    assert it.get_state()["runtime_skips"] == {"decode_error": 1}
    # As grain hands the source to a worker: the sidecar table that probe_groups reads at start-up stays
    # behind (an entry per image), and loading still finds each caption file.
    src = sources.FolderSource(str(corpus), 10**6)
    clone = pickle.loads(pickle.dumps(src))
    assert src.sidecars and clone.sidecars is None
    assert [clone.load(i) for i in range(len(src))] == [src.load(i) for i in range(len(src))]


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tar(path, members):
    with open(path, "wb") as f:
        f.write(_tar_bytes(members))


def _examples(keys):
    """Members of a webdataset shard: a 48x64 JPEG and a caption "caption {key}" per key."""
    return [(f"{k:03d}.{ext}", _good_jpeg(seed=k) if ext == "jpg" else f"caption {k}".encode())
            for k in keys for ext in ("jpg", "txt")]  # fmt: skip


def _captions(source):
    return [source.load(i)["caption"].decode() for i in range(len(source))]


def test_webdataset_shards(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    _tar(d / "shard-0.tar", [
        ("x/000.jpg", _good_jpeg(seed=0)), ("x/000.txt", b"zero"),
        ("x/001.png", _encode(Image.fromarray(_noise(40, 40, 1)), "PNG")),
        ("x/001.json", json.dumps({"caption": "one", "aesthetic_score": 5.5}).encode()),
        ("x/002.jpg", _good_jpeg(seed=2)),  # no caption
        ("x/003.jpg", b"garbage"), ("x/003.txt", b"three"),
    ])  # fmt: skip
    _tar(d / "shard-1.tar", [(f"{i:03d}.jpg", _good_jpeg(seed=i)) for i in range(4, 8)]
         + [(f"{i:03d}.txt", f"caption {i}".encode()) for i in range(5, 8)]
         + [("004.json", json.dumps({"caption": "four", "aesthetic_score": "n/a"}).encode())])  # fmt: skip
    src = sources.WebDatasetSource(str(d), 10**6)
    assert len(src) == 8
    it = _make(_config("webdataset", d))
    assert it.bucket_counts() == {(32, 32): 6}
    assert {k: v for k, v in it.skip_counts().items() if v} == {"missing_caption": 1, "not_an_image": 1}
    scores = np.concatenate([next(it)["aesthetic_score"] for _ in range(3)])
    assert sorted(set(scores.tolist())) == [5.5, 6.0]  # 004's malformed score: data.aesthetic_score


def test_expand_braces_follows_the_webdataset_convention():
    expand = sources.expand_braces
    assert expand("/data/shard.tar") == ["/data/shard.tar"]
    assert expand("s-{00000..00002}.tar") == ["s-00000.tar", "s-00001.tar", "s-00002.tar"]
    assert expand("{8..11}") == ["8", "9", "10", "11"]  # no leading zero: no padding
    assert expand("{098..101}") == ["098", "099", "100", "101"]
    assert expand("{0..6..3}") == ["0", "3", "6"]
    assert expand("gs://b/{train,val}/{0..1}.tar") == [
        "gs://b/train/0.tar", "gs://b/train/1.tar", "gs://b/val/0.tar", "gs://b/val/1.tar"
    ]  # fmt: skip
    assert expand("{a,{b,c}}-{x}*.tar") == ["a-{x}*.tar", "b-{x}*.tar", "c-{x}*.tar"]
    shards = expand("gs://b/{00000..09999}.tar")
    assert len(shards) == 10_000 and shards[-1] == "gs://b/09999.tar"
    for bad, match in [("{1..}", "malformed range"), ("{a..c}", "malformed range"),
                       ("{0..4..0}", "malformed range"), ("{1...3}", "malformed range"),
                       ("s-{0..2.tar", "unclosed '{'"), ("s-0..2}.tar", "unbalanced '}'")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            expand(bad)


def test_webdataset_brace_patterns_name_their_shards(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    for s in range(4):
        _tar(d / f"shard-{s:03d}.tar", _examples(range(3 * s, 3 * s + 3)))
    src = sources.WebDatasetSource(f"{d}/shard-{{000..002}}.tar", 10**6)
    assert [os.path.basename(p) for p in src.shards] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    assert _captions(src) == [f"caption {k}" for k in range(9)]
    src = sources.WebDatasetSource(f"{d}/shard-{{001,003}}.tar", 10**6)
    assert _captions(src) == [f"caption {k}" for k in (3, 4, 5, 9, 10, 11)]
    with pytest.raises(FileNotFoundError, match=r"2 shards named by .* do not exist.*shard-004.tar"):
        sources.WebDatasetSource(f"{d}/shard-{{000..005}}.tar", 10**6)
    with pytest.raises(FileNotFoundError, match=r"no .tar shards at data.path=.*other.*brace pattern"):
        sources.WebDatasetSource(f"{d}/other-{{0..3}}.tar", 10**6)
    out = tmp_path / "ar"  # prepare reads its --input through the same source
    prepare.main([f"--input={d}/shard-{{000..001}}.tar", "--input_format=webdataset", f"--out={out}"])
    assert json.loads((out / "index.json").read_text())["count"] == 6


def test_compressed_webdataset_shards_are_refused_with_the_fix(tmp_path):
    """tarfile would open a .tar.gz transparently and index offsets into the decompressed stream, so every
    member read returned garbage (counted as undecodable images); now a clear error."""
    import gzip

    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(_tar_bytes(_examples([0, 1]))))
    with pytest.raises(ValueError, match=r"s.tar.gz is a compressed tar.*gunzip"):
        sources.WebDatasetSource(str(tmp_path / "*.tar.gz"), 10**6)
    plain = tmp_path / "BZh-not-bzip2.tar"  # a member name that starts like bzip2's magic
    plain.write_bytes(_tar_bytes([("BZh91.jpg", _good_jpeg()), ("BZh91.txt", b"x")]))
    assert _captions(sources.WebDatasetSource(str(plain), 10**6)) == ["x"]


def test_webdataset_shards_on_gcs(fake_gcs, monkeypatch):
    for s in range(30):
        epath.Path(f"gs://bucket/wds/shard-{s:03d}.tar").write_bytes(_tar_bytes(_examples([s])))
    epath.Path("gs://bucket/wds/more/shard-100.tar").write_bytes(_tar_bytes(_examples([100])))
    calls = collections.Counter()
    for name in ("ls", "info", "exists", "isdir", "_open"):
        method = getattr(type(fake_gcs), name)

        def counted(self, *args, _method=method, _name=name, **kw):
            calls[_name] += 1
            return _method(self, *args, **kw)

        monkeypatch.setattr(type(fake_gcs), name, counted)
    src = sources.WebDatasetSource("gs://bucket/wds/shard-{000..029}.tar", 10**6)
    # One listing finds all named shards (not a request per shard); each shard is read once to index it.
    assert calls["ls"] + calls["info"] + calls["exists"] + calls["isdir"] == 1 and calls["_open"] == 30
    assert src.shards == [f"gs://bucket/wds/shard-{s:03d}.tar" for s in range(30)]
    src = pickle.loads(pickle.dumps(src))  # as grain hands it to a worker process
    assert _captions(src) == [f"caption {k}" for k in range(30)]
    assert src.probe(0)["size"] == (48, 64)
    folder = sources.WebDatasetSource("gs://bucket/wds", 10**6)  # top-level shards only
    assert folder.shards == src.shards
    nested = sources.WebDatasetSource("gs://bucket/wds/*/shard-1*.tar", 10**6)
    assert _captions(nested) == ["caption 100"]
    with pytest.raises(FileNotFoundError, match=r"1 shards named by .*gs://bucket/wds/shard-030.tar"):
        sources.WebDatasetSource("gs://bucket/wds/shard-{000..030}.tar", 10**6)
    with pytest.raises(FileNotFoundError, match=r"no .tar shards at data.path='gs://bucket/none'.*glob"):
        sources.WebDatasetSource("gs://bucket/none", 10**6)
    it = _make(_config("webdataset", "gs://bucket/wds/shard-{000..019}.tar"))
    assert it.bucket_counts() == {(32, 32): 20}
    assert next(it)["image"].shape == (G, 32, 32, 3)


def test_array_record_index_read_from_gcs(fake_gcs):
    # Only the index: the array_record reader (C++) opens gs:// itself, not through fsspec's fake bucket.
    root = epath.Path("gs://bucket/data/photos_ar")
    index = {"format": prepare.FORMAT, "shards": ["shard-00000.array_record"], "count": 3, "skipped": {}}
    (root / "index.json").write_text(json.dumps(index))
    buf = io.BytesIO()
    np.save(buf, np.array([[48, 64], [40, 40], [64, 48]], np.int32))
    (root / "sizes.npy").write_bytes(buf.getvalue())
    src = pickle.loads(pickle.dumps(sources.from_config(_config("array_record", root))))
    assert len(src) == 3 and src.probe(2) == {"size": (64, 48)} and not src.encoded
    assert src.paths == ["gs://bucket/data/photos_ar/shard-00000.array_record"]
    with pytest.raises(FileNotFoundError, match="gs://bucket/data/missing/index.json not found.*prepare"):
        sources.ArrayRecordSource("gs://bucket/data/missing")


def test_gcs_paths_that_cannot_work_say_what_to_do(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="Mount the bucket with gcsfuse.*data.path=/gcs/BUCKET"):
        sources.from_config(_config("folder", "gs://bucket/photos"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.jpg").write_bytes(_good_jpeg())
    (tmp_path / "in" / "one.txt").write_text("one")
    with pytest.raises(SystemExit) as exit_:
        prepare.main(["--input=in", "--out=gs://bucket/data/photos_ar"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "gsutil -m cp -r /local/disk/photos_ar gs://bucket/data/" in err
    assert "--config.data.path=gs://bucket/data/photos_ar" in err
    with pytest.raises(SystemExit):  # refused before the config (which does not exist) is loaded
        prepare.main(["--encode", "--input=in", "--out=gs://bucket/enc", "--config=missing.py"])
    with pytest.raises(ValueError, match="local disk only"):
        prepare.prepare("in", "gs://bucket/data/photos_ar")
    assert os.listdir(tmp_path) == ["in"]  # no folder named "gs:"


def test_prepare_array_record_reproduces_the_folder_batches(corpus, tmp_path):
    out = tmp_path / "ar"
    assert (
        prepare.main(
            [f"--input={corpus}", f"--out={out}", "--records_per_shard=5", "--max_image_pixels=40000"]
        )
        == 0
    )
    index = json.loads((out / "index.json").read_text())
    # prepare decodes everything, so the truncated file is caught here; size rules are the trainer's.
    assert index["count"] == 13 and len(index["shards"]) == 3
    assert index["skipped"] == dict(empty_file=1, not_an_image=2, missing_caption=1, empty_caption=1,
                                    caption_not_utf8=1, too_many_pixels=1, decode_error=1)  # fmt: skip
    ar = _make(_config("array_record", out))
    assert {k: v for k, v in ar.skip_counts().items() if v} == {"too_small": 1, "extreme_aspect": 1}
    assert ar.bucket_counts() == {(32, 32): 11}
    # The same examples through the folder source (without the truncated file) give identical batches.
    os.remove(corpus / "truncated.jpg")
    folder = _make(_config("folder", corpus))
    for _ in range(2):
        a, b = next(ar), next(folder)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    rec = prepare.encode_record(b"\x89PNG", "hi", (3, 4), 6.5)
    assert prepare.decode_record(rec) == dict(image=b"\x89PNG", caption="hi", aesthetic_score=6.5)


def test_tfds_source_through_data_source(monkeypatch):
    import tensorflow_datasets as tfds

    calls = {}
    examples = [dict(image=_good_jpeg(seed=i), caption=f"tfds {i}".encode()) for i in range(5)]
    examples.append(dict(image=_good_jpeg(seed=9), caption=b""))

    def fake_data_source(name, **kw):
        calls.update(name=name, **kw)
        return examples

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    it = _make(_config("tfds", "my_dataset", tfds_data_dir="/tmp/x", tfds_caption_key="caption"))
    assert calls["name"] == "my_dataset" and calls["data_dir"] == "/tmp/x" and calls["download"] is False
    assert isinstance(calls["decoders"]["image"], tfds.decode.SkipDecoding)
    assert it.skip_counts()["empty_caption"] == 1 and it.bucket_counts() == {(32, 32): 5}
    assert next(it)["image"].shape == (G, 32, 32, 3)


def test_source_errors_tell_the_user_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="needs data.path"):
        sources.from_config(_config("folder", ""))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        sources.from_config(_config("folder", tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="sdxl_jax.data.prepare"):
        sources.from_config(_config("array_record", tmp_path))
    with pytest.raises(ValueError, match="unknown data.source"):
        sources.from_config(_config("parquet", tmp_path))
    (tmp_path / "one.jpg").write_bytes(_good_jpeg())
    (tmp_path / "one.txt").write_text("one")
    with pytest.raises(ValueError, match="only 1 usable examples"):
        _make(_config("folder", tmp_path))
    assert decode.SKIP_REASONS  # every reason the tests count is a declared reason
