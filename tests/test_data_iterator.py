"""sdxl_jax.data.make_train_iterator: determinism, exact resume, host sharding, schedule, grain workers."""

import json

import numpy as np
import pytest

from configs import common
from sdxl_jax import tokenizer as tokenizer_lib
from sdxl_jax.data import iterator as iterator_lib
from sdxl_jax.data import pipeline, shapes

G = 8


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.load_pair(path=None)


def _config(**kw):
    c = common.data()
    c.update(dict(source="shapes", shapes_num_examples=160, shapes_min_side=16, shapes_max_side=96))
    c.update(
        dict(buckets="generated", resolution=32, bucket_side_step=16, bucket_min_side=16, bucket_max_side=64)
    )
    c.update(dict(random_crop=True, random_flip=True, num_workers=0, prefetch=1))
    c.update(kw)
    return c


def _make(tok, config=None, **kw):
    args = dict(seed=0, global_batch_size=G, process_index=0, process_count=1, tokenizer=tok)
    args.update(kw)
    return iterator_lib.make_train_iterator(config or _config(), **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_follow_the_contract(tok):
    it = _make(tok)
    assert len(it.bucket_counts()) >= 2  # the test exercises several buckets
    specs = {spec["image"][0][1:3]: spec for spec in it.batch_shapes()}
    seen = set()
    for batch in _take(it, 12):
        bucket = tuple(batch["target_size"][0])
        seen.add(bucket)
        assert (batch["target_size"] == bucket).all()  # one bucket per batch
        spec = specs[bucket]
        assert set(batch) == set(spec)
        for k, (shape, dtype) in spec.items():
            assert batch[k].shape == shape and batch[k].dtype == dtype, k
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].std() > 0.1
        assert (batch["aesthetic_score"] == 6.0).all()
        assert (batch["ids_l"][:, 0] == tokenizer_lib.BOS_ID).all()
    assert len(seen) >= 2
    assert {s["image"][0] for s in pipeline.batch_shapes(_config(), 16)} >= {(16, h, w, 3) for h, w in seen}


def test_rows_carry_their_own_captions_and_conditioning(tok):
    config = _config()
    it = _make(tok, config)
    loader = it._loader
    src = shapes.ShapesSource(160, min_side=16, max_side=96)
    for step in range(3):
        bucket, ids = loader.example_ids(step)
        batch = next(it)
        captions = [src.load(int(i))["caption"] for i in ids]
        np.testing.assert_array_equal(batch["ids_l"], tok(captions)["ids_l"])
        np.testing.assert_array_equal(batch["ids_g"], tok(captions)["ids_g"])
        sizes = np.array([src.probe(int(i))["size"] for i in ids])
        np.testing.assert_array_equal(batch["original_size"], sizes)
        bh, bw = loader.table[bucket]
        for (h, w), (top, left) in zip(sizes, batch["crop_coords_top_left"], strict=True):
            rh, rw = pipeline.process.cover_size(h, w, bh, bw)
            assert 0 <= top <= rh - bh and 0 <= left <= rw - bw


def test_determinism_and_seed(tok):
    _assert_same(_take(_make(tok), 4), _take(_make(tok), 4))
    a, b = next(_make(tok)), next(_make(tok, seed=1))
    assert not np.array_equal(a["original_size"], b["original_size"])


def test_exact_resume_from_state_and_from_start_step(tok):
    it = _make(tok)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    assert state["step"] == 3
    expected = _take(it, 3)
    resumed = _make(tok)
    next(resumed)  # a live iterator at another position is rewound by set_state
    resumed.set_state(state)
    _assert_same(_take(resumed, 3), expected)
    _assert_same(_take(_make(tok, start_step=3), 3), expected)
    with pytest.warns(UserWarning, match="another dataset"):
        _make(tok, seed=5).set_state(state)


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_draw_the_same_bucket_and_disjoint_rows(tok, hosts):
    config = _config()
    single = _make(tok, config)
    its = [_make(tok, config, process_index=p, process_count=hosts) for p in range(hosts)]
    for step in range(40):  # indices only: cheap, and spans several bucket epochs
        b1, ids1 = single._loader.example_ids(step)
        parts = [it._loader.example_ids(step) for it in its]
        assert all(b == b1 for b, _ in parts)
        ids = np.concatenate([i for _, i in parts])
        assert len(set(ids.tolist())) == G  # disjoint across hosts and distinct within the batch
        np.testing.assert_array_equal(ids, ids1)  # the global batch does not depend on the host count
    for _ in range(2):  # and the decoded rows are the single-host batch, split
        whole = next(single)
        local = [next(it) for it in its]
        assert all(b["image"].shape[0] == G // hosts for b in local)
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([b[k] for b in local]), whole[k], err_msg=k)


def test_schedule_is_weighted_by_bucket_size_and_chunk_exact():
    counts = np.array([10, 0, 30, 60])
    sched = pipeline.Schedule(counts, seed=3)
    steps = 3 * pipeline._SCHEDULE_CHUNK + 17
    drawn = [sched.lookup(s) for s in range(steps)]
    buckets = np.array([b for b, _ in drawn])
    freq = np.bincount(buckets, minlength=4) / steps
    np.testing.assert_allclose(freq, counts / counts.sum(), atol=0.02)
    seen = np.zeros(4, int)
    for b, k in drawn:  # k = how many times b was drawn before: exact across chunk boundaries
        assert k == seen[b]
        seen[b] += 1
    fresh = pipeline.Schedule(counts, seed=3)
    assert fresh.lookup(steps - 1) == drawn[-1]  # random access equals sequential


def test_one_epoch_of_a_bucket_visits_distinct_examples(tok):
    config = _config(buckets="square", shapes_num_examples=37)
    it = _make(tok, config)
    assert it.steps_per_epoch() == 37 // G
    ids = np.concatenate([it._loader.example_ids(s)[1] for s in range(it.steps_per_epoch())])
    assert len(set(ids.tolist())) == len(ids) == 4 * G
    nxt = np.concatenate([it._loader.example_ids(s)[1] for s in range(4, 8)])
    assert set(nxt.tolist()) != set(ids.tolist())  # the next epoch is reshuffled (the 5 left over rotate in)


def test_grain_workers_give_the_same_batches(tok):
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    it = _make(tok, _config(num_workers=2))
    try:
        got = _take(it, 3)
        state = it.get_state()
    finally:
        it.close()
    _assert_same(got, _take(_make(tok), 3))
    assert state["step"] == 3


def test_orbax_checkpoint_through_grains_handler(tok, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = _make(tok)
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        expected = _take(it, 2)
        restored = _make(tok)
        mgr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same(_take(restored, 2), expected)
