"""Autoencoder training (config.task="autoencoder") through train_lib on the 8 fake CPU devices.

configs/autoencoder.py:smoke at 32x32 with the tiny VAE and the tiny PatchGAN: the losses and the
discriminator schedule through the real step, EMA, exact resume, a diffusion stage loading the EMA VAE
with vae_from, and the exporter. Every run shares one compiled step (same config, same mesh).
"""

import json
import os

import jax
import numpy as np
import pytest

from configs import autoencoder, stage1_256
from sdxl_jax import checkpoint, config_lib, convert, train_lib, train_state
from sdxl_jax.autoencoder import export, trainer

DISC_START = 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def _config(cache_dir):
    c = autoencoder.get_config("smoke")
    c.compilation_cache_dir = cache_dir
    c.data.resolution = 32
    c.total_steps = 8
    c.checkpoint_every = 4
    c.sample_every = 4
    c.autoencoder.disc_start = DISC_START
    c.autoencoder.preview_images = 8
    return c


def _jsonl(path):
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec  # a resumed run rewrites the steps after its checkpoint
    return out


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _differ(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
    workdir = str(tmp_path_factory.mktemp("ae"))
    train_lib.train_and_evaluate(_config(cache_dir), workdir)
    return workdir


@pytest.fixture(scope="module")
def initial(cache_dir):
    """The freshly initialised state of the run (the Setup and its init program are cached by train_lib)."""
    config = _config(cache_dir)
    mesh = train_lib.parallel.make_mesh(config.mesh, jax.devices())
    setup, _ = train_lib._setup_and_steps(config, mesh)
    state, frozen = trainer.initial_state(setup, config)
    return jax.tree.map(np.asarray, jax.device_get(state.params)), frozen


def test_losses_are_logged_and_reconstruction_improves(full_run):
    m = _jsonl(os.path.join(full_run, "metrics.jsonl"))
    assert sorted(m) == list(range(1, 9))
    for rec in m.values():
        for key in ("loss", "nll", "kl", "rec_l1", "rec_mse", "g_loss", "d_loss", "d_weight", "grad_norm"):
            assert np.isfinite(rec[key]), (key, rec)
        assert rec["kl"] > 0 and rec["skipped_nonfinite"] == 0
    ev = _jsonl(os.path.join(full_run, "eval.jsonl"))
    assert sorted(ev) == [4, 8]
    # The same 8 held-out images, reconstructed with the EMA weights (what vae_from and export use) after 4
    # and after 8 updates: their L1, the objective's reconstruction term, falls; the raw weights oscillate
    # once the discriminator starts. The training reconstruction loss (nll) must fall as well. Measured
    # over config seeds 0, 1, 2 with each init PRNG (session 20), EMA L1 after 4 -> 8 updates: threefry
    # 0.485 -> 0.399, 0.573 -> 0.532, 0.601 -> 0.536; models/init_rng.py 0.496 -> 0.487, 0.393 -> 0.386,
    # 0.665 -> 0.491. PSNR, which the objective does not hold (MSE), rose by more than 0.5 dB in five of
    # the six and fell by 0.25 dB in one (init_rng, seed 0: this run), so it is not asserted.
    assert ev[8]["l1_ema"] < ev[4]["l1_ema"], ev
    assert np.mean([m[s]["nll"] for s in (6, 7, 8)]) < np.mean([m[s]["nll"] for s in (1, 2, 3)])
    assert [f for f in os.listdir(os.path.join(full_run, "samples")) if f.endswith("_recon.png")]
    assert os.listdir(os.path.join(full_run, "tensorboard"))


def test_discriminator_is_inactive_before_disc_start(full_run, initial):
    m = _jsonl(os.path.join(full_run, "metrics.jsonl"))
    for s in range(1, 9):  # metrics of step s come from the update at state.step = s - 1
        active = s - 1 >= DISC_START
        assert m[s]["disc_active"] == float(active)
        if not active:
            assert m[s]["d_loss"] == 0.0 and m[s]["disc_grad_norm"] == 0.0
        else:
            assert m[s]["d_loss"] > 0 and m[s]["disc_grad_norm"] > 0
        # The generator objective holds the adversarial term only from disc_start on.
        g = m[s]["d_weight"] * m[s]["g_loss"] if active else 0.0
        np.testing.assert_allclose(m[s]["loss"], m[s]["nll"] + 1e-6 * m[s]["kl"] + g, rtol=1e-5)
    init_params, _ = initial
    at4, _ = checkpoint.restore_params(full_run, "params", step=4)
    at8, _ = checkpoint.restore_params(full_run, "params", step=8)
    for x, y in zip(_leaves(at4["disc"]), _leaves(init_params["disc"]), strict=True):
        np.testing.assert_array_equal(x, y)  # untouched, not even by weight decay
    assert _differ(at8["disc"], at4["disc"]) and _differ(at4["vae"], init_params["vae"])


def test_ema_differs_from_raw_and_is_what_load_params_returns(full_run):
    raw, _ = checkpoint.restore_params(full_run, "params")
    ema, _ = checkpoint.restore_params(full_run, "ema_params")
    assert set(ema) == {"vae"} and set(raw) == {"vae", "disc"}
    diffs = [np.max(np.abs(x - y)) for x, y in zip(_leaves(raw["vae"]), _leaves(ema["vae"]), strict=True)]
    assert max(diffs) > 1e-4
    ev = _jsonl(os.path.join(full_run, "eval.jsonl"))[8]
    assert ev["l1_ema"] != ev["l1_raw"]
    config, params = checkpoint.load_params(full_run, which="ema")
    assert config.task == "autoencoder" and params["unet"] is None
    for x, y in zip(_leaves(params["vae"]), _leaves(ema["vae"]), strict=True):
        np.testing.assert_array_equal(x, y)


class _Crash(Exception):
    pass


def test_killed_and_restarted_reproduces_the_run(full_run, cache_dir, tmp_path):
    workdir = str(tmp_path)

    def crash(step, state):
        if step == 6:  # after the checkpoint at 4: steps 5 and 6 are lost and redone
            raise _Crash

    with pytest.raises(_Crash):
        train_lib.train_and_evaluate(_config(cache_dir), workdir, after_step=crash)
    train_lib.train_and_evaluate(_config(cache_dir), workdir)
    want = _jsonl(os.path.join(full_run, "metrics.jsonl"))
    got = _jsonl(os.path.join(workdir, "metrics.jsonl"))
    for s in (5, 6, 7, 8):
        for key in ("loss", "d_loss", "d_weight"):
            assert got[s][key] == want[s][key], (s, key)
    a, _ = checkpoint.restore_params(full_run, "ema_params")
    b, _ = checkpoint.restore_params(workdir, "ema_params")
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_diffusion_stage_loads_the_ema_vae_with_vae_from(full_run, cache_dir):
    c = stage1_256.get_config("smoke")
    c.vae_from = full_run
    c.compilation_cache_dir = cache_dir
    config_lib.validate(c, num_devices=1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    setup = train_state.make_setup(c, mesh)
    _, frozen = train_lib.initial_state(setup, c)
    ema, _ = checkpoint.restore_params(full_run, "ema_params")
    for x, y in zip(_leaves(frozen["vae"]), _leaves(ema["vae"]), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fmt", ["diffusers", "sgm"])
def test_export_round_trips_the_ema_vae(full_run, tmp_path, fmt):
    out = str(tmp_path / ("vae" if fmt == "diffusers" else "vae.safetensors"))
    assert export.main([full_run, out, "--format", fmt]) == 0
    vae, params = convert.load_vae(out)
    ema, _ = checkpoint.restore_params(full_run, "ema_params")
    assert vae.config.ch == 32 and vae.config.scaling_factor == pytest.approx(0.13025)
    for x, y in zip(_leaves(params), _leaves(ema["vae"]), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.autoencoder.__setattr__("discriminator", "huge"), "discriminator='huge' is not a"),
        (lambda c: c.autoencoder.__setattr__("perceptual_weight", 1.0), "needs config.autoencoder.lpips"),
        (lambda c: c.__setattr__("task", "autoencoders"), "config.task='autoencoders' is not one of"),
    ],
)
def test_bad_autoencoder_configs_fail_validation(change, message):
    c = autoencoder.get_config("smoke")
    change(c)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c, num_devices=8)
