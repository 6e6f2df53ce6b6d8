"""The models a training run uses, the TrainState pytree, its abstract shapes and shardings, and init.

STYLE.md 3: mesh -> abstract state (jax.eval_shape) -> shardings -> jitted init with out_shardings.
The trained model is the UNet; the VAE and the text conditioner are frozen and live outside the
TrainState (not in the optimizer state), sharded by the same logical rules. The train step takes them
held in their compute dtype (`hold_frozen`), which is exact; the frozen/ checkpoint keeps them as loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import held, optim, parallel
from sdxl_jax.models import init_rng


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    # The params in their compute dtype (held.py; None for the norms' fp32 params), where config.compute_copy
    # holds them (uses_compute_copy): written by the step's update and by every state this module builds or
    # a checkpoint restores, never saved; code that replaces the params elsewhere must call
    # with_compute_copy. The step's forward reads them (compute_weights) and casts no weight. None: the
    # step casts the params itself.
    compute_params: Any = None


@dataclasses.dataclass(frozen=True)
class Models:
    unet: nn.Module
    vae: nn.Module
    conditioner: nn.Module
    latent_scale: float
    latent_channels: int
    downsample: int


def _with_dtypes(preset, **fields):
    """A preset dataclass with the config's dtypes, for the fields the preset actually has."""
    names = {f.name for f in dataclasses.fields(preset)}
    return dataclasses.replace(preset, **{k: v for k, v in fields.items() if k in names and v is not None})


def build_models(config) -> Models:
    from sdxl_jax import conditioning
    from sdxl_jax.models import unet as unet_lib
    from sdxl_jax.models import vae as vae_lib

    m = config.model
    for table, key, name in (
        (unet_lib.PRESETS, m.unet, "model.unet"),
        (vae_lib.PRESETS, m.vae, "model.vae"),
        (conditioning.PRESETS, m.text, "model.text"),
    ):
        if key not in table:
            raise ValueError(f"config.{name}={key!r} is not a preset; choose one of {sorted(table)}")
    text_cfg = conditioning.PRESETS[m.text].with_dtype(m.dtype, m.param_dtype)
    text_cfg = text_cfg.replace(ucg_rate_text=float(config.diffusion.ucg_rate))
    # The conditioner defines what the UNet receives: its cross-attention and vector widths follow the
    # conditioner (equal for the SDXL presets; the tiny presets only agree this way).
    unet_cfg = _with_dtypes(
        unet_lib.PRESETS[m.unet],
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        attention=m.attention,
        remat=m.remat,
        scan_blocks=m.scan_blocks,
        context_dim=text_cfg.context_dim,
        adm_in_channels=text_cfg.vector_dim,
    )
    vae_cfg = _with_dtypes(
        vae_lib.PRESETS[m.vae], dtype=m.vae_dtype, param_dtype=m.param_dtype, scaling_factor=m.latent_scale
    )
    return Models(
        unet=unet_lib.UNet(unet_cfg),
        vae=vae_lib.AutoencoderKL(vae_cfg),
        conditioner=conditioning.Conditioner(text_cfg),
        latent_scale=float(vae_cfg.scaling_factor),
        latent_channels=int(vae_cfg.latent_channels),
        downsample=int(vae_cfg.downsample_factor),
    )


def example_batch(config, batch_size: int, height: int, width: int) -> dict:
    """Host arrays with the shapes and dtypes of one data batch (for init and AOT compilation)."""
    return {
        "image": np.zeros((batch_size, height, width, 3), np.float32),
        "ids_l": np.zeros((batch_size, 77), np.int32),
        "ids_g": np.zeros((batch_size, 77), np.int32),
        "original_size": np.full((batch_size, 2), (height, width), np.int32),
        "crop_coords_top_left": np.zeros((batch_size, 2), np.int32),
        "target_size": np.full((batch_size, 2), (height, width), np.int32),
        "aesthetic_score": np.full((batch_size,), 6.0, np.float32),
    }


def encode_conditioning(models: Models, text_params, batch: dict, rng, *, train: bool):
    """{"crossattn", "vector"} from the frozen conditioner; `rng` drives the per-embedder dropout."""
    return models.conditioner.apply({"params": text_params}, batch, ucg_rng=rng if train else None)


def _init_rngs(rng):
    return dict(zip(("unet", "vae", "text"), jax.random.split(rng, 3), strict=True))


def _small_inputs(config, models: Models):
    f = models.downsample
    side = 8 * f  # init needs shapes, not the training resolution: parameters do not depend on it
    batch = {k: jnp.asarray(v[:1]) for k, v in example_batch(config, 1, side, side).items()}
    return batch, side // f


