"""The train step: (state, frozen, batch) -> (state, metrics), and its AOT compilation per batch shape.

Inside one jitted program: the frozen VAE encoder (skipped when the batch carries cached "latents"),
the frozen text conditioner with its conditioning dropout, the diffusion loss (sdxl_jax.diffusion),
gradients, the optimizer update and the fp32 EMA. A non-finite loss or gradient leaves params,
optimizer state and EMA untouched and is reported in the metrics ("nonfinite"), so one bad batch cannot
poison a run.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from concurrent import futures

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath
from jax.experimental.layout import Format, Layout

from sdxl_jax import metrics as metrics_lib
from sdxl_jax import optim, parallel, train_state
from sdxl_jax.data import cache
from sdxl_jax.diffusion import denoiser
from sdxl_jax.diffusion import loss as loss_lib
from sdxl_jax.models import layers
from sdxl_jax.models import unet as unet_lib
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


class DeviceMemoryError(RuntimeError):
    """A train step that does not fit in device memory (at compile time on TPU, at its first run on GPU)."""


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text and ("memory" in text.lower() or "HbmOom" in text)


def _pixels(batch) -> tuple[str, tuple]:
    """("image" or "latents", its shape): the array that gives a batch's size and resolution (the others
    are (B,) or (B, n))."""
    what = "image" if "image" in batch else "latents"
    return what, tuple(batch[what].shape)


def memory_advice(config, mesh, batch, error) -> str:
    """What a user whose step ran out of device memory can change, most effective first, for this run's
    settings and batch shape (measured figures: bench/RESULTS.md)."""
    what, shape = _pixels(batch)
    shards = math.prod(mesh.shape[a] for a in parallel.batch_axes(config))
    k = microbatches(config)
    rows = shape[0] // shards
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")[:300]
    model = config.model
    lines = [
        f"the train step for a global batch of {shape[0]} x {what} {tuple(shape[1:3])} does not fit in "
        f"device memory: {rows} rows per batch shard in {k} microbatch(es), model.remat={model.remat!r}, "
        f"model.attention={model.attention!r}, mesh {dict(mesh.shape)}.",
        f"XLA: {first}",
        "To fit it, most effective first:",
    ]
    if model.remat == "none":
        lines.append("- --config.model.remat=dots: keep only the matmul outputs for the backward pass")
    kernel = layers.resolved_kernel(model.attention)
    if kernel == "xla" or (kernel == "splash" and not model.scan_blocks):
        # With scanned blocks splash allocates less than chunked (0.24 GiB per v5e chip, session 29)
        lines.append(
            "- --config.model.attention=chunked: xla materialises every attention score matrix; splash (what "
            "'auto' runs on TPUs) with unrolled blocks needed 1.07 GiB more than chunked per v5e chip for "
            "the SDXL base at 2 rows (bench/RESULTS.md, session 8)"
        )
    if kernel == "splash" and model.remat.startswith("dots") and not model.scan_blocks:
        lines.append(
            "- --config.model.scan_blocks=True: with unrolled blocks XLA keeps splash's log-sum-exp for the "
            "backward as the kernel writes it, lane-broadcast (f32[..., 128]; 0.5 GiB per 10 level-3 blocks "
            "at 2 rows per v5e chip), where each scanned block slices it; scanned, splash allocates 0.24 GiB "
            "less than chunked (bench/RESULTS.md, session 29)"
        )
    if rows % (2 * k) == 0:
        lines.append(
            f"- --config.optim.microbatches={2 * k}: gradient accumulation, the same update with half the "
            "activations at a time"
        )
    if config.optim.mu_dtype == "float32":
        lines.append(
            "- --config.optim.mu_dtype=bfloat16: the optimizer's first moment in bf16 (2 bytes per param "
            "less over the fsdp shards: 0.60 GiB per chip for the SDXL base at fsdp 8)"
        )
    if train_state.uses_compute_copy(config, mesh):
        lines.append(
            "- --config.compute_copy=off: no bf16 copy of the params in the train state (2 bytes per param, "
            "less the casts the step then makes: 0.56 GiB of the SDXL base's peak at 4 rows on an H200)"
        )
    if mesh.shape.get("fsdp", 1) < mesh.size:
        lines.append(
            "- a larger config.mesh.fsdp: shards the params, AdamW moments and EMA over more devices"
        )
    lines.append("- a smaller config.data.batch_size (it changes the recipe)")
    lines.append(
        "Size a setting before launching, without the hardware: python bench/train_step.py --compile_only "
        "--topology=tpu:v5e:2x4 --devices=8 --mesh=data=1,fsdp=8,tensor=1 --per_device_batch=B "
        "--microbatches=K --remat=dots [--set optim.mu_dtype=bfloat16] (docs/ARCHITECTURE.md, Benchmarks)"
    )
    return "\n".join(lines)


def vendor_kernel_note(config) -> str | None:
    """A line to add to an error raised while a step compiles or runs with a vendor attention kernel on its
    own platform (cuDNN on a GPU, splash on a TPU; model.attention "auto" picks them), naming the kernel
    that runs on every backend; None otherwise."""
    kernel = layers.resolved_kernel(config.model.attention)
    if (kernel, layers.target_platform()) not in (("cudnn", "gpu"), ("splash", "tpu")):
        return None
    return (f"The step ran model.attention={config.model.attention!r}: {kernel}, this platform's vendor "
            "kernel. If the error comes from it, --config.model.attention=chunked (plain JAX, every backend) "
            "avoids it.")


def microbatches(config) -> int:
    """How many microbatches the diffusion step splits the global batch into (config.optim.microbatches)."""
    return int(config.optim.get("microbatches", 1))


def split_microbatches(batch, k, shardings=None):
    """{key: (B, ...)} -> {key: (k, B / k, ...)}; microbatch i holds rows i, i + k, i + 2k, ...

    Strided, not contiguous: a device's contiguous block of the batch-sharded rows then splits into k
    local pieces, so no microbatch needs rows from another device (config_lib requires the rows per batch
    shard to divide by k). `shardings` ({key: NamedSharding of the batch}) pins each microbatch's rows to
    the batch axes."""
    out = {}
    for key, x in batch.items():
        b = x.shape[0]
        x = jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
        if shardings is not None:
            spec = shardings[key].spec
            x = jax.lax.with_sharding_constraint(
                x, jax.sharding.NamedSharding(shardings[key].mesh, jax.sharding.PartitionSpec(None, *spec))
            )
        out[key] = x
    return out


def make_loss_and_grads(setup, config):
    """(params, frozen, batch, rng) -> (loss, per_sample loss, sigma, grads) of one (micro)batch: the
    frozen VAE / text encoders (or the cache's), conditioning dropout, the diffusion loss and its
    gradient with respect to the UNet params."""
    d = config.diffusion
    models = setup.models

    def loss_and_grads(params, frozen, batch, rng):
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

        (loss, (per_sample, sigma)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, per_sample, sigma, grads

    return loss_and_grads


def make_train_step(setup, config, *, num_microbatches=None):
    """The jittable step. With k = config.optim.microbatches > 1 the global batch runs as k microbatches
    in a lax.scan (microbatch i: rows i::k, rng fold_in(rng, i)) whose fp32 gradients are averaged
    before one optimizer and EMA update: the update of the whole batch, with the activation memory of
    one microbatch plus an fp32 gradient accumulator (sharded like the params). num_microbatches
    overrides the config's (model_flops counts the step as one batch: XLA counts a loop body once)."""
    if config.task == "autoencoder":
        from sdxl_jax.autoencoder import trainer

        return trainer.make_train_step(setup, config)
    k = microbatches(config) if num_microbatches is None else int(num_microbatches)
    loss_and_grads = make_loss_and_grads(setup, config)
    param_shardings = setup.state_shardings.params

    def accumulated(params, frozen, batch, rng):
        """(loss, per_sample, sigma, averaged fp32 grads, params): params are the same values, carried
        through the loop; the update must use these, not the ones passed in (see the barrier below)."""
        shardings = parallel.batch_shardings_like(batch, config, setup.mesh)
        parts = split_microbatches(batch, k, shardings)
        uses_frozen = "latents" not in batch or not cache.has_cached_text(batch)

        def body(carry, xs):
            total, params = carry
            i, part = xs
            # The weights go through a barrier with the loop counter: to XLA they then change every
            # iteration, so it cannot hoist their fsdp all-gathers out of the loop (loop-invariant code
            # motion), which keeps every layer's gathered weights alive for the whole loop (XLA:CPU, a 641M
            # SDXL-shaped UNet, fsdp 8, 4 rows per device in 2 microbatches: 9.84 GiB of temporaries
            # without, 7.56 with; bench/RESULTS.md). They are also carried through the loop and used
            # after it, so that XLA:TPU cannot hoist their bf16 casts out either (a loop-invariant bf16
            # copy of every weight). The frozen encoders only when the batch needs them (a cached batch
            # leaves them out of the program).
            params, f, _ = jax.lax.optimization_barrier((params, frozen if uses_frozen else {}, i))
            f = f if uses_frozen else frozen
            loss, per_sample, sigma, grads = loss_and_grads(params, f, part, jax.random.fold_in(rng, i))
            total = jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads)
            return (total, params), (loss, per_sample, sigma)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        carry, (losses, per_sample, sigma) = jax.lax.scan(body, (zeros, params), (jnp.arange(k), parts))
        total, params = carry
        grads = jax.tree.map(lambda t: t / k, total)
        return jnp.mean(losses), per_sample.reshape(-1), sigma.reshape(-1), grads, params

    def step_fn(state, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        old_params = state.params
        # The forward computes from the state's compute copy where it holds one (train_state.TrainState):
        # the same values the model's own casts make, so the gradients are too, in the compute dtype.
        copy = state.compute_params
        weights = old_params if copy is None else train_state.compute_weights(old_params, copy)
        if k == 1:
            loss, per_sample, sigma, grads = loss_and_grads(weights, frozen, batch, rng)
        else:  # the same weights, carried through the loop (see `accumulated`)
            loss, per_sample, sigma, grads, weights = accumulated(weights, frozen, batch, rng)
            old_params = weights if copy is None else old_params
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, old_params)
        grad_norm = optim.global_norm(grads, param_shardings)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = setup.tx.update(grads, state.opt_state, old_params, grad_norm=grad_norm)
        params = optim.keep(ok, optax.apply_updates(old_params, updates), old_params)
        # The EMA of the kept params: with ema.every > 1 its lax.cond then takes the state's own new params
        # (the unkept ones would be a second fp32 copy of every param, 4 bytes each written and read).
        ema = optim.ema_step(config.ema, state.ema_params, params, state.step, ok)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=optim.keep(ok, opt_state, state.opt_state),
            ema_params=ema,
            compute_params=train_state.compute_copy(params, copy),
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
    xla_unet = type(unet)(dataclasses.replace(unet.config, attention="xla", remat="none", scan_blocks=False))
    state = unet_lib.relayout(setup.abstract_state, False)  # the scanned blocks' loop would count once
    xla_setup = dataclasses.replace(setup, models=dataclasses.replace(setup.models, unet=xla_unet), jitted={},
                                    abstract_state=state,
                                    state_shardings=jax.tree.map(lambda a: a.sharding, state))
    shardings = parallel.batch_shardings_like(batch, config, setup.mesh)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()}
    jitted = jax.jit(make_train_step(xla_setup, config, num_microbatches=1),
                     in_shardings=(xla_setup.state_shardings, setup.frozen_shardings, shardings))
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        cost = jitted.lower(state, setup.abstract_frozen, abstract).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    # The lowered program is the global one (before SPMD partitioning): the mesh's devices share it.
    return float(flops) / setup.mesh.size if flops and flops > 0 else None


