"""The logged mfu's FLOPs (train_step.model_flops / CompiledSteps.flops) are the model's work whatever the
attention kernel and remat policy: XLA's count of the compiled chunked step counts its scan over key blocks
once, and a remat policy's recomputation is not the model's work."""

import jax
import pytest

from configs import stage1_256
from sdxl_jax import parallel, train_state, train_step
from sdxl_jax.data import cache
from sdxl_jax.train_step import CompiledSteps


def _steps(attention, remat="none"):
    config = stage1_256.get_config("smoke")
    config.model.update(attention=attention, remat=remat)
    config.mesh.update(data=1, fsdp=1)
    setup = train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
    logs = []
    return CompiledSteps(setup, config, log=logs.append), setup, logs


def test_chunked_step_logs_the_xla_steps_flops():
    chunked, setup, logs = _steps("chunked")
    xla, _, _ = _steps("xla")
    m = setup.models
    # 768 px: 96 x 96 latents, 2304 tokens at the attention level = five key blocks (XLA unrolls a loop of
    # two, which it then counts in full).
    batch = cache.example_batch(m.conditioner.config, m.latent_channels, m.downsample, 1, 768, 768)
    chunked.compile(batch)
    xla.compile(batch)
    model = xla.flops(batch)  # the compiled xla step's own count
    assert chunked.flops(batch) == pytest.approx(model, rel=0.01)
    assert chunked.stats[chunked.key(batch)]["flops"] < 0.9 * model  # what the logged mfu used before
    assert any("mfu: the model's" in line for line in logs)


def test_remat_recomputation_is_not_model_flops():
    full, setup, logs = _steps("xla", remat="full")
    plain, plain_setup, _ = _steps("xla")
    m = setup.models
    batch = cache.example_batch(m.conditioner.config, m.latent_channels, m.downsample, 1, 256, 256)
    full.compile(batch)
    plain.compile(batch)
    # The remat-full run logs exactly the count of the remat-none program (both lowered, not compiled) ...
    assert full.flops(batch) == train_step.model_flops(plain_setup, plain.config, batch)
    # ... and its compiled program does the forward again, block by block.
    assert full.stats[full.key(batch)]["flops"] > 1.1 * plain.flops(batch)
    assert any("remat 'full' adds recomputation" in line for line in logs)
