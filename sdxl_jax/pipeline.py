"""The SDXL pipeline: prompts -> images, with classifier-free guidance, img2img and the refiner hand-off.

    pipe = pipeline.load("sdxl-base", refiner="sdxl-refiner")   # diffusers folder, sgm file or workdir
    images = pipe.generate(["a fox"], height=1024, width=1024, steps=50, guidance=5.0, sampler="euler",
                           seed=0, refiner_strength=0.15)       # uint8 (B, H, W, 3)

The whole denoising loop, guidance included, is one compiled program per (shape, sampler, step count)
(jit over the samplers' lax.scan); the VAE decode is a second one. Images are vmapped through the loop one
at a time, each with its own seed's noise and sampler rng, so an image does not depend on its batch
(batch jobs can be resumed and resharded). The batch is split over this host's devices; params are
replicated (sampling is data parallel) and held in their models' compute dtype (sdxl_jax/held.py: exact,
half the memory in bf16).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import conditioning, held, parallel, paths
from sdxl_jax import tokenizer as tokenizer_lib
from sdxl_jax.convert.common import CheckpointError, read_safetensors_metadata
from sdxl_jax.diffusion import denoiser, samplers, schedule
from sdxl_jax.models import vae as vae_lib

MAX_SEED = 2**32  # per-image seeds become jax.random.key(seed)
_BASE_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_REFINER_FOLDERS = ("unet", "vae", "text_encoder_2", "tokenizer_2")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One denoising model with its conditioner: the base, or the refiner."""

    unet: object  # unet_lib.UNet
    unet_params: dict
    conditioner: conditioning.Conditioner
    text_params: dict

    @property
    def is_refiner(self) -> bool:
        return self.conditioner.config.is_refiner


