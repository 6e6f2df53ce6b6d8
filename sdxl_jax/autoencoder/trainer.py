"""Autoencoder training (config.task="autoencoder") through the same loop as the diffusion stages.

SDXL sec. 2.4 retrains the LDM autoencoder (same architecture, batch 256 instead of 9, EMA of the
weights). The objective is taming / sgm `LPIPSWithDiscriminator` (see losses.py): L1 and/or L2
reconstruction, KL with a small weight, optional LPIPS, optional PatchGAN with a hinge loss whose
generator term is scaled by the adaptive weight and which starts at `autoencoder.disc_start`.

train_lib dispatches here at four points and keeps everything else (mesh, logical shardings, AOT
compilation per batch shape, checkpoints with the data iterator, resume, SIGTERM, metrics):
    make_setup(config, mesh)        -> train_state.Setup whose models are AutoencoderModels
    make_train_step(setup, config)  -> step_fn(state, frozen, batch) -> (state, metrics)
    initial_state(setup, config)    -> (state, frozen) for a fresh workdir
    preview.make_preview_fn         -> reconstructions + held-out error, EMA vs raw
The TrainState holds params {"vae", "disc"} ("disc" only with a discriminator), one optax transform
per part (optax.multi_transform: the VAE's gradient clipping never sees the discriminator's gradient)
and ema_params {"vae"}: only the VAE weights are averaged; they are what `vae_from` and the exporter use.
Frozen: {"lpips": params} when perceptual_weight > 0, else {}.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sdxl_jax import optim, parallel, train_state
from sdxl_jax.autoencoder import discriminator as disc_lib
from sdxl_jax.autoencoder import losses
from sdxl_jax.models import init_rng
from sdxl_jax.models import vae as vae_lib


@dataclasses.dataclass(frozen=True)
class AutoencoderModels:
    vae: nn.Module
    disc: nn.Module | None  # None: no adversarial term
    lpips: nn.Module | None  # None: no perceptual term


def validate(config) -> None:
    """ValueError naming the key when the autoencoder settings cannot run."""
    import os

    a = config.autoencoder
    if a.discriminator and a.discriminator not in disc_lib.PRESETS:
        raise ValueError(f"config.autoencoder.discriminator={a.discriminator!r} is not a preset; choose '' "
                         f"(none) or one of {sorted(disc_lib.PRESETS)}")
    if a.perceptual_weight > 0 and not os.path.isfile(a.lpips_path):
        raise ValueError(
            f"config.autoencoder.perceptual_weight={a.perceptual_weight} needs "
            "config.autoencoder.lpips_path, "
            f"a safetensors file with the LPIPS VGG16 + lin weights (got {a.lpips_path!r}; nothing is "
            "downloaded); or set perceptual_weight=0"
        )
    if a.l1_weight < 0 or a.l2_weight < 0 or a.l1_weight + a.l2_weight + a.perceptual_weight <= 0:
        raise ValueError("config.autoencoder: l1_weight, l2_weight >= 0 and at least one reconstruction term "
                         f"> 0 (got l1 {a.l1_weight}, l2 {a.l2_weight}, perceptual {a.perceptual_weight})")
    if config.vae_from:
        raise ValueError("config.vae_from is for diffusion stages; an autoencoder run starts from "
                         "config.init_from (an autoencoder workdir or VAE weights)")


def build_models(config) -> AutoencoderModels:
    m, a = config.model, config.autoencoder
    if m.vae not in vae_lib.PRESETS:
        raise ValueError(f"config.model.vae={m.vae!r} is not a preset; "
                         f"choose one of {sorted(vae_lib.PRESETS)}")
    vae_cfg = dataclasses.replace(vae_lib.PRESETS[m.vae], dtype=m.vae_dtype, param_dtype=m.param_dtype,
                                  scaling_factor=m.latent_scale)
    disc = None
    if a.discriminator:
        disc_cfg = dataclasses.replace(disc_lib.PRESETS[a.discriminator], dtype=m.vae_dtype,
                                       param_dtype=m.param_dtype)
        disc = disc_lib.NLayerDiscriminator(disc_cfg)
    lp = None
    if a.perceptual_weight > 0:
        from sdxl_jax.autoencoder import lpips

        lp = lpips.LPIPS(dtype=jnp.dtype(m.vae_dtype))
    return AutoencoderModels(vae=vae_lib.AutoencoderKL(vae_cfg), disc=disc, lpips=lp)


def _example_images(models: AutoencoderModels):
    side = 8 * models.vae.config.downsample_factor  # parameters do not depend on the resolution
    return jnp.zeros((1, side, side, models.vae.config.in_channels), jnp.float32)


def make_optimizer(config, models: AutoencoderModels):
    """One optimizer per trained part, same settings (taming trains both with Adam at the same lr)."""
    tx, lr = optim.make_optimizer(config.optim, config.total_steps)
    parts = ("vae", "disc") if models.disc is not None else ("vae",)
    return optax.multi_transform({p: tx for p in parts}, lambda params: {k: k for k in params}), lr


def make_state_fn(models: AutoencoderModels, tx):
    def init(rng):
        r_vae, r_disc = jax.random.split(rng)
        x = _example_images(models)
        params = {"vae": models.vae.init(init_rng.key(r_vae), x)["params"]}
        if models.disc is not None:
            params["disc"] = models.disc.init(init_rng.key(r_disc), x)["params"]
        return train_state.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params={"vae": jax.tree.map(lambda p: p, params["vae"])},
            rng=jax.random.fold_in(rng, 1),
        )

    return init


def _init_frozen(models: AutoencoderModels, rng):
    if models.lpips is None:
        return {}
    x = _example_images(models)
    return {"lpips": models.lpips.init(init_rng.key(rng), x, x)["params"]}


def make_setup(config, mesh) -> train_state.Setup:
    models = build_models(config)
    tx, lr = make_optimizer(config, models)
    rng = jax.random.PRNGKey(config.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.rules(config)):
        boxed_state = jax.eval_shape(make_state_fn(models, tx), rng)
        boxed_frozen = jax.eval_shape(lambda r: _init_frozen(models, r), rng)
    state_shardings = parallel.logical_shardings(boxed_state, mesh, config)
    frozen_shardings = parallel.logical_shardings(boxed_frozen, mesh, config)
    return train_state.Setup(
        models=models,
        tx=tx,
        lr_schedule=lr,
        mesh=mesh,
        state_shardings=state_shardings,
        abstract_state=train_state._abstract(nn.meta.unbox(boxed_state), state_shardings),
        frozen_shardings=frozen_shardings,
        abstract_frozen=train_state._abstract(nn.meta.unbox(boxed_frozen), frozen_shardings),
    )


def initial_state(setup, config):
    """(state, frozen) of a fresh autoencoder workdir: random init, or the VAE from config.init_from (an
    autoencoder workdir: its raw and EMA weights; a diffusion workdir or VAE weights: those for both).
    The discriminator and the optimizers always start fresh."""
    from sdxl_jax import checkpoint

    if "state" not in setup.jitted:
        fn = make_state_fn(setup.models, setup.tx)
        setup.jitted["state"] = jax.jit(lambda r: nn.meta.unbox(fn(r)), out_shardings=setup.state_shardings)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        state = setup.jitted["state"](jax.random.PRNGKey(config.seed))
    src = config.init_from
    if src:
        shardings = setup.state_shardings.params["vae"]
        if checkpoint.is_workdir(src):
            _, raw = checkpoint.load_params(src, which="raw")
            _, ema = checkpoint.load_params(src, which="ema")
            raw, ema = raw["vae"], ema["vae"]
        else:
            from sdxl_jax import convert

            _, raw = convert.load_vae(src)
            ema = raw
        if raw is None:
            raise ValueError(f"init_from={src} holds no VAE weights")
        from sdxl_jax.train_lib import _check_tree

        _check_tree(raw, setup.abstract_state.params["vae"], f"VAE weights of {src}")
        params = {**state.params, "vae": train_state.put(raw, shardings)}
        state = state.replace(params=params, ema_params={"vae": train_state.put(ema, shardings)})
        print(f"initialised the VAE (raw and EMA) from {src}; fresh optimizer and discriminator")
    frozen = {}
    if setup.models.lpips is not None:
        from sdxl_jax.autoencoder import lpips

        _, lp = lpips.load(config.autoencoder.lpips_path)
        from sdxl_jax.train_lib import _check_tree

        _check_tree(lp, setup.abstract_frozen["lpips"], f"LPIPS weights {config.autoencoder.lpips_path}")
        frozen = {"lpips": train_state.put(lp, setup.frozen_shardings["lpips"])}
    return state, frozen


def make_train_step(setup, config):
    a = config.autoencoder
    models = setup.models
    vae, disc, lp = models.vae, models.disc, models.lpips

    def step_fn(state, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        x = batch["image"].astype(jnp.float32)
        disc_params = state.params.get("disc")

        def generator_loss(p):
            mean, logvar = vae.apply({"params": p}, x, method="encode")
            z = vae_lib.sample_posterior(rng, mean, logvar)

            # The adaptive weight needs the gradients of two losses w.r.t. the decoder's last layer
            # (taming: decoder.conv_out.weight): one decoder pass, pulled back twice through its vjp.
            def decode(kernel):
                conv_out = {**p["decoder"]["conv_out"], "kernel": kernel}
                q = {**p, "decoder": {**p["decoder"], "conv_out": conv_out}}
                return vae.apply({"params": q}, z, method="decode")

            recon, vjp = jax.vjp(decode, p["decoder"]["conv_out"]["kernel"])

            def nll_of(r):
                perceptual = None if lp is None else lp.apply({"params": frozen["lpips"]}, x, r)
                return losses.reconstruction_loss(
                    x, r, l1_weight=a.l1_weight, l2_weight=a.l2_weight, perceptual=perceptual,
                    perceptual_weight=a.perceptual_weight,
                )

            nll, kl = nll_of(recon), losses.kl_loss(mean, logvar)
            g_loss, d_weight = None, jnp.zeros((), jnp.float32)
            if disc is not None:
                def g_of(r):
                    return losses.generator_adversarial_loss(disc.apply({"params": disc_params}, r))

                g_loss = g_of(recon)
                d_weight = losses.adaptive_weight_from_grads(
                    losses.last_layer_grad(vjp, nll_of, recon), losses.last_layer_grad(vjp, g_of, recon),
                    a.disc_weight,
                )
            loss = losses.generator_objective(
                nll, kl, g_loss, d_weight, step=state.step, kl_weight=a.kl_weight, disc_factor=a.disc_factor,
                disc_start=a.disc_start,
            )
            aux = {"nll": nll, "kl": kl, "d_weight": d_weight, "recon": recon}
            if g_loss is not None:
                aux["g_loss"] = g_loss
            return loss, aux

        (loss, aux), g_vae = jax.value_and_grad(generator_loss, has_aux=True)(state.params["vae"])
        recon = jax.lax.stop_gradient(aux.pop("recon"))
        grads = {"vae": g_vae}
        out = {"loss": loss, "grad_norm": optax.tree.norm(g_vae), **aux}
        ok = jnp.isfinite(loss) & jnp.isfinite(out["grad_norm"])
        if disc is not None:
            def d_loss_fn(dp):
                real, fake = disc.apply({"params": dp}, x), disc.apply({"params": dp}, recon)
                d = losses.discriminator_objective(real, fake, step=state.step, disc_factor=a.disc_factor,
                                                   disc_start=a.disc_start)
                return d, (jnp.mean(real), jnp.mean(fake))

            (d_loss, (real, fake)), grads["disc"] = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
            out.update(d_loss=d_loss, logits_real=real, logits_fake=fake,
                       disc_grad_norm=optax.tree.norm(grads["disc"]))
            ok = ok & jnp.isfinite(d_loss) & jnp.isfinite(out["disc_grad_norm"])
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, opt_state = optim.keep(ok, params, state.params), optim.keep(ok, opt_state, state.opt_state)
        ema = optim.ema_step(config.ema, state.ema_params, {"vae": params["vae"]}, state.step, ok)
        if disc is not None:
            # Before disc_start the discriminator does not move at all (its loss is zero, but AdamW's
            # weight decay would still shrink it); its optimizer starts counting at disc_start.
            active = state.step >= a.disc_start
            params = {**params, "disc": optim.keep(active, params["disc"], state.params["disc"])}
            opt_state = _keep_part(opt_state, state.opt_state, "disc", active)
            out["disc_active"] = active.astype(jnp.float32)
        diff = x - recon
        out.update(rec_l1=jnp.mean(jnp.abs(diff)), rec_mse=jnp.mean(jnp.square(diff)),
                   lr=setup.lr_schedule(state.step), nonfinite=1 - ok.astype(jnp.int32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema)
        return new_state, out

    return step_fn


def _keep_part(opt_state, old, part, cond):
    """multi_transform state with inner_states[part] replaced by `old`'s where `cond` is false."""
    inner = dict(opt_state.inner_states)
    inner[part] = optim.keep(cond, inner[part], old.inner_states[part])
    return opt_state._replace(inner_states=inner)
