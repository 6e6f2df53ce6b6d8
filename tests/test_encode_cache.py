"""The latent / text-embedding cache: data/cache.py, data/encode_cache.py, prepare --encode, and the
cached path of the training iterator and train step's conditioning."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from configs import common
from sdxl_jax import conditioning, parallel, tokenizer, train_state
from sdxl_jax.data import cache, encode_cache, prepare
from sdxl_jax.data import iterator as iterator_lib


def test_record_round_trip_keeps_arrays_sizes_and_dtypes():
    rng = np.random.default_rng(0)
    arrays = {
        "latents": rng.standard_normal((4, 6, 4)).astype(np.float32),
        "text_g": rng.standard_normal((77, 8)).astype(ml_dtypes.bfloat16),
        "pooled_g": rng.standard_normal((8,)).astype(np.float16),
    }
    sizes = {"original_size": (300, 200), "crop_coords_top_left": (5, 0), "target_size": (48, 32)}
    out = cache.decode_record(cache.encode_record(arrays, "a red çircle", sizes, 5.5))
    assert out["caption"] == "a red çircle" and out["aesthetic_score"] == 5.5
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)
    for k, v in sizes.items():
        np.testing.assert_array_equal(out[k], v)
    with pytest.raises(ValueError, match="prepare --encode"):
        cache.decode_record(prepare.encode_record(b"xx", "c", (1, 1)))


def _text_encodings(cfg, params, batch):
    model = conditioning.Conditioner(cfg)
    return model.apply({"params": params}, batch["ids_l"], batch["ids_g"], method=encode_cache.text_encodings)


@pytest.mark.parametrize("preset", ["tiny_base", "tiny_refiner"])
def test_cached_conditioning_equals_the_conditioner_with_the_same_dropout(preset):
    # High rates so that some rows of each embedder are dropped and others kept.
    cfg = conditioning.PRESETS[preset].replace(ucg_rate_text=0.5, ucg_rate_size=0.3)
    params = conditioning.init_params(cfg, jax.random.PRNGKey(0))
    b = 16
    rng = np.random.default_rng(1)
    batch = conditioning.dummy_batch(cfg, b)
    batch["ids_l"] = rng.integers(0, 49408, (b, 77)).astype(np.int32)
    batch["ids_g"] = rng.integers(0, 49408, (b, 77)).astype(np.int32)
    for k in cfg.size_keys:
        batch[k] = rng.integers(0, 1024, batch[k].shape).astype(batch[k].dtype)
    ucg = jax.random.PRNGKey(7)
    want = conditioning.Conditioner(cfg).apply({"params": params}, batch, ucg_rng=ucg)
    cached = {**{k: batch[k] for k in cfg.size_keys}, **_text_encodings(cfg, params, batch)}
    got = cache.conditioning(cfg, cached, ucg)
    assert got["crossattn"].dtype == want["crossattn"].dtype and got["vector"].dtype == jnp.float32
    np.testing.assert_allclose(got["crossattn"], want["crossattn"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["vector"], want["vector"], rtol=1e-6, atol=1e-6)
    dropped = np.all(np.asarray(got["crossattn"]) == 0, axis=(1, 2))
    assert 0 < dropped.sum() < b  # the dropout happened per sample, not for the whole batch
    nodrop = cache.conditioning(cfg, cached, None)
    assert not np.any(np.all(np.asarray(nodrop["crossattn"]) == 0, axis=(1, 2)))


def _config(path):
    c = common.base()
    common.smoke(c, resolution=32)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.data.update(dict(source="array_record", path=str(path), batch_size=2, random_crop=False, shuffle=False))
    return c


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    folder = root / "images"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 32), (32, 48), (64, 64), (33, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a red circle number {i}")
    prepare.prepare(str(folder), str(root / "ar"), log=lambda *_: None)
    config = _config(root / "ar")
    setup = train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
    frozen = train_state.init_frozen_params(setup, config)
    tok = tokenizer.load_pair(path=None)
    summary = encode_cache.encode(str(root / "ar"), str(root / "enc"), config, frozen, batch_size=4,
                                  tokenizer=tok, log=lambda *_: None)  # fmt: skip
    return dict(root=root, config=config, setup=setup, frozen=frozen, tok=tok, summary=summary)


def test_encode_writes_latents_and_text_of_the_centre_crop(encoded):
    root, config, setup, frozen = (encoded[k] for k in ("root", "config", "setup", "frozen"))
    assert encoded["summary"]["count"] == 4 and encoded["summary"]["buckets"] == [[32, 32]]
    from sdxl_jax.data import sources

    src = sources.ArrayRecordSource(str(root / "enc"))
    assert src.encoded and len(src) == 4
    rec = next(src.load(i) for i in range(4) if src.load(i)["caption"].endswith("1"))
    # 32x48 image -> resized to 32x48, centre crop left 8 in the 32x32 bucket (SDXL sec. 2.2 conditioning).
    np.testing.assert_array_equal(rec["original_size"], (32, 48))
    np.testing.assert_array_equal(rec["crop_coords_top_left"], (0, 8))
    np.testing.assert_array_equal(rec["target_size"], (32, 32))
    # Recompute with batch size 1: same posterior draw (seeded per example), same centre crop pixels.
    img = np.asarray(Image.open(root / "images" / "1.png").convert("RGB"), np.float32)[:, 8:40] / 127.5 - 1
    ids = encoded["tok"]([rec["caption"]])
    enc = encode_cache.make_encoder(setup.models)
    out = enc(frozen, img[None], ids["ids_l"], ids["ids_g"], np.asarray([1], np.int32))
    for k in ("latents", "text_l", "text_g", "pooled_g"):
        np.testing.assert_allclose(rec[k], np.asarray(out[k])[0], rtol=1e-4, atol=1e-4, err_msg=k)
    assert np.std(rec["latents"]) > 0.0


def test_training_iterator_serves_cached_batches(encoded):
    config = encoded["config"]
    config.data.path = str(encoded["root"] / "enc")
    it = iterator_lib.make_train_iterator(config.data, seed=0, global_batch_size=2, process_index=0,
                                          process_count=1, tokenizer=lambda c: 1 / 0)  # fmt: skip
    batch = next(it)
    want = cache.example_batch(encoded["setup"].models.conditioner.config, 4, 8, 2, 32, 32)
    assert sorted(batch) == sorted(want)
    for k, v in want.items():
        assert batch[k].shape == v.shape and batch[k].dtype == v.dtype, k
    np.testing.assert_array_equal(batch["target_size"], [[32, 32], [32, 32]])
    it.close()
    # A run whose data config differs from the encoding's is told what to do, not fed wrong latents.
    config.data.resolution = 64
    it = iterator_lib.make_train_iterator(config.data, seed=0, global_batch_size=2, process_index=0,
                                          process_count=1, tokenizer=lambda c: 1 / 0)  # fmt: skip
    with pytest.raises(ValueError, match="encode again"):
        next(it)


def test_encode_the_configs_own_shapes_source_with_the_runs_frozen_weights(tmp_path):
    """`prepare --encode` without --input encodes the config's data source (the embedded default's
    shapes), with exactly the frozen weights a fresh run of that config starts with (here the seed's
    random init: the config names no vae_from / text_from)."""
    import json

    out = tmp_path / "enc"
    assert prepare.main(["--encode", "--config=configs/shapes.py", "--config_arg=smoke", f"--out={out}",
                         "--set", "data.shapes_num_examples=12", "--encode_batch_size=8"]) == 0
    with open(out / "index.json") as f:
        summary = json.load(f)
    assert summary["count"] == 12 and summary["source"] == "data.source=shapes"
    from configs import shapes
    from sdxl_jax import train_lib
    from sdxl_jax.data import sources

    config = shapes.get_config("smoke")
    config.data.shapes_num_examples = 12
    setup = train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
    frozen = train_lib.initial_frozen(setup, config)
    src = sources.ArrayRecordSource(str(out))
    rec = src.load(3)
    ids = tokenizer.load_pair(path=None)([rec["caption"]])
    text = _text_encodings(setup.models.conditioner.config, frozen["text"], ids)
    np.testing.assert_allclose(rec["text_g"], np.asarray(text["text_g"])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rec["pooled_g"], np.asarray(text["pooled_g"])[0], rtol=1e-5, atol=1e-5)
    assert rec["latents"].shape == (8, 8, 4) and np.std(rec["latents"]) > 0
    # A different seed gives other random text encoders: the comparison above can fail.
    other = train_state.init_frozen_params(setup, _with_seed(config, 1))
    moved = _text_encodings(setup.models.conditioner.config, other["text"], ids)
    assert np.max(np.abs(np.asarray(moved["text_g"])[0] - rec["text_g"])) > 1e-2


def _with_seed(config, seed):
    c = config.copy_and_resolve_references()
    c.seed = seed
    return c


def test_encode_refuses_a_bucket_out_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"gsutil -m cp -r /local/disk/enc gs://bucket/"):
        encode_cache.encode("", "gs://bucket/enc", config=None, frozen=None)
    assert os.listdir(tmp_path) == []  # no folder named "gs:"