class Pipeline:
    def __init__(
        self,
        base: Stage,
        vae: vae_lib.AutoencoderKL,
        vae_params,
        tokenizers,
        refiner: Stage | None = None,
        devices=None,
        decode_chunk: int = 1,
    ):
        base, refiner = _held_stage(base), None if refiner is None else _held_stage(refiner)
        vae_params = held.params(vae, vae_params)
        self.base, self.refiner, self.vae, self.tokenizers = base, refiner, vae, tokenizers
        self.latent_scale = float(vae.config.scaling_factor)
        self.factor = vae.config.downsample_factor
        self.decode_chunk = decode_chunk
        mesh_config = _sampling_config()
        self.mesh = parallel.make_mesh(mesh_config.mesh, jax.local_devices() if devices is None else devices)
        self._config = mesh_config
        put = functools.partial(jax.device_put, device=parallel.replicated(self.mesh))
        self._unet_params = {"base": put(base.unet_params)}
        if refiner is not None:
            self._unet_params["refiner"] = put(refiner.unet_params)
        self._vae_params = put(vae_params)
        self._loops = {
            name: _make_loop(stage.unet, parallel.batch_axes(mesh_config))
            for name, stage in (("base", base), ("refiner", refiner))
            if stage is not None
        }
        self._decode = _vae_program(_decode_to_uint8, vae, self.latent_scale, decode_chunk)
        self._decode_float = _vae_program(_decode, vae, self.latent_scale, decode_chunk)
        self._encode = _vae_program(_encode_image, vae, self.latent_scale, None)

    # ------------------------------------------------------------------------------------ conditioning

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """int32 (B, 77) ids for CLIP-L and bigG, each padded with its own encoder's pad id (SPEC.md)."""
        ids = self.tokenizers(list(prompts))
        return ids["ids_l"], ids["ids_g"]

    def encode_prompt(
        self, prompts: Sequence[str], original_size=(1024, 1024), crop=(0, 0), target_size=None
    ):
        """The base conditioner's {"crossattn": (B, 77, 2048), "vector": (B, 2816)} for `prompts`."""
        return self._encode_stage(self.base, prompts, original_size, crop, target_size)

    def _encode_stage(
        self, stage: Stage, prompts, original_size, crop, target_size, negative=None, uncond=False
    ):
        target_size = original_size if target_size is None else target_size
        args = (stage.conditioner, stage.text_params, self.tokenizers)
        if not uncond:
            return conditioning.encode_prompts(*args, list(prompts), original_size, crop, target_size)
        return conditioning.encode_unconditional(*args, len(prompts), original_size, crop, target_size,
                                                 negative_prompts=negative)

    # -------------------------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[str],
        height: int = 1024,
        width: int = 1024,
        steps: int = 30,
        guidance: float = 5.0,
        sampler: str = "euler",
        seed: int | Sequence[int] = 0,
        negative_prompt: str | Sequence[str] | None = None,
        latents=None,
        refiner_strength: float | None = None,
        image=None,
        strength: float | None = None,
    ) -> np.ndarray:
        """uint8 (B, H, W, 3). `seed`: an int (image i uses seed + i) or one seed per prompt. `latents`:
        the unscaled initial noise (B, H/8, W/8, 4), replacing the seeded noise. `negative_prompt`: None
        gives the base the reference's zeroed unconditional text. `refiner_strength` (e.g. 0.15): the
        share of the schedule the refiner runs. `image` (B, H, W, 3) uint8 or float in [-1, 1] with
        `strength` in (0, 1]: img2img."""
        z = self.generate_latents(prompts, height, width, steps, guidance, sampler, seed, negative_prompt,
                                  latents, refiner_strength, image, strength)
        return np.asarray(self._on_mesh(self._decode, self._vae_params, z))[: len(prompts)]

    def decode(self, latents) -> np.ndarray:
        """Scaled latents (as generate_latents returns them) -> float images in [-1, 1] (unclipped)."""
        z = np.asarray(latents, np.float32)
        z = np.concatenate([z, np.repeat(z[-1:], -len(z) % self.mesh.size, axis=0)])
        images = self._on_mesh(self._decode_float, self._vae_params, self._shard(z))
        return np.asarray(images)[: len(latents)]

    def generate_latents(self, prompts, height=1024, width=1024, steps=30, guidance=5.0, sampler="euler",
                         seed=0, negative_prompt=None, latents=None, refiner_strength=None, image=None,
                         strength=None) -> jax.Array:
        """The final (scaled) latents of `generate`, padded to a multiple of the device count."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = len(prompts)
        seeds = self._check(prompts, height, width, steps, sampler, seed, negative_prompt, latents,
                            refiner_strength, image, strength)
        negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt
        pad = -n % self.mesh.size
        prompts, seeds = prompts + prompts[-1:] * pad, seeds + seeds[-1:] * pad
        negatives = None if negatives is None else list(negatives) + list(negatives[-1:]) * pad
        shape = (height // self.factor, width // self.factor, self.vae.config.latent_channels)
        keys = jax.vmap(jax.random.key)(np.asarray(seeds, np.uint32))
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
        if latents is not None:
            noise = np.asarray(latents, np.float32)
            noise = np.concatenate([noise, np.repeat(noise[-1:], pad, axis=0)])
        rngs = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        noise, rngs = self._shard(noise), self._shard(rngs)
        size = (height, width)

        sigmas = schedule.legacy_ddpm_sigmas(steps)
        start = None
        if image is not None:
            sigmas = schedule.img2img_sigmas(sigmas, float(strength))
            start = self._on_mesh(
                self._encode,
                self._vae_params,
                self._shard(_image_to_float(image, pad)),
                jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys),
                noise,
                jnp.float32(sigmas[0]),
            )
        base_sigmas, refiner_sigmas = sigmas, None
        if refiner_strength is not None:
            base_sigmas, refiner_sigmas = schedule.split_for_refiner(sigmas, float(refiner_strength))

        cond = self._encode_stage(self.base, prompts, size, (0, 0), size)
        uncond = self._encode_stage(self.base, prompts, size, (0, 0), size, negatives, uncond=True)
        z = self._run("base", noise if start is None else start, base_sigmas, cond, uncond, guidance, sampler,
                      rngs, from_noise=start is None)
        if refiner_sigmas is not None:
            # SPEC.md: the refiner's size conditioning is the latent shape x 8, crop (0, 0); its negative
            # prompt defaults to "" (encoded, not zeroed) and its aesthetic scores are 6.0 / 2.5.
            rsize = (shape[0] * 8, shape[1] * 8)
            rcond = self._encode_stage(self.refiner, prompts, rsize, (0, 0), rsize)
            negatives = [""] * len(prompts) if negatives is None else negatives
            runcond = self._encode_stage(self.refiner, prompts, rsize, (0, 0), rsize, negatives, uncond=True)
            rngs = jax.vmap(lambda k: jax.random.fold_in(k, 3))(rngs)
            z = self._run("refiner", z, refiner_sigmas, rcond, runcond, guidance, sampler, rngs,
                          from_noise=False)
        return z

    def _run(self, which, x, sigmas, cond, uncond, guidance, sampler, rngs, from_noise):
        cond, uncond = self._shard(cond), self._shard(uncond)
        return self._on_mesh(
            self._loops[which],
            self._unet_params[which],
            x,
            jnp.asarray(sigmas, jnp.float32),
            cond,
            uncond,
            jnp.float32(guidance),
            rngs,
            sampler=sampler,
            from_noise=from_noise,
        )

    def _on_mesh(self, program, *args, **kwargs):
        """Runs a jitted program traced for this pipeline's mesh: a TPU attention kernel then runs per
        chip (XLA cannot partition it; models/tpu_attention.py)."""
        with jax.set_mesh(self.mesh):
            return program(*args, **kwargs)

    def _shard(self, tree):
        """Splits the leading (batch) axis of every array over this host's devices."""
        return jax.tree.map(
            lambda a: jax.device_put(a, parallel.batch_sharding(self._config, self.mesh, a.ndim)), tree
        )

    def _check(self, prompts, height, width, steps, sampler, seed, negative_prompt, latents, refiner_strength,
               image, strength) -> list[int]:
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts given")
        if height % self.factor or width % self.factor or height <= 0 or width <= 0:
            raise ValueError(
                f"height={height}, width={width}: both must be positive multiples of {self.factor}"
            )
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(samplers.SAMPLERS)}")
        schedule.legacy_ddpm_timesteps(steps)  # validates the step count
        seeds = [seed + i for i in range(n)] if isinstance(seed, int | np.integer) else [int(s) for s in seed]
        if len(seeds) != n or not all(0 <= s < MAX_SEED for s in seeds):
            raise ValueError(f"seed must be an int or {n} ints, each in [0, 2**32); got {seed!r}")
        if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != n:
            raise ValueError(f"{len(negative_prompt)} negative prompts for {n} prompts")
        shape = (n, height // self.factor, width // self.factor, self.vae.config.latent_channels)
        if latents is not None and tuple(np.shape(latents)) != shape:
            raise ValueError(f"latents must have shape {shape} (B, H/8, W/8, C), got {np.shape(latents)}")
        if refiner_strength is not None:
            if self.refiner is None:
                raise ValueError("refiner_strength needs a refiner: pipeline.load(path, refiner=...)")
            if not 0.0 < refiner_strength < 1.0:
                raise ValueError(
                    f"refiner_strength={refiner_strength} must be in (0, 1); the reference uses 0.15"
                )
        if (image is None) != (strength is None):
            raise ValueError("img2img needs both image= and strength=")
        if image is not None:
            if refiner_strength is not None:
                raise ValueError("img2img with the refiner hand-off is not supported; run them separately")
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"strength={strength} must be in (0, 1]")
            if tuple(np.shape(image))[:3] != (n, height, width):
                raise ValueError(f"image must be ({n}, {height}, {width}, 3), got {np.shape(image)}")
        return seeds


