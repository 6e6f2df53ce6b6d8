"""diffusers' PyTorch baselines for bench/gpu_suite.sh (random weights, bf16, SDPA): one JSON line each.

    python3 bench/torch_reference.py train --size=1024 --batch=1 --steps=10
    python3 bench/torch_reference.py sample --size=1024 --batch=1 --steps=30

train: UNet2DConditionModel (SDXL base config from our preset through convert.unet_config_to_diffusers)
    under bf16 autocast with fp32 params, eps MSE loss, backward, fused AdamW and an fp32 EMA
    (torch._foreach_lerp_): the work of our cached-inputs train step (bench/train_step.py --cached).
sample: StableDiffusionXLPipeline (UNet + VAE in bf16, Euler, CFG 5, SDPA attention processors), given
    random prompt embeddings (text encoders not run, as in bench/sample_sdxl.py), decoding to images.
build_diffusers_sdxl(folder): the tiny random SDXL (or refiner) as a diffusers folder, shared by the
    parity tests (tests/test_pipeline.py) and bench/sample.py.
TEST/BENCH-ONLY: PyTorch and diffusers are never imported by sdxl_jax.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from progress import progress, wait_turn  # noqa: E402

DEV = "cuda"


def _unet(torch, diffusers, preset):
    from sdxl_jax.convert.unet import unet_config_to_diffusers
    from sdxl_jax.models import unet as unet_lib

    cfg = {k: v for k, v in unet_config_to_diffusers(unet_lib.PRESETS[preset]).items()
           if not k.startswith("_")}  # fmt: skip
    with torch.device(DEV):
        return diffusers.UNet2DConditionModel(**cfg), unet_lib.PRESETS[preset]


def _sync(torch):
    if DEV == "cuda":
        torch.cuda.synchronize()


def _peak(torch):
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if DEV == "cuda" else None


def train(args):
    import diffusers
    import torch

    torch.manual_seed(0)
    unet, ucfg = _unet(torch, diffusers, args.preset)
    unet.train()
    params = [p for p in unet.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=DEV == "cuda")
    b, h = args.batch, args.size // 8
    pooled_dim = ucfg.adm_in_channels - 6 * 256
    x0 = torch.randn(b, 4, h, h, device=DEV)
    ctx = torch.randn(b, 77, ucfg.context_dim, device=DEV)
    pooled = torch.randn(b, pooled_dim, device=DEV)
    time_ids = torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * b, device=DEV).float()
    acp = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device=DEV) ** 2, 0)

    def step():
        t = torch.randint(0, 1000, (b,), device=DEV)
        noise = torch.randn_like(x0)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(DEV, dtype=torch.bfloat16):
            pred = unet(xt, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.9999)
        return loss

    for _ in range(args.warmup):
        step()
    _sync(torch)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(torch)
    dt = (time.perf_counter() - t0) / args.steps
    return {"step_s": round(dt, 5), "images_per_s": round(b / dt, 3), "loss": loss.item(),
            "peak_gib": _peak(torch)}  # fmt: skip


def sample(args):
    import diffusers
    import torch

    from sdxl_jax.convert.vae import vae_config_to_diffusers
    from sdxl_jax.models import vae as vae_lib

    torch.manual_seed(0)
    unet, ucfg = _unet(torch, diffusers, args.preset)
    unet = unet.to(torch.bfloat16).eval()
    vcfg = vae_config_to_diffusers(vae_lib.PRESETS[args.vae])
    vcfg = {k: v for k, v in vcfg.items() if not k.startswith("_")}
    with torch.device(DEV):
        vae = diffusers.AutoencoderKL(**vcfg).to(torch.bfloat16).eval()
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="leading", steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    b, pooled_dim = args.batch, ucfg.adm_in_channels - 6 * 256
    kw = dict(
        prompt_embeds=torch.randn(b, 77, ucfg.context_dim, device=DEV, dtype=torch.bfloat16),
        negative_prompt_embeds=torch.zeros(b, 77, ucfg.context_dim, device=DEV, dtype=torch.bfloat16),
        pooled_prompt_embeds=torch.randn(b, pooled_dim, device=DEV, dtype=torch.bfloat16),
        negative_pooled_prompt_embeds=torch.zeros(b, pooled_dim, device=DEV, dtype=torch.bfloat16),
        height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=5.0,
        output_type="np",
    )  # fmt: skip
    with torch.inference_mode():
        pipe(**kw)  # warm-up
        _sync(torch)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            pipe(**kw)
        _sync(torch)
    dt = (time.perf_counter() - t0) / args.repeats
    return {"batch_s": round(dt, 4), "images_per_s": round(b / dt, 4),
            "peak_gib": _peak(torch)}  # fmt: skip


# The tiny random SDXL of the parity tests (tests/test_pipeline.py) and bench/sample.py: our tiny presets'
# shapes built in diffusers / transformers, saved as a diffusers folder that both implementations load.
SIZE_EMBED = 8  # diffusers' own tiny SDXL tests use addition_time_embed_dim 8


def _clip_config(c):
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.width,
        intermediate_size=c.mlp_dim,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        max_position_embeddings=c.max_length,
        hidden_act=c.activation,
        projection_dim=c.projection_dim or c.width,
        layer_norm_eps=c.layer_norm_eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def _randomize(module, seed):
    """diffusers zero-inits several output layers; random weights everywhere make the parity meaningful."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * 0.2 / max(1.0, p[0].numel() ** 0.5)
                if p.ndim > 1
                else torch.randn(p.shape, generator=g) * 0.05
            )


