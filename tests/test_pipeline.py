"""pipeline: parity with diffusers' StableDiffusionXLPipeline (tiny random components, one diffusers folder
loaded by both), the refiner hand-off numbers, img2img, and a sharded batch job with kill + resume."""

import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from bench.torch_reference import SIZE_EMBED, build_diffusers_sdxl  # noqa: E402
from sdxl_jax import pipeline, sample_lib  # noqa: E402
from sdxl_jax.convert.common import CheckpointError  # noqa: E402
from sdxl_jax.diffusion import schedule  # noqa: E402
from sdxl_jax.models import unet as unet_lib  # noqa: E402
from sdxl_jax.models import vae as vae_lib  # noqa: E402

PROMPTS = ["a red circle on a blue background", "A YELLOW square, on green!!"]
HEIGHT = WIDTH = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # One thread: torch's thread pool thrashes on a small, shared CPU (the tiny UNet is launch-bound).
    torch.set_num_threads(1)
    folder = str(tmp_path_factory.mktemp("sdxl_tiny"))
    torch_pipe = build_diffusers_sdxl(folder)
    # One device: these tests compare numbers; the 8-device batch job loads its own.
    return folder, torch_pipe, pipeline.load(folder, devices=jax.local_devices()[:1])


def test_tokenize_and_encode_prompt(tiny):
    folder, torch_pipe, pipe = tiny
    ids_l, ids_g = pipe.tokenize(PROMPTS)
    ref_l = torch_pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    ref_g = torch_pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ids_l, np.asarray(ref_l))
    np.testing.assert_array_equal(ids_g, np.asarray(ref_g))
    assert ids_l.dtype == np.int32 and ids_g[0, -1] == 0 and ids_l[0, -1] == 49407  # per-encoder padding

    cond = pipe.encode_prompt(
        PROMPTS, original_size=(HEIGHT, WIDTH), crop=(0, 0), target_size=(HEIGHT, WIDTH)
    )
    with torch.no_grad():
        emb, _, pooled, _ = torch_pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        time_ids = torch_pipe._get_add_time_ids(
            (HEIGHT, WIDTH), (0, 0), (HEIGHT, WIDTH), dtype=torch.float32, text_encoder_projection_dim=32
        )
        ref_vector = torch.cat(
            [
                pooled,
                torch_pipe.unet.add_time_proj(time_ids.flatten()).reshape(1, -1).repeat(len(PROMPTS), 1),
            ],
            -1,
        )
    np.testing.assert_allclose(np.asarray(cond["crossattn"]), emb.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(cond["vector"]), ref_vector.numpy(), atol=1e-5, rtol=1e-5)
    assert cond["crossattn"].shape == (2, 77, 64) and cond["vector"].shape == (2, 32 + 6 * SIZE_EMBED)