# -------------------------------------------------------------------------------------- compiled parts


def _held_stage(stage: Stage) -> Stage:
    """The stage with its UNet and text params held in their compute dtype (held.py: exact)."""
    return dataclasses.replace(stage, unet_params=held.params(stage.unet, stage.unet_params),
                               text_params=held.params(stage.conditioner, stage.text_params))


def _sampling_config():
    """Mesh and rules for data-parallel sampling over one host's devices (the batch axis takes them all)."""
    from configs import common as config_common

    c = config_common.base()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    return c


# Cached per model (Flax modules hash by their config), so pipelines over the same architecture share
# compiled programs instead of recompiling them.
@functools.cache
def _vae_program(fn, vae, scale, chunk):
    kw = dict(scale=scale) if chunk is None else dict(scale=scale, chunk=chunk)
    return jax.jit(functools.partial(fn, vae, **kw))


@functools.cache
def _make_loop(unet, batch_axes):
    """The jitted sampling loop; one image per vmap lane, the images split over `batch_axes` of the
    mesh it is traced under (vmap's spmd_axis_name: a kernel in a shard_map sees its own images)."""

    def loop(params, x, sigmas, cond, uncond, guidance, rngs, *, sampler, from_noise):
        def one(x, cond, uncond, rng):  # one image: x (h, w, c); its own rng
            both = jax.tree.map(lambda u, c: jnp.stack([u, c]), uncond, cond)  # [uncond, cond] (SPEC.md)

            def net(x, t, ctx, y):
                return unet.apply({"params": params}, x, t, ctx, y)

            d = denoiser.make_denoiser(net, "eps", quantize=True)
            cfg = samplers.cfg_denoiser(lambda x2, s2: d(x2, s2, both["crossattn"], both["vector"]), guidance)
            run = samplers.sample if from_noise else samplers.start_from
            return run(cfg, x[None], sigmas, sampler, rng)[0]

        return jax.vmap(one, spmd_axis_name=tuple(batch_axes) or None)(x, cond, uncond, rngs)

    return jax.jit(loop, static_argnames=("sampler", "from_noise"))


