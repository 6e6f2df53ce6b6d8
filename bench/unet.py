"""UNet benchmark (a script, not a test): forward+backward step time of our Flax UNet vs diffusers' PyTorch
UNet2DConditionModel on the same weights and inputs, on CPU, and the XLA cost-analysis FLOPs of the full SDXL
base forward at a 128 x 128 latent with 77 tokens (no real params: lowered on ShapeDtypeStructs).

    JAX_PLATFORMS=cpu .venv/bin/python bench/unet.py [--steps 5] [--configs tiny,mid] [--no-flops]
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.convert import unet as convert_unet
from sdxl_jax.models import unet as unet_lib

CONFIGS = {
    # (config, batch, latent side, tokens)
    "tiny": (unet_lib.PRESETS["tiny"], 2, 16, 77),
    # A mid-size SDXL-shaped UNet (~30M params): 3 levels, attention on the two lower ones.
    "mid": (unet_lib.UNetConfig(model_channels=64, channel_mult=(1, 2, 4), transformer_depth=(0, 1, 2),
                                mid_transformer_depth=2, head_channels=32, context_dim=256,
                                adm_in_channels=256 + 6 * 256), 2, 32, 77),
}


def _inputs(config, batch, side, tokens, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, side, side, config.in_channels), np.float32),
            np.array([10, 900][:batch] + [500] * max(0, batch - 2), np.int32),
            rng.standard_normal((batch, tokens, config.context_dim), np.float32),
            rng.standard_normal((batch, config.adm_in_channels), np.float32))


def _time(fn, steps):
    fn()  # warm-up / compile
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_step(name, steps):
    import torch
    from diffusers import UNet2DConditionModel

    config, batch, side, tokens = CONFIGS[name]
    x, t, ctx, y = _inputs(config, batch, side, tokens)
    ref = UNet2DConditionModel(**convert_unet.unet_config_to_diffusers(config))
    # diffusers embeds the 6 size/crop scalars itself; our UNet gets the finished vector built by the same
    # embedder, so both run on identical conditioning.
    pooled = torch.from_numpy(y[:, :config.adm_in_channels - 6 * config.addition_time_embed_dim].copy())
    time_ids = torch.rand(batch, 6, generator=torch.Generator().manual_seed(0)) * 1024
    with torch.no_grad():
        y = torch.cat([pooled, ref.add_time_proj(time_ids.flatten()).reshape(batch, -1)], -1).numpy()
    rng = np.random.default_rng(1)
    shapes = convert_unet.expected_shapes(config)
    flat = {k: (rng.standard_normal(s) * (0.1 if len(s) == 1 else 1 / np.sqrt(np.prod(s[:-1])))
                ).astype(np.float32) for k, s in shapes.items()}
    params = jax.tree.map(jnp.asarray, convert_unet.common.unflatten(flat))
    model = unet_lib.UNet(config)

    @jax.jit
    def step(p, x, t, ctx, y):
        return jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, ctx, y) ** 2))(p)

    args = tuple(map(jnp.asarray, (x, t, ctx, y)))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, *args))
    compile_s = time.perf_counter() - t0
    ours = _time(lambda: jax.block_until_ready(step(params, *args)), steps)

    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
          convert_unet.unet_to_diffusers(flat, config).items()}
    ref.load_state_dict(sd, strict=True)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    kw = dict(added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})

    def torch_step():
        ref.zero_grad(set_to_none=True)
        out = ref(tx, torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample
        loss = (out ** 2).mean()
        loss.backward()
        return float(loss.detach())

    theirs = _time(torch_step, steps)
    loss_ours, loss_theirs = float(step(params, *args)[0]), torch_step()
    n = unet_lib.count_params(params)
    print(f"{name}: {n / 1e6:.1f}M params, batch {batch}, latent {side}x{side}, {tokens} tokens | "
          f"ours {ours * 1e3:.1f} ms (compile {compile_s:.1f} s) | diffusers {theirs * 1e3:.1f} ms "
          f"(torch {torch.get_num_threads()} threads) | diffusers/ours = {theirs / ours:.2f} | "
          f"loss ours {loss_ours:.6f} vs diffusers {loss_theirs:.6f}")


def base_forward_flops(side=128, tokens=77, batch=1):
    config = unet_lib.PRESETS["sdxl_base"]
    model = unet_lib.UNet(config)
    params = nn.meta.unbox(unet_lib.abstract_params(config))  # ShapeDtypeStructs only
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = (spec(batch, side, side, 4), jax.ShapeDtypeStruct((batch,), jnp.int32), spec(batch, tokens, 2048),
            spec(batch, 2816))
    t0 = time.perf_counter()
    lowered = jax.jit(lambda p, *a: model.apply({"params": p}, *a)).lower(params, *args)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    print(f"sdxl_base forward, batch {batch}, latent {side}x{side}, {tokens} tokens: "
          f"{cost['flops'] / 1e12:.3f} TFLOPs (XLA cost analysis, compiled for {jax.default_backend()}; "
          f"lower+compile {time.perf_counter() - t0:.0f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--no-flops", action="store_true")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    for name in filter(None, args.configs.split(",")):
        bench_step(name, args.steps)
    if not args.no_flops:
        base_forward_flops()


if __name__ == "__main__":
    main()