def _save_tokenizer(folder, pad):
    from sdxl_jax import tokenizer

    tokenizer.write_vocab_files(folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "pad_token": pad,
                "model_max_length": 77,
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
            },
            f,
        )


def build_diffusers_sdxl(folder, refiner=False):
    """A tiny random SDXL (or refiner) saved as a diffusers folder; returns the torch pipeline loaded back."""
    import dataclasses

    import diffusers
    import torch
    import transformers

    from sdxl_jax import tokenizer
    from sdxl_jax.convert.unet import unet_config_to_diffusers
    from sdxl_jax.convert.vae import vae_config_to_diffusers
    from sdxl_jax.models import clip_text
    from sdxl_jax.models import unet as unet_lib
    from sdxl_jax.models import vae as vae_lib

    torch.manual_seed(0)
    base = unet_lib.PRESETS["tiny_refiner" if refiner else "tiny"]
    n_sizes = 5 if refiner else 6
    ucfg = dataclasses.replace(
        base, adm_in_channels=32 + n_sizes * SIZE_EMBED, addition_time_embed_dim=SIZE_EMBED
    )
    ud = {k: v for k, v in unet_config_to_diffusers(ucfg).items() if not k.startswith("_")}
    if refiner:
        ud["addition_time_embed_dim"] = SIZE_EMBED
    unet = diffusers.UNet2DConditionModel(**ud)
    vd = {k: v for k, v in vae_config_to_diffusers(vae_lib.PRESETS["tiny"]).items() if not k.startswith("_")}
    vae = diffusers.AutoencoderKL(**vd)
    text_2 = transformers.CLIPTextModelWithProjection(_clip_config(clip_text.PRESETS["tiny_g"]))
    for i, m in enumerate((unet, vae, text_2)):
        _randomize(m, i)
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="trailing",
        steps_offset=1,
        prediction_type="epsilon",
        interpolation_type="linear",
    )
    _save_tokenizer(os.path.join(folder, "tokenizer_2"), "!")
    tok_2 = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2"))
    shared = dict(vae=vae, text_encoder_2=text_2, tokenizer_2=tok_2, unet=unet, scheduler=scheduler,
                  add_watermarker=False)  # fmt: skip
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            text_encoder=None,
            tokenizer=None,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            **shared,
        )
    else:
        text_1 = transformers.CLIPTextModel(_clip_config(clip_text.PRESETS["tiny_l"]))
        _randomize(text_1, 3)
        _save_tokenizer(os.path.join(folder, "tokenizer"), "<|endoftext|>")
        tok_1 = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        pipe = diffusers.StableDiffusionXLPipeline(
            text_encoder=text_1, tokenizer=tok_1, force_zeros_for_empty_prompt=True, **shared
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # keep exactly our vocab files next to HF's saved ones
        if os.path.isdir(os.path.join(folder, sub)):
            tokenizer.write_vocab_files(os.path.join(folder, sub))
    return pipe.to(torch.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("train", "sample"))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="train: timed steps; sample: denoising steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--preset", default="sdxl_base", help="tiny + --vae=tiny --device=cpu: smoke")
    p.add_argument("--vae", default="sdxl")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    global DEV
    DEV = args.device
    import torch

    name = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    out = {"bench": f"torch_{args.what}", "device": name, "size": args.size,
           "batch": args.batch, "steps": args.steps, "torch": torch.__version__}  # fmt: skip
    import diffusers  # noqa: F401  (its import takes seconds: before the turn)

    out["turn_wait_s"] = round(wait_turn(), 1)  # the models go on the device in the turn
    progress(f"building diffusers' {args.what} models and timing")
    out.update(train(args) if args.what == "train" else sample(args))
    print(json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