def _decode(vae, params, z, *, scale, chunk):
    return vae_lib.decode_batched(vae, params, z / scale, chunk)


def _decode_to_uint8(vae, params, z, *, scale, chunk):
    x = _decode(vae, params, z, scale=scale, chunk=chunk)
    # diffusers VaeImageProcessor: (x / 2 + 0.5).clamp(0, 1) * 255, rounded.
    return jnp.round(jnp.clip(x / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


def _encode_image(vae, params, images, keys, noise, sigma0, *, scale):
    """img2img start (sgm do_img2img): z = scale * posterior sample, then z + noise * sigmas[0]."""
    mean, logvar = vae.apply({"params": params}, images, method="encode")
    eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape))(keys, mean)
    z = scale * (mean + jnp.exp(0.5 * logvar) * eps)
    return z + noise * sigma0


def _image_to_float(image, pad: int) -> np.ndarray:
    image = np.asarray(image)
    x = image.astype(np.float32) / 127.5 - 1.0 if image.dtype == np.uint8 else image.astype(np.float32)
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])


# --------------------------------------------------------------------------------------------- loading


def check_weights(path: str) -> str:
    """Fails fast (before anything loads or compiles) on a missing or incomplete weights location.

    Returns its kind: "workdir", "diffusers" or "single_file"."""
    from sdxl_jax import checkpoint

    if paths.is_remote(path):  # a bucket (gs://): only a training workdir is read from there
        if checkpoint.is_workdir(path):
            return "workdir"
        raise CheckpointError(
            f"{path}: not a training workdir (no checkpoints/ under it). Official weights (diffusers "
            "folder, .safetensors) are read from a local disk: copy them there (gsutil -m cp -r) first"
        )
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path}: no such file or folder; pass a diffusers folder, an sgm .safetensors "
            "file or a training workdir"
        )
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: only .safetensors single files are supported (we never unpickle)")
        read_safetensors_metadata(path)  # a readable header
        return "single_file"
    if checkpoint.is_workdir(path):
        return "workdir"
    present = set(os.listdir(path))
    needed = (
        _REFINER_FOLDERS if "text_encoder" not in present and "text_encoder_2" in present else _BASE_FOLDERS
    )
    missing = [f"{d}/" for d in needed if d not in present]
    for d in needed:
        if f"{d}/" in missing:
            continue
        files = set(os.listdir(os.path.join(path, d)))
        want = ("vocab.json", "merges.txt") if d.startswith("tokenizer") else ("config.json",)
        missing += [f"{d}/{f}" for f in want if f not in files]
        if not d.startswith("tokenizer") and not any(f.endswith(".safetensors") for f in files):
            missing.append(f"{d}/*.safetensors")
    if missing:
        raise CheckpointError(
            f"{path}: incomplete diffusers folder, missing {', '.join(missing)} (an SDXL "
            f"folder has {', '.join(d + '/' for d in _BASE_FOLDERS)}; the refiner has no "
            "text_encoder/ or tokenizer/)"
        )
    return "diffusers"