def _valid_entry(entry) -> bool:
    """A model FLOPs cache entry CompiledSteps can use: a positive count (and its seconds, if any)."""
    numbers = isinstance(entry, dict) and all(
        isinstance(entry.get(f, 0.0), (int, float)) for f in ("flops", "seconds"))
    return numbers and entry.get("flops", 0.0) > 0


def not_model_flops(setup, config, batch) -> str:
    """Why XLA's count of this step's compiled program is not the model's work ("" where it is): the
    rule CompiledSteps and bench/train_step.py apply before asking for `model_flops`."""
    if config.task != "diffusion":
        return ""
    kernel = layers.resolved_kernel(config.model.attention)
    tokens = _longest_attention(setup, batch)
    reasons = []
    if kernel != "xla" and tokens > BLOCK:
        reasons.append(f"with {kernel!r} attention on {tokens} tokens XLA's count misses attention "
                       "work (a loop body counts once, a custom call not at all)")
    if config.model.remat != "none":
        reasons.append(f"remat {config.model.remat!r} adds recomputation")
    if config.model.scan_blocks:
        reasons.append("the scanned transformer blocks' loop body counts once")
    if microbatches(config) > 1:
        reasons.append(f"the loop over {microbatches(config)} microbatches counts once")
    return "; ".join(reasons)


