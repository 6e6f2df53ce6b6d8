"""train_and_evaluate(config, workdir): one training stage, resumable, on any mesh.

Phases (STYLE.md 3): validate config -> mesh -> abstract state and shardings -> restore this workdir's
newest checkpoint, or initialise (from config.init_from: a previous stage's workdir or official weights)
-> data iterator at the restored position -> AOT-compiled step per bucket shape -> loop.
Restarting the same command resumes exactly: the state (incl. rng and step), the data iterator position
and hence the losses are those of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sdxl_jax import checkpoint, config_lib, parallel, profiling, train_state, train_step
from sdxl_jax import metrics as metrics_lib
from sdxl_jax.train_step import CompiledSteps


class NonFiniteError(RuntimeError):
    pass


def enable_compilation_cache(config) -> None:
    path = os.path.expanduser(config.compilation_cache_dir)
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _check_tree(loaded, abstract, what: str) -> None:
    """Fail with the first mismatching keys when loaded weights do not fit the configured model."""
    flat_l = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    flat_a = {
        jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(abstract)
    }
    if flat_l != flat_a:
        missing = sorted(set(flat_a) - set(flat_l))[:5]
        extra = sorted(set(flat_l) - set(flat_a))[:5]
        shapes = [(k, flat_l[k], flat_a[k]) for k in flat_a if k in flat_l and flat_l[k] != flat_a[k]][:5]
        raise ValueError(
            f"{what} does not match the configured model: missing {missing}, unexpected {extra}, "
            f"shape mismatches (key, loaded, expected) {shapes}. Check config.model against the weights."
        )


def _load_frozen_from_weights(setup, config):
    """Frozen VAE / text params from vae_from / text_from / official init_from weights, else None each."""
    from sdxl_jax import convert

    official = config.init_from if config.init_from and not checkpoint.is_workdir(config.init_from) else ""
    out = {}
    vae_path = config.vae_from or official
    if vae_path and checkpoint.is_workdir(vae_path):
        # An autoencoder workdir gives its EMA VAE (SDXL sec. 2.4); a diffusion workdir its frozen VAE.
        _, loaded = checkpoint.load_params(vae_path, which="ema")
        if loaded["vae"] is None:
            raise ValueError(f"vae_from={vae_path} is a workdir without VAE weights")
        _check_tree(loaded["vae"], setup.abstract_frozen["vae"], f"VAE weights of {vae_path}")
        out["vae"] = train_state.put(loaded["vae"], setup.frozen_shardings["vae"])
    elif vae_path:
        _, vae = convert.load_vae(vae_path)
        _check_tree(vae, setup.abstract_frozen["vae"], f"VAE weights {vae_path}")
        out["vae"] = train_state.put(vae, setup.frozen_shardings["vae"])
    text_path = config.text_from or official
    if text_path:
        _, text = convert.load_text_encoders(text_path)
        _check_tree(text, setup.abstract_frozen["text"], f"text encoder weights {text_path}")
        out["text"] = train_state.put(text, setup.frozen_shardings["text"])
    return out


def initial_state(setup, config):
    """(state, frozen) for a stage that has no checkpoint of its own yet. With init_from, the state is
    built around the loaded weights without drawing random ones (train_state.state_from_params)."""
    if config.task == "autoencoder":
        from sdxl_jax.autoencoder import trainer

        return trainer.initial_state(setup, config)
    src = config.init_from
    if src and checkpoint.is_workdir(src):
        # A previous stage: params and EMA carry over, the optimizer starts fresh (SDXL stages 1 -> 2 -> 3).
        params, step = checkpoint.restore_params(src, "params", setup.abstract_state.params)
        ema, _ = checkpoint.restore_params(src, "ema_params", setup.abstract_state.ema_params, step=step)
        _check_tree(params, setup.abstract_state.params, f"params of {src}")
        state = train_state.state_from_params(setup, config, params, ema)
        print(f"initialised params and EMA from {src} step {step}; fresh optimizer")
    elif src:
        from sdxl_jax import convert

        _, params = convert.load_unet(src, scan_blocks=config.model.scan_blocks)
        _check_tree(params, setup.abstract_state.params, f"UNet weights {src}")
        params = train_state.put(params, setup.state_shardings.params)
        state = train_state.state_from_params(setup, config, params)
        print(f"initialised the UNet from {src}")
    else:
        state = train_state.init_state(setup, config)
    return state, initial_frozen(setup, config)


def initial_frozen(setup, config):
    """The frozen VAE / text params a fresh diffusion stage starts with: the config seed's random init,
    replaced by a previous stage's (init_from workdir), then by vae_from / text_from / official init_from
    weights. Only the parts nothing replaces are drawn. `prepare --encode` uses it too, so a latent cache
    matches the run that reads it."""
    loaded = _load_frozen_from_weights(setup, config)
    src = config.init_from
    frozen = None
    if src and checkpoint.is_workdir(src):
        frozen = checkpoint.load_frozen(src, setup.frozen_shardings)
    if frozen is None:
        missing = tuple(k for k in setup.abstract_frozen if k not in loaded)
        frozen = train_state.init_frozen_params(setup, config, missing) if missing else {}
    return {**frozen, **loaded}


def make_iterator(config, *, start_step: int, data_state, block=None, workdir=None):
    """The data iterator at `start_step`. With `workdir`, the dataset index is kept in workdir/data_index
    (data/index_cache.py): the first start splits the indexing over the processes, restarts read it."""
    from sdxl_jax import data as data_lib
    from sdxl_jax import tokenizer

    it = data_lib.make_train_iterator(
        config.data,
        seed=config.seed,
        global_batch_size=config.data.batch_size,
        # (block, num_blocks) from parallel.host_batch_block: the rows the mesh puts on this host's devices.
        process_index=block[0] if block else jax.process_index(),
        process_count=block[1] if block else jax.process_count(),
        tokenizer=tokenizer.load_pair(),
        start_step=start_step,
        index_dir=os.path.join(workdir, "data_index") if workdir else None,
        # Every process, not the batch block (several hosts may feed one block).
        index_process=(jax.process_index(), jax.process_count()),
        # The coordination-service barrier: hosts may arrive minutes apart (one reads the index, another
        # probes what it could not read), beyond what a device or gloo collective waits.
        sync=parallel.sync_hosts,
    )
    if data_state is not None:
        it.set_state(data_state)
    return it


class _Preemption:
    """SIGTERM (preemption, scancel, kill) sets a flag; the loop saves and exits at the next step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, preemption is then orbax's alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def train_and_evaluate(config, workdir: str, *, devices=None, after_step=None) -> dict:
    """Train one stage into `workdir`; returns the last logged metrics.

    `devices` (default: all) are the devices of the mesh. `after_step(step, state)` is called after every
    step (tests use it to simulate a crash or a preemption).
    """
    t0 = time.time()
    parallel.maybe_initialize_distributed()
    devices = jax.devices() if devices is None else list(devices)
    config_lib.validate(config, num_devices=len(devices), process_count=jax.process_count())
    enable_compilation_cache(config)
    mesh = parallel.make_mesh(config.mesh, devices)
    print(parallel.describe_topology(mesh, config), flush=True)  # every host, once
    setup, steps = _setup_and_steps(config, mesh)
    steps.cache_path = os.path.join(workdir, "model_flops.json")  # mfu's FLOPs counts, kept for restarts
    print(f"built the models and shardings in {time.time() - t0:.1f} s")

    t0 = time.time()
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    restored = ckpt.restore_latest(setup.abstract_state)
    if restored is not None:
        state, data_state, step = restored
        frozen = checkpoint.load_frozen(workdir, setup.frozen_shardings)
        if frozen is None:
            raise FileNotFoundError(f"{workdir}/frozen is missing; it is written when a stage starts")
        print(f"resumed {workdir} at step {step}")
    else:
        state, frozen = initial_state(setup, config)
        data_state, step = None, 0
    checkpoint.write_config(workdir, config)
    checkpoint.save_frozen(workdir, frozen)
    frozen = train_state.hold_frozen(setup, frozen)  # after saving: frozen/ keeps the loaded precision
    print(f"state ready at step {step} in {time.time() - t0:.1f} s")

    t0 = time.time()
    iterator = make_iterator(
        config,
        start_step=step,
        data_state=data_state,
        block=parallel.host_batch_block(config, mesh),
        workdir=workdir,
    )
    print(f"data iterator ready in {time.time() - t0:.1f} s")
    writer = metrics_lib.MetricWriter(workdir, config.total_steps)
    preview = _make_preview(setup, config, workdir, writer)
    pending, last, in_a_row, extra, placed = [], {}, 0, {}, False
    profiler = profiling.StepProfiler(config, workdir, first_step=step)
    try:
        with _Preemption() as preemption:
            writer.start(step)
            while step < config.total_steps:
                batch = parallel.global_batch(next(iterator), config, mesh)
                n_compiled = len(steps.stats)
                if not n_compiled:  # every bucket the schedule can draw, compiled together
                    steps.precompile([batch, *_bucket_batches(iterator, batch)])
                compiled = steps.get(batch)
                new_step = len(steps.stats) != n_compiled
                if new_step or not placed:
                    # into the layouts the compiled steps take (restored or initial state is row-major);
                    # the steps return it in the same layouts
                    state, placed = steps.place(state), True
                if new_step:  # compile time must not count as step time
                    extra["compile_seconds"] = steps.compile_seconds
                    parallel.sync_hosts("compiled a train step")  # hosts compile at different speeds
                    writer.start(step)
                profiler.before_step(step, state)
                try:
                    state, out = compiled(state, frozen, batch)
                except Exception as e:  # GPU: the step's buffers are allocated when it runs
                    if train_step.is_out_of_memory(e):
                        advice = train_step.memory_advice(config, mesh, batch, e)
                        raise train_step.DeviceMemoryError(advice) from e
                    note = train_step.vendor_kernel_note(config)
                    if note:
                        e.add_note(note)
                    raise
                step += 1
                profiler.after_step(step, state)
                pending.append(out)
                final = step == config.total_steps
                if step % config.log_every == 0 or final or preemption.requested:
                    extra.update({f"skipped_{k}": v for k, v in iterator.skip_counts().items()})
                    last, in_a_row = _log(writer, pending, step, in_a_row, batch, steps, config, extra)
                    pending, extra = [], {}
                    if in_a_row >= config.optim.max_nonfinite_in_a_row:
                        raise NonFiniteError(
                            f"{in_a_row} steps in a row had a non-finite loss or gradient "
                            f"(up to step {step}); "
                            f"their updates were skipped. The last checkpoint in {workdir} is intact: lower "
                            "config.optim.lr, check the data, or raise config.optim.max_nonfinite_in_a_row."
                        )
                # Several hosts must agree on the step to stop at: JAX's preemption sync (orbax) does that.
                multi = jax.process_count() > 1
                stop = ckpt.reached_preemption(step) if multi else preemption.requested
                if step % config.checkpoint_every == 0 or final or stop:
                    ckpt.save(step, state, iterator.get_state(), config, force=True)
                if preview is not None and step % config.sample_every == 0 and not stop:
                    preview(state, frozen, step)
                    parallel.sync_hosts("preview")  # host 0 samples alone; the others wait here
                if after_step is not None:
                    after_step(step, state)
                if stop:
                    print(f"SIGTERM: saved step {step} to {workdir}; rerun the same command to resume")
                    break
    finally:
        profiler.stop(state)  # a trace the run ended inside of
        ckpt.close()
        writer.close()
        iterator.close()
        steps.close()  # its model-FLOPs worker thread; the cached steps start another if run again
    return last