def load(
    path: str, refiner: str | None = None, *, dtype: str = "float32", vae_dtype: str = "float32", devices=None
) -> Pipeline:
    """A Pipeline from a diffusers folder, an sgm single file or a training workdir (its EMA params),
    plus an optional refiner (diffusers folder or single file). `dtype` is the UNet/text compute dtype
    ("bfloat16" on accelerators); the VAE runs in fp32 by default (SPEC.md)."""
    base, vae, vae_params, tokenizers = _load_stage(path, dtype, vae_dtype)
    if base.is_refiner:
        raise CheckpointError(
            f"{path} holds a refiner; pass the base weights first and the refiner as refiner="
        )
    ref = None
    if refiner is not None:
        ref = _load_stage(refiner, dtype, vae_dtype)[0]
        if not ref.is_refiner:
            raise CheckpointError(f"{refiner}: expected refiner weights (bigG text only), found a base model")
    return Pipeline(base, vae, vae_params, tokenizers, ref, devices=devices)


def _load_stage(path: str, dtype: str, vae_dtype: str):
    from sdxl_jax import convert

    kind = check_weights(path)
    if kind == "workdir":
        return _load_workdir(path, dtype, vae_dtype)
    unet, unet_params = convert.load_unet(path, dtype=dtype)
    vae, vae_params = convert.load_vae(path, dtype=vae_dtype)
    conditioner, text_params = convert.load_text_encoders(path)
    conditioner = conditioning.Conditioner(_matching_conditioner(conditioner.config, unet.config, dtype))
    tokenizers = tokenizer_lib.load_pair(path if kind == "diffusers" else None)
    return Stage(unet, unet_params, conditioner, text_params), vae, vae_params, tokenizers


def _matching_conditioner(config, unet_config, dtype):
    """The conditioner's size-embedding width follows the UNet's vector input (diffusers keeps it as
    unet addition_time_embed_dim); a mismatch is a broken checkpoint, reported here."""
    width = (config.vector_dim - config.text_g.projection_dim) // config.size_embed_dim  # scalars embedded
    extra = unet_config.adm_in_channels - config.text_g.projection_dim
    if extra <= 0 or extra % width:
        raise CheckpointError(
            f"UNet vector input {unet_config.adm_in_channels} does not fit pooled text "
            f"{config.text_g.projection_dim} + {width} size embeddings"
        )
    return config.replace(size_embed_dim=extra // width).with_dtype(dtype)


def _load_workdir(path: str, dtype: str, vae_dtype: str):
    from sdxl_jax import checkpoint, convert
    from sdxl_jax.models import unet as unet_lib

    config, params = checkpoint.load_params(path, which="ema")
    unet = unet_lib.UNet(dataclasses.replace(unet_lib.PRESETS[config.model.unet], dtype=dtype))
    unet_params = unet_lib.relayout(jax.tree.map(np.asarray, params["unet"]), unet.config.scan_blocks)
    if params["vae"] is not None:
        vae = vae_lib.AutoencoderKL(
            dataclasses.replace(
                vae_lib.PRESETS[config.model.vae], dtype=vae_dtype, scaling_factor=config.model.latent_scale
            )
        )
        vae_params = params["vae"]
    else:
        source = config.vae_from or config.init_from
        if not source:
            raise CheckpointError(
                f"{path}: the workdir saved no VAE and its config names no vae_from/init_from"
            )
        vae, vae_params = convert.load_vae(source, dtype=vae_dtype)
    if params["text"] is not None:
        cond_config = conditioning.PRESETS[config.model.text]
        text_params = params["text"]
    else:
        source = config.text_from or config.init_from
        if not source:
            raise CheckpointError(
                f"{path}: the workdir saved no text encoders and names no text_from/init_from"
            )
        conditioner, text_params = convert.load_text_encoders(source)
        cond_config = conditioner.config
    conditioner = conditioning.Conditioner(_matching_conditioner(cond_config, unet.config, dtype))
    source = config.text_from or config.init_from
    tokenizers = tokenizer_lib.load_pair(
        source if source and os.path.isdir(os.path.join(source, "tokenizer_2")) else None
    )
    return Stage(unet, unet_params, conditioner, text_params), vae, vae_params, tokenizers
