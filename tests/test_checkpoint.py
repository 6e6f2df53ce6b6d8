"""Checkpointer: round trip with shardings, keep-N, fall back past a corrupt newest step, load_params."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from sdxl_jax import checkpoint, parallel
from sdxl_jax.train_state import TrainState


def _mesh():
    c = common.base()
    c.mesh.update(data=2, fsdp=4)
    return parallel.make_mesh(c.mesh)


def _state(mesh, step, scale=1.0):
    fsdp = NamedSharding(mesh, P(None, "fsdp"))
    rep = NamedSharding(mesh, P())
    w = jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(4, 8) * scale, fsdp)
    b = jax.device_put(jnp.ones((8,)) * scale, rep)
    params = {"w": w, "b": b}
    return TrainState(
        step=jax.device_put(jnp.asarray(step, jnp.int32), rep),
        params=params,
        opt_state={"mu": jax.tree.map(lambda x: x * 0.5, params), "count": jnp.asarray(step)},
        ema_params=jax.tree.map(lambda x: x + 100.0, params),
        rng=jax.random.PRNGKey(step),
    )


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_round_trip_keeps_values_shardings_and_data_state(tmp_path):
    mesh = _mesh()
    ck = checkpoint.Checkpointer(str(tmp_path), keep=2)
    state = _state(mesh, 3)
    data_state = {"step": 3, "blob": b"\x00\xffgrain"}
    assert ck.save(3, state, data_state, common.base())
    ck.wait()
    restored, ds, step = ck.restore_latest(_abstract(_state(mesh, 0)))
    ck.close()
    assert step == 3 and ds == data_state
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.params["w"].sharding.spec == P(None, "fsdp")


def test_keeps_newest_n_and_falls_back_past_a_corrupt_newest(tmp_path, capsys):
    mesh = _mesh()
    ck = checkpoint.Checkpointer(str(tmp_path), keep=2)
    for s in (1, 2, 3):
        ck.save(s, _state(mesh, s, scale=s), {"step": s}, common.base())
    ck.wait()
    assert ck.steps() == [2, 3]
    # Corrupt step 3: remove the array data of its params (a half-deleted / damaged checkpoint).
    victims = [
        p
        for p in glob.glob(str(tmp_path / "checkpoints" / "3" / "params" / "**"), recursive=True)
        if os.path.isfile(p) and "metadata" not in os.path.basename(p)
    ]
    assert victims
    for p in victims:
        os.remove(p)
    restored, ds, step = ck.restore_latest(_abstract(_state(mesh, 0)))
    ck.close()
    assert step == 2 and ds == {"step": 2}
    np.testing.assert_array_equal(np.asarray(restored.params["b"]), np.full((8,), 2.0))
    assert "checkpoint step 3 is unreadable" in capsys.readouterr().out


def test_no_checkpoint_restores_none(tmp_path):
    ck = checkpoint.Checkpointer(str(tmp_path), keep=1)
    assert ck.restore_latest(_abstract(_state(_mesh(), 0))) is None
    ck.close()


def test_load_params_for_sampling(tmp_path):
    mesh = _mesh()
    config = common.base()
    config.seed = 17
    checkpoint.write_config(str(tmp_path), config)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=1)
    ck.save(5, _state(mesh, 5), None, config)
    ck.close()
    checkpoint.save_frozen(
        str(tmp_path), {"vae": {"k": np.ones((2, 3), np.float32)}, "text": {"e": np.zeros(4)}}
    )
    loaded_config, params = checkpoint.load_params(str(tmp_path))
    assert loaded_config.seed == 17 and loaded_config.model.unet == "sdxl_base"
    np.testing.assert_array_equal(np.asarray(params["unet"]["b"]), np.full((8,), 101.0))  # EMA
    _, raw = checkpoint.load_params(str(tmp_path), which="raw")
    np.testing.assert_array_equal(np.asarray(raw["unet"]["b"]), np.ones((8,)))
    np.testing.assert_array_equal(np.asarray(params["vae"]["k"]), np.ones((2, 3)))
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="holds no checkpoint"):
        checkpoint.load_params(str(tmp_path / "nothing_here"))


def test_a_run_that_switches_mu_dtype_resumes_with_its_own_dtype(tmp_path):
    """optim.mu_dtype changed between runs of one workdir (e.g. bfloat16 to fit a 16 GiB chip): the fp32
    first moment of the checkpoint is restored as the new run's bf16."""
    mesh = _mesh()
    ck = checkpoint.Checkpointer(str(tmp_path), keep=2)
    state = _state(mesh, 3)
    assert ck.save(3, state, None, common.base())
    ck.wait()
    target = _abstract(_state(mesh, 0))
    to_bf16 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding)
    mu = jax.tree.map(to_bf16, target.opt_state["mu"])
    target = target.replace(opt_state={**target.opt_state, "mu": mu})
    restored, _, _ = ck.restore_latest(target)
    ck.close()
    mu = restored.opt_state["mu"]["w"]
    assert mu.dtype == jnp.bfloat16 and mu.sharding.spec == P(None, "fsdp")
    np.testing.assert_allclose(np.asarray(mu, np.float32), np.asarray(state.opt_state["mu"]["w"]), rtol=2**-8)
    assert restored.params["w"].dtype == jnp.float32


def test_a_layout_converting_restore_frees_each_transformer_as_it_goes(monkeypatch):
    """checkpoint._in_layout_of (restore_latest / restore_params into the other block layout) converts one
    SpatialTransformer's params at a time and frees the restored source as it goes: live device memory never
    holds the converted state next to the whole restored one (the base's state on one H100 is 38.3 GiB;
    two would not fit). Exact values, the abstract target's structure and shardings."""
    import dataclasses

    import flax.linen as nn

    from sdxl_jax.models import unet as unet_lib

    mesh, config = _mesh(), common.base()
    unet = dataclasses.replace(unet_lib.PRESETS["tiny"], transformer_depth=(0, 3), mid_transformer_depth=2)
    boxed = unet_lib.abstract_params(unet)
    shardings = parallel.logical_shardings(boxed, mesh, config, check_large=False)
    rng = np.random.default_rng(0)
    host = {k: jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), nn.meta.unbox(boxed))
            for k in ("params", "ema_params", "mu")}
    restored = {k: jax.device_put(v, shardings) for k, v in host.items()}  # as stored: unrolled
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    like = {k: unet_lib.relayout(abstract, True) for k in host}  # the run wants the scan
    groups = [g for g in jax.tree.leaves(host, is_leaf=unet_lib.holds_blocks) if unet_lib.holds_blocks(g)]
    live = lambda: sum(a.nbytes for a in jax.live_arrays())
    before, seen = live(), []
    convert = checkpoint._relayout_group

    def watched(*args):
        out = convert(*args)
        seen.append(live() - before)
        return out

    monkeypatch.setattr(checkpoint, "_relayout_group", watched)
    got = checkpoint._in_layout_of(restored, like)
    assert len(seen) == len(groups) == 3 * 6  # 2 down, 1 mid, 3 up transformers in each of the 3 trees
    assert max(seen) <= 0 and live() <= before, seen  # each source freed once converted
    assert all(x.is_deleted() for g in jax.tree.leaves(restored, is_leaf=unet_lib.holds_blocks)
               if unet_lib.holds_blocks(g) for x in jax.tree.leaves(g))
    want = unet_lib.relayout(host, True)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y, a in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(like), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
        assert x.sharding == a.sharding