# The last runs' setups and compiled steps, keyed by config and devices: calling train_and_evaluate again in
# the same process (a notebook, the tests, a restart loop) does not rebuild or recompile anything.
_CACHE: dict = {}


def _setup_and_steps(config, mesh):
    key = (config_lib.to_json(config), tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
    if key not in _CACHE:
        while len(_CACHE) >= 2:
            _CACHE.pop(next(iter(_CACHE)))[1].close()
        setup = train_state.make_setup(config, mesh)
        _CACHE[key] = (setup, CompiledSteps(setup, config, log=print))
    return _CACHE[key]


def _bucket_batches(iterator, batch) -> list:
    """Abstract global batches of the iterator's other buckets, when they have the same arrays as `batch`
    (image batches; a latent cache's batches are compiled as they come)."""
    out = []
    for spec in iterator.batch_shapes():
        if set(spec) != set(batch) or any(np.dtype(d) != batch[k].dtype for k, (_, d) in spec.items()):
            return []
        out.append({k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.items()})
    return out


# Stacks the pending steps' metrics on device: one transfer per metric per log instead of one per metric
# per step (on CPU each transfer costs ~2 ms, a third of a tiny model's step).
_stack_metrics = jax.jit(lambda ms: jax.tree.map(lambda *xs: jnp.stack(xs), *ms))


def _log(writer, pending, step, in_a_row, batch, steps, config, extra):
    stacked = _host(_stack_metrics(pending))
    host = [{k: v[i] for k, v in stacked.items()} for i in range(len(pending))]
    for m in host:
        in_a_row = in_a_row + 1 if m["nonfinite"] else 0
    finite = [m for m in host if not m["nonfinite"]] or host
    scalars = {}
    for key in host[0]:
        if key.startswith("count_sigma_"):
            continue
        if key.startswith("loss_sigma_"):
            counts = np.array([m["count" + key[4:]] for m in finite])
            if counts.sum() == 0:
                continue
            total = np.sum([m[key] * c for m, c in zip(finite, counts, strict=True)])
            scalars[key] = float(total / counts.sum())
        elif key == "nonfinite":
            scalars["skipped_nonfinite"] = float(sum(m["nonfinite"] for m in host))
        else:
            scalars[key] = float(np.mean([m[key] for m in finite]))
    scalars.update(extra)
    # FLOPs of one device's program: MFU compares them with one device's peak.
    flops = steps.flops(batch)
    writer.write(step, scalars, batch_size=config.data.batch_size, flops=flops or None)
    return scalars, in_a_row


def _make_preview(setup, config, workdir, writer):
    """Preview images from the EMA params for config.sample.prompts (host 0 writes them); an autoencoder
    run previews reconstructions instead (sdxl_jax/autoencoder/preview.py)."""
    if config.task == "autoencoder":
        from sdxl_jax.autoencoder import preview as ae_preview

        return ae_preview.make_preview_fn(setup, config, workdir, writer)
    try:
        from sdxl_jax import preview
    except ImportError:
        logging.info("no preview sampling available")
        return None
    return preview.make_preview_fn(setup, config, workdir, writer)