def init_unet(models: Models, config, rng):
    batch, h = _small_inputs(config, models)
    text_cfg = models.conditioner.config
    x = jnp.zeros((1, h, h, models.latent_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    context = jnp.zeros((1, batch["ids_g"].shape[1], text_cfg.context_dim), jnp.float32)
    y = jnp.zeros((1, text_cfg.vector_dim), jnp.float32)
    return models.unet.init(init_rng.key(rng), x, t, context, y)["params"]


def init_frozen(models: Models, config, rng, parts=("vae", "text")) -> dict:
    """The random frozen params of `parts`; each part's draw is the same whichever others are drawn."""
    batch, _ = _small_inputs(config, models)
    rngs = _init_rngs(rng)
    out = {}
    if "vae" in parts:
        out["vae"] = models.vae.init(init_rng.key(rngs["vae"]), batch["image"])["params"]
    if "text" in parts:
        out["text"] = models.conditioner.init(init_rng.key(rngs["text"]), batch)["params"]
    return out


def uses_compute_copy(config, mesh) -> bool:
    """Whether the train state holds the UNet's params in their compute dtype as well: config.compute_copy
    "on", or "auto" (the default) on GPUs without rematerialisation. There the step's forward then casts
    no weight: the base's step at 1024^2 and 4 rows on an H200 loses 764 kernels and 1.8 ms of its
    roofline (2.8 ms of casts, less 1.1 ms of the update writing the copy), for 0.56 GiB more at its peak
    (bench/RESULTS.md, session 24). A run that rematerialises has chosen memory over speed: there the copy
    (2 bytes a param, 4.8 GiB for the base) costs more of the peak (remat dots at 1 row: +3.5 GiB), so
    "auto" keeps it off, as on TPUs: XLA:TPU casts each fsdp shard before gathering it, so the copy saves
    only those casts there, for 0.60 GiB per chip at fsdp 8 (a v5e's 2-row scanned step: 14.98 GiB
    allocated of 16 with it, 14.40 without; bench/RESULTS.md, session 25)."""
    mode = config.get("compute_copy", "auto")  # config_lib.validate checks its value
    if mode == "auto":
        return mesh.devices.flat[0].platform == "gpu" and config.model.remat == "none"
    return mode == "on"


def compute_copy(params, like):
    """`params` cast to the dtypes of `like` (held.abstract of the UNet's config, or a compute copy) where
    those differ; None where they do not, or where `like` holds None: the norms' fp32 params, which the
    forward reads from the params (a copy of each would cost the step a copy kernel: 512 in the base).
    None for a `like` of None (a state without the copy)."""
    if like is None:
        return None
    same = lambda x, a: a is None or a.dtype == x.dtype  # noqa: E731
    return jax.tree.map(lambda x, a: None if same(x, a) else x.astype(a.dtype), params, like)


def compute_weights(params, copy):
    """The params the forward computes from: the compute copy's, and the params' where it holds None."""
    return jax.tree.map(lambda p, c: p if c is None else c, params, copy)


def make_state_fn(models: Models, config, tx, with_compute_copy: bool = False):
    """rng -> boxed TrainState (params carry their logical axis names), with the params' compute copy
    where `with_compute_copy`."""

    def init(rng):
        params = init_unet(models, config, _init_rngs(rng)["unet"])
        ema = jax.tree.map(lambda p: p, params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=ema,
            rng=jax.random.fold_in(rng, 1),
            compute_params=_boxed_copy(params, models) if with_compute_copy else None,
        )

    return init


def _boxed_copy(params, models: Models):
    """compute_copy of boxed params: the copy's leaves keep their boxes' logical axis names."""
    like = held.abstract(models.unet.config)
    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731

    def one(x, a):
        cast = compute_copy(x.unbox() if boxed(x) else x, a)
        return x.replace_boxed(cast) if boxed(x) and cast is not None else cast

    return jax.tree.map(one, params, like, is_leaf=boxed)


@dataclasses.dataclass
class Setup:
    """Everything static about a run: models, optimizer, abstract shapes and shardings."""

    models: Models
    tx: Any
    lr_schedule: Any
    mesh: Any
    state_shardings: Any
    abstract_state: Any  # TrainState of ShapeDtypeStruct with .sharding
    frozen_shardings: Any
    abstract_frozen: Any  # as the train step takes them: in their compute dtype (hold_frozen)
    jitted: dict = dataclasses.field(default_factory=dict)  # init programs, reused when the Setup is


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def make_setup(config, mesh) -> Setup:
    if config.task == "autoencoder":
        from sdxl_jax.autoencoder import trainer

        return trainer.make_setup(config, mesh)
    models = build_models(config)
    tx, lr = optim.make_optimizer(config.optim, config.total_steps)
    rng = jax.random.PRNGKey(config.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules(config)):
        boxed_state = jax.eval_shape(make_state_fn(models, config, tx, uses_compute_copy(config, mesh)), rng)
        boxed_frozen = jax.eval_shape(lambda r: init_frozen(models, config, r), rng)
    state_shardings = parallel.logical_shardings(boxed_state, mesh, config)
    frozen_shardings = parallel.logical_shardings(boxed_frozen, mesh, config)
    # The step takes the frozen models held in their compute dtype (held.py): exact, half the bytes in
    # bf16, and XLA has no casts of them to make (and hold through the microbatch loop: RESULTS session 12).
    held_frozen = {"vae": held.abstract(models.vae.config), "text": held.abstract(models.conditioner.config)}
    return Setup(
        models=models,
        tx=tx,
        lr_schedule=lr,
        mesh=mesh,
        state_shardings=state_shardings,
        abstract_state=_abstract(nn.meta.unbox(boxed_state), state_shardings),
        frozen_shardings=frozen_shardings,
        abstract_frozen=_abstract(held_frozen, frozen_shardings),
    )


def init_state(setup: Setup, config, formats=None):
    """The freshly initialised TrainState, created directly in its sharded layout, or in `formats` (a
    compiled step's input formats for the state, `compiled.input_formats[0][0]`) when given, so that the
    step takes it without a copy."""
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        return _init_program(setup, config, "state", formats)(jax.random.PRNGKey(config.seed))


def init_frozen_params(setup: Setup, config, parts=None):
    """The config seed's random frozen params (of `parts`, default all), held as the train step takes them
    (drawn in the models' param_dtype, then cast, so the values do not depend on the holding)."""
    parts = tuple(setup.abstract_frozen) if parts is None else tuple(parts)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        return _init_program(setup, config, ("frozen", parts))(jax.random.PRNGKey(config.seed))


def state_from_params(setup: Setup, config, params, ema_params=None):
    """A fresh TrainState around given weights (init_from): step 0, a fresh optimizer state, the EMA from
    `ema_params` or a copy of `params`, the seed's rng; init_state's state with the params replaced, built
    by a program of zeros and copies instead of the random draw."""
    if "from_params" not in setup.jitted:

        def build(params, ema):
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.tx.init(params),
                              ema_params=ema, rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
                              compute_params=compute_copy(params, setup.abstract_state.compute_params))

        setup.jitted["from_params"] = jax.jit(build, out_shardings=setup.state_shardings)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        return setup.jitted["from_params"](params, params if ema_params is None else ema_params)


def compile_init(setup: Setup, config, formats=None):
    """Compiles init_state's (with these `formats`) and init_frozen_params's programs now, so their first
    calls only run: a benchmark compiles everything before its turn on the device (bench/progress.py).
    For the SDXL base, compiled for an H200 on the 2-core host: the state's 71 s, the frozen params' 29 s
    (with threefry draws they took 492 s and 226 s: models/init_rng.py)."""
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)  # jax.random.PRNGKey's
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        for what, f in (("state", formats), (("frozen", tuple(setup.abstract_frozen)), None)):
            key = _init_key(what, f)
            setup.jitted[key] = _init_program(setup, config, what, f).lower(rng).compile()