def _longest_attention(setup, batch) -> int:
    """Tokens of the UNet's highest-resolution attention level for this batch."""
    depths = setup.models.unet.config.transformer_depth
    first = next((i for i, d in enumerate(depths) if d), len(depths) - 1)  # else only the mid block
    h, w = (batch["latents"].shape[1:3] if "latents" in batch else
            (s // setup.models.downsample for s in batch["image"].shape[1:3]))
    return (h >> first) * (w >> first)


def compiler_layouts(setup, config) -> bool:
    """Whether the step chooses the train state's memory layouts: config.state_layout "compiler", or "auto"
    (the default) on GPUs. With row-major state XLA:GPU transposes the fp32 state of every convolution
    kernel to cuDNN's filter order and back inside the update, and copies some of it to keep the donated
    buffers apart: 2.5x the update's bytes for those 333 M params of the base UNet (bench/RESULTS.md,
    session 18). On TPUs the effect is not measured yet, so "auto" keeps row-major there; XLA:CPU chooses
    row-major anyway."""
    mode = config.state_layout
    if mode == "auto":
        mode = "compiler" if setup.mesh.devices.flat[0].platform == "gpu" else "default"
    return mode == "compiler"


def state_formats(setup, config):
    """The train state's in and out shardings for the jitted step: `Format(Layout.AUTO, sharding)` for every
    leaf where the step chooses the layouts (`compiler_layouts`), else the shardings (row-major)."""
    if not compiler_layouts(setup, config):
        return setup.state_shardings
    return jax.tree.map(lambda s: Format(Layout.AUTO, s), setup.state_shardings)


def _same_layouts(a, b) -> bool:
    return all(x.layout == y.layout for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def place(tree, formats):
    """`tree` with each leaf in the layout of its Format in `formats` (a compiled step's input formats): a
    leaf already there is kept; the others are copied one at a time with their source donated, so moving a
    state needs one leaf's memory more, not a second state. The caller's references to moved leaves are
    invalid afterwards, as after a donated step."""

    def one(x, f):
        return x if x.format.layout == f.layout else jax.device_put(x, f, donate=True)

    return jax.tree.map(one, tree, formats)


class CompiledSteps:
    """One AOT-compiled train step per batch shape (bucket), compiled on first sight of the shape.

    Prints each compiled step's memory and FLOPs (STYLE.md 3) and keeps them for MFU. Where XLA's count of
    the compiled program is not the model's work (`not_model_flops`), the model's count (`model_flops`:
    a second lowering, ~30 s of host time per bucket for SDXL) is taken off the compile path: it is read
    from `cache_path` (a JSON file, see `_count_key`) when an earlier run counted the same thing, else
    counted by one background thread while training runs; `flops` is None (mfu not logged) until then.
    """

    CACHE_FORMAT = 1

    def __init__(self, setup, config, *, log=print, cache_path=None):
        self.setup, self.config, self.log = setup, config, log
        self.cache_path = cache_path  # model FLOPs counts kept across runs (a workdir's model_flops.json)
        rep = parallel.replicated(setup.mesh)
        self._fn = make_train_step(setup, config)
        self._rep = rep
        self._state_in = state_formats(setup, config)
        self._chooses = any(isinstance(f, Format) for f in jax.tree.leaves(self._state_in))
        # The state's formats in every compiled step where the step chooses them: the first compiled step's
        # choice; a later bucket whose own choice differs is compiled again with these.
        self.state_formats = None
        self._compiled = {}
        self.stats = {}
        self.compile_seconds = 0.0
        self._lock = threading.Lock()  # precompile's threads add to compile_seconds
        # The background model-FLOPs counts: one at a time, in submission order.
        self._count_lock = threading.RLock()
        self._count_queue = collections.deque()  # (key, abstract batch, why, name) not yet started
        self._counting = False  # a count is in flight on self._executor
        self._counts_idle = threading.Event()
        self._counts_idle.set()
        self._executor = None  # created with the first count
        self._disk = None  # (cache path, {cache key: entry}) as read from / written to the cache file

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

    def place(self, state):
        """`state` in the compiled steps' layouts (module `place`); as is before any compile, or where the
        state stays row-major."""
        return state if self.state_formats is None else place(state, self.state_formats)

    def _compile(self, batch, batch_shardings, abstract_batch, state_in):
        setup, config = self.setup, self.config
        jitted = jax.jit(
            self._fn,
            in_shardings=(state_in, setup.frozen_shardings, batch_shardings),
            out_shardings=(state_in, self._rep),
            donate_argnums=(0,),
        )
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
            lowered = jitted.lower(setup.abstract_state, setup.abstract_frozen, abstract_batch)
            try:
                return lowered.compile()
            except Exception as e:  # TPU: XLA's compile-time HBM check
                if is_out_of_memory(e):
                    raise DeviceMemoryError(memory_advice(config, setup.mesh, batch, e)) from e
                note = vendor_kernel_note(config)
                if note:
                    e.add_note(note)
                raise

    def compile(self, batch):
        setup, config = self.setup, self.config
        batch_shardings = parallel.batch_shardings_like(batch, config, setup.mesh)
        abstract_batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in batch.items()
        }
        t0 = time.time()
        state_in = self._state_in if self.state_formats is None else self.state_formats
        compiled = self._compile(batch, batch_shardings, abstract_batch, state_in)
        if self._chooses:
            chosen = compiled.input_formats[0][0]
            with self._lock:
                if self.state_formats is None:
                    self.state_formats = chosen
            agreed = self.state_formats
            if not (_same_layouts(chosen, agreed) and _same_layouts(compiled.output_formats[0], agreed)):
                # buckets compiled side by side chose differently, or the step returns its state in other
                # layouts: compiled again to take and return the agreed ones, so no step relayouts the state
                compiled = self._compile(batch, batch_shardings, abstract_batch, agreed)
        seconds = time.time() - t0
        with self._lock:
            self.compile_seconds += seconds
        stats = metrics_lib.compiled_stats(compiled)
        stats["compile_seconds"] = seconds
        what, shape = _pixels(batch)
        name = f"train step for batch {shape[0]} {what} {shape[1:3]}"
        key = self.key(batch)
        self.stats[key] = stats
        self.log(metrics_lib.format_stats(name, stats) + f" (compiled in {seconds:.1f} s)")
        why = not_model_flops(self.setup, self.config, batch)
        if not why and not stats["flops"] > 0:  # NaN: the backend gave the compiled program no count
            why = "the compiled program has no cost analysis on this backend"
        if why:
            stats["model_flops"] = None  # flops() gives None (mfu not logged) until the model's count is in
            if jax.process_index() == 0:  # the only one that logs: the other hosts' CPUs feed the data
                cached = self._cached_count(key)
                if cached is None:
                    self._submit_count(key, abstract_batch, why, name)
                else:
                    stats["model_flops"] = cached["flops"]
                    how = f"counted in {cached.get('seconds', 0.0):.1f} s by an earlier run, read from "
                    self._log_count(name, cached["flops"], why, how + str(self.cache_path))
        return compiled

    # The model's FLOPs, counted in the background and cached on disk.

    def _log_count(self, name, flops, why, how) -> None:
        self.log(f"  mfu: the model's {flops / 1e12:.3f} TFLOPs per device per step (the step with "
                 f"materialised attention and no remat, {how}) for the {name}: {why}" if flops else
                 f"  mfu not logged for the {name}: {why}, and this backend gives no count of the model's "
                 "FLOPs")

    def _submit_count(self, key, abstract_batch, why, name) -> None:
        with self._count_lock:
            self._count_queue.append((key, abstract_batch, why, name))
            self._counts_idle.clear()
            if not self._counting:
                self._start_next_count()

    def _start_next_count(self) -> None:
        """Hands the next queued count to the worker thread (under self._count_lock). Counts are submitted
        one at a time, each when the previous one ends: at interpreter exit `submit` refuses new work, so
        the process waits for at most the count in flight, not for every bucket still queued."""
        self._counting = False
        if self._count_queue:
            item = self._count_queue.popleft()
            if self._executor is None:
                self._executor = futures.ThreadPoolExecutor(1, thread_name_prefix="model_flops")
            try:
                self._executor.submit(self._count, *item)
                self._counting = True
                return
            except RuntimeError:  # the interpreter (or close()) is shutting the executor down
                self._count_queue.clear()
        self._counts_idle.set()

    def _count(self, key, abstract_batch, why, name) -> None:
        """The worker thread's job: count one bucket, log and cache it. Never raises (training goes on)."""
        try:
            t0 = time.time()
            try:
                flops = model_flops(self.setup, self.config, abstract_batch)
            except Exception as e:  # only the mfu metric depends on the count
                self.log(f"  mfu not logged for the {name}: counting the model's FLOPs failed "
                         f"({type(e).__name__}: {e})")
                return
            seconds = time.time() - t0
            self.stats[key]["model_flops"] = flops
            self._log_count(name, flops, why, f"counted in {seconds:.1f} s in the background")
            if flops:
                self._store_count(key, flops, seconds, name)
        except Exception as e:  # e.g. an unwritable cache: the count itself is in self.stats
            self.log(f"  model FLOPs count of the {name}: {type(e).__name__}: {e}")
        finally:
            with self._count_lock:
                self._start_next_count()

    def wait_for_counts(self, timeout: float | None = None) -> bool:
        """Blocks until no model-FLOPs count is queued or running; False if `timeout` passed first."""
        return self._counts_idle.wait(timeout)

    def close(self) -> None:
        """Drops the counts not yet started, waits for the one in flight and stops the worker thread (a
        later count starts a new one). Not needed for a clean exit: see _start_next_count."""
        with self._count_lock:
            self._count_queue.clear()
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _count_key(self, key) -> str:
        """The cache key of a bucket's count: a digest of everything the count depends on: the batch's
        shapes and dtypes, the mesh size (the count is divided over it), the models' configs (the UNet's
        with attention and remat normalised as model_flops does: they do not change the count), the
        diffusion, optimizer and EMA settings (all in the step), the task and the JAX version."""
        models, config = self.setup.models, self.config

        def conf(module):
            c = getattr(module, "config", None)
            return dataclasses.asdict(c) if dataclasses.is_dataclass(c) else repr(c)

        unet = models.unet
        what = {
            "batch": [list(k) for k in key],
            "mesh_size": int(self.setup.mesh.size),
            "task": config.task,
            "jax": jax.__version__,
            "unet": dataclasses.asdict(dataclasses.replace(unet.config, attention="xla", remat="none",
                                                           scan_blocks=False)),
            "vae": conf(models.vae),
            "conditioner": conf(models.conditioner),
        }
        for section in ("diffusion", "optim", "ema"):
            value = getattr(config, section, None)
            what[section] = value.to_dict() if hasattr(value, "to_dict") else value
        text = json.dumps(what, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _disk_entries(self) -> dict:
        """The cache file's entries (read once per path; {} without a cache, a missing or corrupt file)."""
        path = self.cache_path
        with self._count_lock:
            if self._disk is not None and self._disk[0] == path:
                return self._disk[1]
            entries = {}
            if path:
                try:
                    p = epath.Path(path)
                    if p.exists():
                        data = json.loads(p.read_text())
                        if not isinstance(data, dict) or data.get("format") != self.CACHE_FORMAT:
                            raise ValueError(f"not a format-{self.CACHE_FORMAT} model FLOPs cache")
                        entries = {k: v for k, v in data["counts"].items() if _valid_entry(v)}
                except Exception as e:  # the cache only saves time: count again
                    self.log(f"warning: ignoring the model FLOPs cache {path} ({type(e).__name__}: {e}); "
                             "the counts will be redone")
            self._disk = (path, entries)
            return entries

    def _cached_count(self, key) -> dict | None:
        if not self.cache_path:
            return None
        try:
            return self._disk_entries().get(self._count_key(key))
        except Exception as e:  # the cache only saves time: count again
            self.log(f"warning: no model FLOPs cache lookup ({type(e).__name__}: {e})")
            return None

    def _store_count(self, key, flops, seconds, name) -> None:
        if not self.cache_path or jax.process_index() != 0:  # every process reads, process 0 writes
            return
        entries = self._disk_entries()
        with self._count_lock:
            entries[self._count_key(key)] = {
                "flops": flops, "seconds": round(seconds, 2), "bucket": name,
                "mesh_size": int(self.setup.mesh.size), "jax": jax.__version__,
            }
            text = json.dumps({"format": self.CACHE_FORMAT, "counts": entries}, indent=1, sort_keys=True)
        path = epath.Path(self.cache_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
        tmp.write_text(text)
        tmp.replace(path)

    def flops(self, batch) -> float | None:
        """The model's FLOPs per device for one step of this batch shape (what the logged mfu uses): the
        compiled program's count where that is the model's work, else the model's count once it is in;
        None while it is being counted, or where the count failed or the backend gives none."""
        stats = self.stats.get(self.key(batch), {})
        return stats["model_flops"] if "model_flops" in stats else stats.get("flops")
