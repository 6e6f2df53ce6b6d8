"""Optimizer (optax AdamW by default), learning-rate schedules and the EMA of the trained params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adam", "sgd")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps` (sgm LambdaLinearScheduler-style), then constant
    or a cosine / linear decay to `lr * end_lr_fraction` at `total_steps`."""
    c = optim_config
    warmup = int(c.warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)
    end = c.lr * c.end_lr_fraction
    if c.schedule == "constant":
        after = optax.constant_schedule(c.lr)
    elif c.schedule == "cosine":
        after = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.end_lr_fraction)
    elif c.schedule == "linear":
        after = optax.linear_schedule(c.lr, end, decay_steps)
    else:
        raise ValueError(f"config.optim.schedule={c.schedule!r}; choose one of {SCHEDULES}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), after], [warmup])


def decay_mask(params):
    """Weight decay on kernels only: norms' scales and all biases are 1-D (standard AdamW practice), or
    2-D when stacked by scanned transformer blocks (models/unet.py: one more leading axis)."""
    from sdxl_jax.models import unet

    return jax.tree_util.tree_map_with_path(lambda path, p: jnp.ndim(p) - unet.is_stacked(path) > 1, params)


def make_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, schedule). The first moment is kept in `mu_dtype` (configs/common.py); optax
    computes each update from the fp32 moment before storing it, so only the stored state is rounded."""
    c = optim_config
    lr = learning_rate_schedule(c, total_steps)
    mu = jnp.dtype(c.mu_dtype)
    if c.name == "adamw":
        opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask,
                          mu_dtype=mu)  # fmt: skip
    elif c.name == "adam":
        opt = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps, mu_dtype=mu)
    elif c.name == "sgd":
        opt = optax.sgd(lr, momentum=c.b1, accumulator_dtype=mu)
    else:
        raise ValueError(f"config.optim.name={c.name!r}; choose one of {OPTIMIZERS}")
    chain = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip and c.grad_clip > 0 else []
    return optax.chain(*chain, opt), lr


def ema_decay(ema_config, step):
    """Decay of an update after step `step` (0-based). For the first `warmup_steps` updates the EMA copies
    the params (decay 0), so an early preview is not dominated by the random init; then `decay`, or
    `decay ** every` when the EMA is updated every `every` steps (ema_step)."""
    after = float(ema_config.decay) ** int(ema_config.every)
    return jnp.where(step < ema_config.warmup_steps, 0.0, after).astype(jnp.float32)


def keep(cond, new, old):
    """`new` where the scalar `cond` holds (a finite step, an active part), else `old`, leaf by leaf."""
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params, in fp32 whatever the param dtype."""
    return jax.tree.map(
        lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype),
        ema_params,
        params,
    )


def ema_due(ema_config, step):
    """Whether the EMA is updated after step `step` (0-based): every step of the warm-up, then after
    every `every`-th step counted from its end."""
    every = int(ema_config.every)
    return (step < ema_config.warmup_steps) | ((step + 1 - ema_config.warmup_steps) % every == 0)


def ema_step(ema_config, ema_params, params, step, ok):
    """The EMA after step `step` (0-based) given the step's new `params`; a step that is not `ok` (not
    finite) leaves it as it was.

    With `ema.every` = k > 1 the update runs after every k-th step only, with decay ** k: the same
    average (its time constant, 1 / (1 - decay) steps, is thousands of steps) lagging the per-step one by
    under k steps, for 1/k of its traffic: 8 bytes per parameter per step, the fp32 EMA read and written
    (an update step also reads the new params again). The skipped steps take the lax.cond's other branch,
    which passes the buffers through. Estimated on an H100 for the base UNet at 1024^2 (bench/RESULTS.md,
    session 19), k = 10 takes the mean step from 63.6 to 58.4 ms at 1 row and from 161.6 to 156.4 ms at
    4 rows."""
    decay = ema_decay(ema_config, step)
    if int(ema_config.every) == 1:
        new = ema_update(ema_params, params, decay)
        return keep(ok, new, ema_params)
    return jax.lax.cond(ok & ema_due(ema_config, step), lambda: ema_update(ema_params, params, decay),
                        lambda: ema_params)
