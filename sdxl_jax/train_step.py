"""The train step: (state, frozen, batch) -> (state, metrics), and its AOT compilation per batch shape.

Inside one jitted program: the frozen VAE encoder (skipped when the batch carries cached "latents"),
the frozen text conditioner with its conditioning dropout, the diffusion loss (sdxl_jax.diffusion),
gradients, the optimizer update and the fp32 EMA. A non-finite loss or gradient leaves params,
optimizer state and EMA untouched and is reported in the metrics ("nonfinite"), so one bad batch cannot
poison a run.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent import futures

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sdxl_jax import metrics as metrics_lib
from sdxl_jax import optim, parallel, train_state
from sdxl_jax.data import cache
from sdxl_jax.diffusion import denoiser
from sdxl_jax.diffusion import loss as loss_lib
from sdxl_jax.models import layers
from sdxl_jax.models.chunked_attention import DEFAULT_BLOCK as BLOCK

# Loss is also reported per noise level: sigma ranges of the discrete schedule (0.029 .. 14.6),
# split roughly at t ~ 100, 300, 600: fine detail / structure / composition.
SIGMA_BINS = (0.0, 0.25, 0.75, 2.0, float("inf"))


def latents_from_batch(setup, frozen, batch, rng):
    """Scaled latents z = scale * sample(posterior) (SPEC.md), or the batch's cached "latents" as they are
    (the caching pipeline stores them already scaled)."""
    models = setup.models
    if "latents" in batch:
        return batch["latents"].astype(jnp.float32)
    mean, logvar = models.vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
    from sdxl_jax.models import vae as vae_lib

    return models.latent_scale * vae_lib.sample_posterior(rng, mean, logvar)


def make_train_step(setup, config):
    if config.task == "autoencoder":
        from sdxl_jax.autoencoder import trainer

        return trainer.make_train_step(setup, config)
    d = config.diffusion
    models = setup.models

    def step_fn(state, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        cond_rng, vae_rng, loss_rng = jax.random.split(rng, 3)
        x0 = jax.lax.stop_gradient(latents_from_batch(setup, frozen, batch, vae_rng))
        if cache.has_cached_text(batch):  # the encoding cache (data/cache.py): same dropout, no encoders
            cond = cache.conditioning(models.conditioner.config, batch, cond_rng)
        else:
            cond = train_state.encode_conditioning(models, frozen["text"], batch, cond_rng, train=True)
        context = jax.lax.stop_gradient(cond["crossattn"])
        vector = jax.lax.stop_gradient(cond["vector"])

        def loss_fn(params):
            def net(x, t, ctx, y):
                return models.unet.apply({"params": params}, x, t, ctx, y)

            D = denoiser.make_denoiser(net, d.parameterization)
            per_sample, aux = loss_lib.diffusion_loss(
                lambda x, sigma: D(x, sigma, context, vector),
                x0,
                loss_rng,
                parameterization=d.parameterization,
                weighting=d.weighting,
                loss_type=d.loss_type,
                sigma_sampling=d.sigma_sampling,
                min_index=d.min_index,
                max_index=d.max_index,
                offset_noise=d.offset_noise,
            )
            return jnp.mean(per_sample), (per_sample, aux["sigma"])

        (loss, (per_sample, sigma)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optim.ema_update(state.ema_params, params, optim.ema_decay(config.ema, state.step))

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            ema_params=keep(ema, state.ema_params),
        )
        out = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": setup.lr_schedule(state.step),
            "nonfinite": 1 - ok.astype(jnp.int32),
        }
        for lo, hi in zip(SIGMA_BINS[:-1], SIGMA_BINS[1:], strict=True):
            m = ((sigma >= lo) & (sigma < hi)).astype(jnp.float32)
            out[f"loss_sigma_{lo:g}_{hi:g}"] = jnp.sum(per_sample * m) / jnp.maximum(jnp.sum(m), 1.0)
            out[f"count_sigma_{lo:g}_{hi:g}"] = jnp.sum(m)
        return new_state, out

    return step_fn


def model_flops(setup, config, batch) -> float | None:
    """Per-device FLOPs of the model's work in one train step, for MFU: the same step with materialised
    ("xla") attention and no rematerialisation, from XLA's cost analysis of the lowered (not compiled)
    program, divided over the mesh. The compiled program's own count is not the model's work: XLA counts
    a loop body (the chunked kernel's scan over key blocks) once and a custom call (cuDNN, splash) not at
    all, and it counts the recomputation a remat policy adds (MFU leaves that out by definition).
    `batch`: arrays or jax.ShapeDtypeStructs of the global batch. None where the backend has no count."""
    unet = setup.models.unet
    xla_unet = type(unet)(dataclasses.replace(unet.config, attention="xla", remat="none"))
    xla_setup = dataclasses.replace(setup, models=dataclasses.replace(setup.models, unet=xla_unet), jitted={})
    shardings = parallel.batch_shardings_like(batch, config, setup.mesh)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()}
    jitted = jax.jit(make_train_step(xla_setup, config),
                     in_shardings=(setup.state_shardings, setup.frozen_shardings, shardings))
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        cost = jitted.lower(setup.abstract_state, setup.abstract_frozen, abstract).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    # The lowered program is the global one (before SPMD partitioning): the mesh's devices share it.
    return float(flops) / setup.mesh.size if flops and flops > 0 else None


class CompiledSteps:
    """One AOT-compiled train step per batch shape (bucket), compiled on first sight of the shape.

    Prints each compiled step's memory and FLOPs (STYLE.md 3) and keeps them for MFU.
    """

    def __init__(self, setup, config, *, log=print):
        self.setup, self.config, self.log = setup, config, log
        rep = parallel.replicated(setup.mesh)
        self._fn = make_train_step(setup, config)
        self._out_shardings = (setup.state_shardings, rep)
        self._compiled = {}
        self.stats = {}
        self.compile_seconds = 0.0
        self._lock = threading.Lock()  # precompile's threads add to compile_seconds

    @staticmethod
    def key(batch) -> tuple:
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    def get(self, batch):
        key = self.key(batch)
        if key not in self._compiled:
            self._compiled[key] = self.compile(batch)
        return self._compiled[key]

    def precompile(self, batches) -> None:
        """Compiles the steps of several batch shapes (arrays or jax.ShapeDtypeStructs) concurrently:
        XLA compiles in parallel threads, so a multi-bucket stage pays for its buckets once up front
        instead of stalling on each new bucket mid-run (every host compiles the same set, in any order)."""
        todo = {}
        for b in batches:
            if self.key(b) not in self._compiled:
                todo.setdefault(self.key(b), b)
        if len(todo) <= 1:
            for key, b in todo.items():
                self._compiled[key] = self.compile(b)
            return
        with futures.ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as ex:
            for key, compiled in zip(todo, ex.map(self.compile, todo.values()), strict=True):
                self._compiled[key] = compiled

    def compile(self, batch):
        setup, config = self.setup, self.config
        batch_shardings = parallel.batch_shardings_like(batch, config, setup.mesh)
        abstract_batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in batch.items()
        }
        jitted = jax.jit(
            self._fn,
            in_shardings=(setup.state_shardings, setup.frozen_shardings, batch_shardings),
            out_shardings=self._out_shardings,
            donate_argnums=(0,),
        )
        t0 = time.time()
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
            compiled = jitted.lower(setup.abstract_state, setup.abstract_frozen, abstract_batch).compile()
        seconds = time.time() - t0
        with self._lock:
            self.compile_seconds += seconds
        stats = metrics_lib.compiled_stats(compiled)
        stats["compile_seconds"] = seconds
        shape = "x".join(str(s) for s in next(iter(batch.values())).shape)
        name = f"train step for batch {shape} " + (
            f"image {tuple(batch['image'].shape[1:3])}" if "image" in batch else
            f"latents {tuple(batch['latents'].shape[1:3])}"
        )
        self.stats[self.key(batch)] = stats
        self.log(metrics_lib.format_stats(name, stats) + f" (compiled in {seconds:.1f} s)")
        why = self._not_model_flops(batch)
        if why:
            t0 = time.time()
            stats["model_flops"] = flops = model_flops(setup, config, abstract_batch)
            self.log(f"  mfu: the model's {flops / 1e12:.3f} TFLOPs per device per step (the step with "
                     f"materialised attention and no remat, counted in {time.time() - t0:.1f} s): {why}"
                     if flops else f"  mfu not logged: {why}, and this backend gives no count of the model's "
                     "FLOPs")
        return compiled

    def _not_model_flops(self, batch) -> str:
        """Why XLA's count of this step's compiled program is not the model's work ("" where it is)."""
        config = self.config
        if config.task != "diffusion":
            return ""
        kernel = layers.resolved_kernel(config.model.attention)
        tokens = self._longest_attention(batch)
        reasons = []
        if kernel != "xla" and tokens > BLOCK:
            reasons.append(f"with {kernel!r} attention on {tokens} tokens XLA's count misses attention "
                           "work (a loop body counts once, a custom call not at all)")
        if config.model.remat != "none":
            reasons.append(f"remat {config.model.remat!r} adds recomputation")
        return "; ".join(reasons)

    def _longest_attention(self, batch) -> int:
        """Tokens of the UNet's highest-resolution attention level for this batch."""
        depths = self.setup.models.unet.config.transformer_depth
        first = next((i for i, d in enumerate(depths) if d), len(depths) - 1)  # else only the mid block
        h, w = (batch["latents"].shape[1:3] if "latents" in batch else
                (s // self.setup.models.downsample for s in batch["image"].shape[1:3]))
        return (h >> first) * (w >> first)

    def flops(self, batch) -> float | None:
        """The model's FLOPs per device for one step of this batch shape (what the logged mfu uses)."""
        stats = self.stats.get(self.key(batch), {})
        return stats.get("model_flops", stats.get("flops"))