def _init_key(what, formats):
    return what if formats is None else (what, tuple(jax.tree.leaves(formats)))  # Formats hash by value


def _init_program(setup: Setup, config, what, formats=None):
    """The jitted (or compile_init's compiled) program that draws the state, or ("frozen", parts)."""
    key = _init_key(what, formats)
    if key not in setup.jitted:
        if what == "state":
            copies = setup.abstract_state.compute_params is not None
            fn = make_state_fn(setup.models, config, setup.tx, copies)
            setup.jitted[key] = jax.jit(lambda r: nn.meta.unbox(fn(r)),
                                        out_shardings=setup.state_shardings if formats is None else formats)
        else:
            parts = what[1]
            held_as = {k: setup.abstract_frozen[k] for k in parts}

            def frozen(r):
                return held.cast(nn.meta.unbox(init_frozen(setup.models, config, r, parts)), held_as)

            shardings = {k: setup.frozen_shardings[k] for k in parts}
            setup.jitted[key] = jax.jit(frozen, out_shardings=shardings)
    return setup.jitted[key]


def with_compute_copy(state, like):
    """`state` with its compute_params made from its params, in the dtypes and shardings of `like` (an
    abstract state's compute_params; None: the state holds none). For a state whose params were set
    outside the step, such as a restored checkpoint's."""
    if like is None:
        return state.replace(compute_params=None)
    shardings = jax.tree.map(lambda a: a.sharding, like)
    copy = jax.jit(lambda params: compute_copy(params, like), out_shardings=shardings)(state.params)
    return state.replace(compute_params=copy)


def hold_frozen(setup: Setup, frozen):
    """Frozen params as loaded (a checkpoint's or converted weights' dtype) -> as the train step takes
    them: setup.abstract_frozen's dtypes (held.py), cast on the devices. Save the frozen/
    checkpoint before holding, so it keeps the precision the weights came with."""
    pairs = zip(jax.tree.leaves(frozen), jax.tree.leaves(setup.abstract_frozen), strict=True)
    if all(x.dtype == a.dtype for x, a in pairs):
        return frozen
    if "hold" not in setup.jitted:
        setup.jitted["hold"] = jax.jit(lambda t: held.cast(t, setup.abstract_frozen),
                                       out_shardings=setup.frozen_shardings)
    return setup.jitted["hold"](frozen)


def put(tree, shardings):
    """Host / differently-sharded arrays -> the run's shardings (used for weights loaded from disk)."""
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), tree, shardings)