def test_parity_with_diffusers_euler_trailing_25_steps(tiny):
    """fp32, 25 steps, guidance 5, the same initial latents; diffusers' force_zeros_for_empty_prompt with no
    negative prompt is the reference's zeroed unconditional text."""
    folder, torch_pipe, pipe = tiny
    noise = np.random.default_rng(0).standard_normal((2, HEIGHT // 8, WIDTH // 8, 4)).astype(np.float32)
    # The same starting point x = noise * sqrt(1 + sigma_0^2) (SPEC.md, sgm): diffusers' Euler scheduler
    # starts "trailing" schedules at noise * sigma_0 instead (its init_noise_sigma), so hand it noise
    # pre-scaled by sqrt(1 + sigma_0^2) / sigma_0 (a 0.23% difference at sigma_0 = 14.6146).
    s0 = schedule.legacy_ddpm_sigmas(25)[0]
    torch_noise = noise * np.float32(np.sqrt(1 + s0**2) / s0)
    with torch.no_grad():
        ref = torch_pipe(
            prompt=PROMPTS,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=25,
            guidance_scale=5.0,
            latents=torch.from_numpy(torch_noise.transpose(0, 3, 1, 2)),
            output_type="latent",
        ).images
    # Same 25 timesteps: "trailing" spacing is sgm's legacy discretization.
    np.testing.assert_array_equal(
        torch_pipe.scheduler.timesteps.numpy().astype(int), schedule.legacy_ddpm_timesteps(25)
    )
    ref_z = ref.numpy().transpose(0, 2, 3, 1)
    z = np.asarray(pipe.generate_latents(PROMPTS, HEIGHT, WIDTH, 25, 5.0, "euler", seed=0, latents=noise))[:2]
    scale = np.abs(ref_z).max()
    err_z = np.abs(z - ref_z).max() / scale
    with torch.no_grad():
        ref_img = torch_pipe.vae.decode(ref / torch_pipe.vae.config.scaling_factor).sample
    ref_img = ref_img.numpy().transpose(0, 2, 3, 1)
    img = pipe.decode(z)
    err_img = np.abs(img - ref_img).max()
    print(f"parity: latents max|diff|/max|ref| = {err_z:.2e}, decoded images max|diff| = {err_img:.2e}")
    assert err_z < 1e-4, err_z
    assert err_img < 1e-4, err_img  # images in [-1, 1]
    u8 = pipe.generate(PROMPTS, HEIGHT, WIDTH, 25, 5.0, "euler", seed=0, latents=noise)
    ref_u8 = np.round(np.clip(ref_img / 2 + 0.5, 0, 1) * 255)
    assert u8.dtype == np.uint8 and u8.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(u8.astype(int) - ref_u8).max() <= 1


def test_refiner_handoff_numbers():
    sigmas = schedule.legacy_ddpm_sigmas(50)
    base, ref = schedule.split_for_refiner(sigmas, 0.15)
    assert len(base) - 1 == 44 and len(ref) - 1 == 6
    assert base[-1] == ref[0] == pytest.approx(0.3866, abs=1e-4)
    assert ref[0] == schedule.discrete_sigmas()[119] and ref[-1] == 0.0


def _spy(loop, name, calls):
    def run(params, x, sigmas, *args, **kwargs):
        calls.append((name, np.asarray(sigmas)))
        return loop(params, x, sigmas, *args, **kwargs)

    return run


def test_refiner_handoff_runs_the_split_schedule(tiny, tmp_path):
    folder, _, _ = tiny
    build_diffusers_sdxl(str(tmp_path / "refiner"), refiner=True)
    pipe = pipeline.load(folder, refiner=str(tmp_path / "refiner"), devices=jax.local_devices()[:1])
    calls = []
    for name in ("base", "refiner"):
        pipe._loops[name] = _spy(pipe._loops[name], name, calls)
    images = pipe.generate(PROMPTS[:1], HEIGHT, WIDTH, 50, 5.0, "euler", seed=0, refiner_strength=0.15)
    assert images.shape == (1, HEIGHT, WIDTH, 3)
    (b, base_sigmas), (r, ref_sigmas) = calls
    assert (b, r) == ("base", "refiner") and len(base_sigmas) == 45 and len(ref_sigmas) == 7
    assert base_sigmas[-1] == ref_sigmas[0] == pytest.approx(0.3866, abs=1e-4)
    with pytest.raises(ValueError, match="needs a refiner"):
        tiny[2].generate(PROMPTS[:1], HEIGHT, WIDTH, 50, refiner_strength=0.15)


def test_img2img_strength(tiny):
    _, _, pipe = tiny
    image = np.random.default_rng(1).integers(0, 256, (1, HEIGHT, WIDTH, 3), dtype=np.uint8)
    out = pipe.generate(PROMPTS[:1], HEIGHT, WIDTH, 10, 5.0, "euler", seed=0, image=image, strength=0.5)
    assert out.shape == (1, HEIGHT, WIDTH, 3) and out.dtype == np.uint8
    with pytest.raises(ValueError, match="img2img needs both"):
        pipe.generate(PROMPTS[:1], HEIGHT, WIDTH, 10, image=image)


def test_bad_input_and_incomplete_folders(tiny, tmp_path):
    folder, _, pipe = tiny
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe.generate(PROMPTS, 60, 64, 2)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.generate(PROMPTS, 64, 64, 2, sampler="ddim")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        pipeline.check_weights(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    for sub in ("unet", "vae", "tokenizer", "tokenizer_2", "text_encoder"):
        os.makedirs(broken / sub)
    with pytest.raises(CheckpointError, match=r"missing text_encoder_2/, unet/config.json"):
        pipeline.check_weights(str(broken))
    assert pipeline.check_weights(folder) == "diffusers"


def test_check_weights_in_a_bucket(fake_gcs):
    """sample.py --weights=gs://BUCKET/sdxl/stage3 (a workdir) is accepted; official weights in a bucket
    are refused with the fix (os.path.exists used to call both 'no such file')."""
    from etils import epath

    epath.Path("gs://bucket/sdxl/stage3/checkpoints/40/_CHECKPOINT_METADATA").write_text("{}")
    epath.Path("gs://bucket/weights/sd_xl_base_1.0.safetensors").write_bytes(b"x")
    assert pipeline.check_weights("gs://bucket/sdxl/stage3") == "workdir"
    with pytest.raises(CheckpointError, match=r"not a training workdir.*copy them there"):
        pipeline.check_weights("gs://bucket/weights/sd_xl_base_1.0.safetensors")


def test_batch_job_over_8_devices_with_kill_and_resume(tiny, tmp_path):
    """20 prompts over the 8 simulated CPU devices; killed after one batch, the rerun writes the rest."""
    folder, _, _ = tiny
    assert jax.local_device_count() == 8
    pipe = pipeline.load(folder)
    assert pipe.mesh.size == 8
    # An ancestral sampler: every image draws fresh noise each step, from its own seed's rng.
    jobs = sample_lib.jobs_from_prompts(
        [f"shape number {i}" for i in range(20)],
        dict(seed=0, height=HEIGHT, width=WIDTH, steps=2, guidance=5.0, sampler="euler_ancestral"),
    )
    z = pipe.generate_latents([j.prompt for j in jobs[:8]], HEIGHT, WIDTH, 2, 5.0, "euler_ancestral", seed=0)
    assert len(z.sharding.device_set) == 8 and z.sharding.shard_shape(z.shape)[0] == 1
    batches = []

    def killed_after_one_batch(*args, **kwargs):
        if batches:
            raise KeyboardInterrupt
        batches.append(len(args[0]))
        return pipe.generate(*args, **kwargs)

    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        sample_lib.run_jobs(killed_after_one_batch, jobs, out, batch_size=8, num_devices=8, progress=False)
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 8
    counts = sample_lib.run_jobs(pipe.generate, jobs, out, batch_size=8, num_devices=8, progress=False)
    assert counts == {"total": 20, "skipped": 8, "written": 12}
    index = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert len(index) == 20 and all(os.path.exists(os.path.join(out, r["file"])) for r in index)
    # An image depends on its seed only, not on its batch or its place in it (fresh per-step noise too).
    alone = pipe.generate_latents(
        [jobs[3].prompt], HEIGHT, WIDTH, 2, 5.0, "euler_ancestral", seed=[jobs[3].seed]
    )
    np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(z)[3], atol=1e-5)
    assert np.abs(np.asarray(z)[2] - np.asarray(z)[3]).max() > 0.1
    from PIL import Image

    again = pipe.generate([jobs[19].prompt], HEIGHT, WIDTH, 2, 5.0, "euler_ancestral", seed=[jobs[19].seed])
    saved = np.asarray(Image.open(os.path.join(out, jobs[19].file))).astype(int)
    assert np.abs(saved - again[0]).max() <= 1  # the resumed PNG is what an uninterrupted run makes


def test_sgm_single_file_loads_the_same_pipeline(tiny, tmp_path):
    """Our tiny weights as one sgm file (UNet, VAE, both text encoders) load into the same pipeline."""
    from sdxl_jax import convert
    from sdxl_jax.convert import common

    _, _, pipe = tiny
    parts = {name: str(tmp_path / f"{name}.safetensors") for name in ("unet", "vae", "text")}
    convert.save_unet(parts["unet"], pipe.base.unet, pipe.base.unet_params, format="sgm")
    convert.save_vae(parts["vae"], pipe.vae, jax.device_get(pipe._vae_params), format="sgm")
    convert.save_text_encoders(parts["text"], pipe.base.conditioner, pipe.base.text_params, format="sgm")
    tensors, metadata = {}, {}
    for p in parts.values():
        tensors.update(common.read_safetensors(p))
        metadata.update(common.read_safetensors_metadata(p))
    single = str(tmp_path / "sd_xl_tiny.safetensors")
    common.write_safetensors(single, tensors, metadata)
    assert pipeline.check_weights(single) == "single_file"

    other = pipeline.load(single, devices=jax.local_devices()[:1])
    ca, cb = (p.encode_prompt(PROMPTS, (HEIGHT, WIDTH)) for p in (pipe, other))
    np.testing.assert_allclose(np.asarray(ca["crossattn"]), np.asarray(cb["crossattn"]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ca["vector"]), np.asarray(cb["vector"]), atol=1e-6)
    za, zb = (
        p.generate_latents(PROMPTS, HEIGHT, WIDTH, 25, 5.0, "euler", seed=[1, 2]) for p in (pipe, other)
    )
    np.testing.assert_allclose(np.asarray(za), np.asarray(zb), atol=1e-5)


def test_sample_lib_run_end_to_end(tiny, tmp_path):
    """What sample.py does: a .jsonl prompts file, validation first, then PNGs + samples.jsonl; a rerun
    writes nothing."""
    folder, _, _ = tiny
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a red circle", "seed": 3}, {"prompt": "a blue square", "negative_prompt": "blurry"}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines))
    defaults = dict(seed=0, height=HEIGHT, width=WIDTH, steps=2, guidance=5.0, sampler="euler_ancestral")
    out = str(tmp_path / "out")
    counts = sample_lib.run(weights=folder, outdir=out, prompts_file=str(prompts), progress=False, **defaults)
    assert counts == {"total": 2, "skipped": 0, "written": 2}
    index = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert [(r["prompt"], r["seed"], r["negative_prompt"]) for r in index] == [
        ("a red circle", 3, None),
        ("a blue square", 1, "blurry"),
    ]
    meta = sample_lib.read_png_parameters(os.path.join(out, index[0]["file"]))
    assert meta["weights"] == folder and meta["sampler"] == "euler_ancestral"
    again = sample_lib.run(weights=folder, outdir=out, prompts_file=str(prompts), progress=False, **defaults)
    assert again == {"total": 2, "skipped": 2, "written": 0}
    with pytest.raises(CheckpointError, match="no such file or folder"):
        sample_lib.run(weights=str(tmp_path / "missing"), outdir=out, prompts=["x"], **defaults)


@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned_blocks"])
def test_training_workdir_loads_its_ema_params(tmp_path, scanned):
    """A training workdir (config + orbax checkpoint + frozen VAE/text params) samples from its EMA params,
    also one trained with model.scan_blocks (its stacked params are unrolled for the pipeline's UNet)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from configs import common as config_common
    from sdxl_jax import checkpoint, conditioning
    from sdxl_jax.train_state import TrainState

    config = config_common.smoke(config_common.base())
    config.model.scan_blocks = scanned
    ucfg = dataclasses.replace(unet_lib.PRESETS[config.model.unet], scan_blocks=scanned)
    key = jax.random.key(0)

    def constant(shapes, value=0.01):  # shapes only: eager Flax init is slow and the values do not matter
        return jax.tree.map(lambda s: jnp.full(s.shape, value, s.dtype), nn.meta.unbox(shapes))

    params = constant(unet_lib.abstract_params(ucfg))
    ema = jax.tree.map(lambda p: p * 2.0, params)
    vae_model = vae_lib.AutoencoderKL(vae_lib.PRESETS[config.model.vae])
    vae_params = constant(jax.eval_shape(vae_model.init, key, jnp.zeros((1, 16, 16, 3)))["params"])
    text_config = conditioning.PRESETS[config.model.text]
    text_params = constant(jax.eval_shape(lambda k: conditioning.init_params(text_config, k), key))
    workdir = str(tmp_path / "stage")
    checkpoint.write_config(workdir, config)
    ck = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
    state = TrainState(step=jnp.asarray(3, jnp.int32), params=params, opt_state={"count": jnp.zeros(())},
                       ema_params=ema, rng=jax.random.PRNGKey(0))
    ck.save(3, state, None, config)
    ck.close()
    checkpoint.save_frozen(workdir, {"vae": vae_params, "text": text_params})
    assert pipeline.check_weights(workdir) == "workdir"

    pipe = pipeline.load(workdir, devices=jax.local_devices()[:1])
    assert pipe.base.unet.config.architecture() == ucfg.architecture()
    assert unet_lib.is_scanned(params) == scanned and not unet_lib.is_scanned(pipe.base.unet_params)
    leaf = jax.tree.leaves(pipe.base.unet_params)[0]
    np.testing.assert_allclose(np.asarray(leaf), 0.02)  # the EMA params, not the raw ones
    assert pipe.latent_scale == config.model.latent_scale
    images = pipe.generate(["a red circle"], 32, 32, steps=1, guidance=5.0, seed=0)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
