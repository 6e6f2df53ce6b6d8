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
    chain = [clip_by_global_norm(c.grad_clip)] if c.grad_clip and c.grad_clip > 0 else []
    return optax.chain(*chain, opt), lr


# The global norm's kernels. XLA reduces each leaf on its own (on a GPU a large leaf in two kernels, a small
# one in a kernel of a few microseconds), and rewrites the reduction of a concatenation into the sum of its
# parts' reductions. global_norm reduces each leaf of two or more axes over its last axis (one kernel,
# which XLA:GPU merges into the one that sums a split-K weight gradient's partials; a reduction reads any
# memory layout, where reshaping a convolution kernel held in cuDNN's filter order would copy it), then
# sums those partial sums and the vectors NORM_GROUP leaves at a time, behind an optimization barrier that
# keeps the concatenation (two kernels per group). bench/RESULTS.md, session 23.
NORM_GROUP = 128


def sum_of_squares(leaves) -> jax.Array:
    """The fp32 sum of squares of every element of `leaves`, in few kernels (NORM_GROUP above)."""
    parts = []
    for x in leaves:
        x = jnp.square(x.astype(jnp.float32))
        if x.ndim > 1:
            x = jnp.sum(x, axis=-1)
        parts.append(x.reshape(-1))
    total = jnp.zeros((), jnp.float32)
    for i in range(0, len(parts), NORM_GROUP):
        group = jax.lax.optimization_barrier(jnp.concatenate(parts[i:i + NORM_GROUP]))
        total = total + jnp.sum(group)
    return total


def global_norm(tree, shardings=None) -> jax.Array:
    """optax.tree.norm(tree) (the square root of the sum of squares of every element, in fp32), in few
    kernels (NORM_GROUP above). With `shardings` (NamedShardings of tree's leaves, e.g. the params') the sums
    run in a shard_map on each device's own blocks, one psum per set of mesh axes the leaves are split
    over: no leaf is gathered or moved, as a concatenation of sharded arrays would be."""
    leaves = jax.tree.leaves(tree)
    if shardings is None or not leaves:
        return jnp.sqrt(sum_of_squares(leaves))
    shardings = jax.tree.leaves(shardings)
    if len(shardings) != len(leaves):
        raise ValueError(f"global_norm: {len(leaves)} leaves but {len(shardings)} shardings")
    mesh, specs = shardings[0].mesh, [s.spec for s in shardings]

    def split_over(spec) -> tuple[str, ...]:
        names = [a for axes in spec if axes is not None for a in ((axes,) if isinstance(axes, str) else axes)]
        return tuple(sorted(a for a in set(names) if mesh.shape[a] > 1))

    groups = {}
    for i, spec in enumerate(specs):
        groups.setdefault(split_over(spec), []).append(i)

    def local(*blocks):
        total = jnp.zeros((), jnp.float32)
        for axes, idx in groups.items():
            part = sum_of_squares([blocks[i] for i in idx])
            total = total + (jax.lax.psum(part, axes) if axes else part)
        return total

    total = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=jax.sharding.PartitionSpec())(
        *leaves)
    return jnp.sqrt(total)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm (the same arithmetic and empty state, so checkpoints are unchanged) with
    the norm from global_norm, or the `grad_norm` the caller passes to update (train_step computes it
    once, shard by shard)."""

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        g = global_norm(updates) if grad_norm is None else grad_norm
        trigger = g < max_norm

        def clip(t):
            return jax.lax.select(trigger, t, (t / g.astype(t.dtype)) * max_norm)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


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
