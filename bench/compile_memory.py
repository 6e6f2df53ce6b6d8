"""Compile-only memory and FLOPs of the full SDXL train step on N fake CPU devices (no weights created).

    nice -n 19 .venv/bin/python bench/compile_memory.py                 # fsdp 8, 1024^2, batch 1/device
    nice -n 19 .venv/bin/python bench/compile_memory.py --per_device_batch=2 --remat=none --out=memory.jsonl
    .venv/bin/python bench/compile_memory.py --transformer_depth=0,1,1 --peak_buffers=25  # ~80 s: the peak

Thin wrapper over `bench/train_step.py --compile_only` (same code, same JSON line). It lowers the real
train step (sdxl_jax.train_step) on abstract shapes (jax.ShapeDtypeStruct with shardings: no arrays are
ever allocated) and prints XLA's per-device memory analysis and FLOPs.

Why the first version ran for many minutes (measured 2026-11-26 on the tiny UNet, 1 CPU device, process
CPU seconds): XLA:CPU compile time grows with the size of the HLO program, not with the arrays (lowering
takes seconds, no arrays are allocated). UNet forward 2.8k HLO lines / 4 s, + backward 7.9k / 14 s, +
AdamW update 21.5k / 27 s: the optimizer update and the non-finite guard touch every parameter leaf one
by one and double the program. The full base UNet has ~20x the tiny's blocks (70 transformer blocks),
and the first version also compiled the frozen VAE encoder at 1024^2 and both text encoders into the
step; at `nice -n 19` on a shared 2-core machine it gets a small fraction of a core. XLA's
--xla_backend_optimization_level=0 / --xla_llvm_disable_expensive_passes did not shorten the tiny
compile then (52 s vs 54 s wall). Measured again on an idle host (2026-11-27, session 13), level 0 cut the
stage-1 smoke step's compile 35 s -> 27 s and its init's 20.9 s -> 11.7 s; the tests use it
(tests/conftest.py), but the program's size stays the bottleneck. What helps: the cached-inputs
step (`--cached`, the default here: latents and text encodings from `prepare --encode`, which is what a
large run uses) drops the frozen encoders from the program; run it on an idle machine.
On CPU the numbers describe the CPU program (no TPU/GPU-specific fusions), but params, optimizer state,
EMA and the batch are laid out exactly as on an accelerator mesh. Known CPU-only inflation (measured
with --peak_buffers, bench/RESULTS.md 2026-11-26 session 3): bf16 values feeding dots and collectives
are held in fp32, and XLA:CPU has no reduce-scatter: each weight gradient is all-reduced at full size in
combined all-reduces (up to 257 gradients in one), which keeps those full-size gradients alive together.
It compiles with the memory-minimising scheduler (`--cpu_scheduler=memory`, see train_step.py).
For an accelerator's own figure, `--topology=tpu:v5e:2x4` compiles with the TPU compiler for chips that
are not attached (train_step.py's docstring; bench/RESULTS.md 2026-11-26 session 4: 13.72 GiB peak per
v5e chip for batch 1 + dots where this CPU estimate says 20.92).
"""

import os
import runpy
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.argv = [os.path.join(here, "train_step.py"), "--compile_only", *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
