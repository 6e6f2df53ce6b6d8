"""Benchmark of the real SDXL train step (sdxl_jax.train_step.make_train_step) on the devices present.

    .venv/bin/python bench/train_step.py                                  # base UNet, 1024^2, cached inputs
    .venv/bin/python bench/train_step.py --config=stage2_512 --size=512x512 --per_device_batch=8
    .venv/bin/python bench/train_step.py --attention=cudnn --remat=none --per_device_batch=4 --steps=10
    nice -n 19 .venv/bin/python bench/train_step.py --compile_only --devices=8 --mesh=data=1,fsdp=8,tensor=1
    .venv/bin/python bench/train_step.py --compile_only --mesh=data=1,fsdp=8,tensor=1 \
        --transformer_depth=0,1,1 --peak_buffers=15      # 641 M-param variant, ~80 s: what fills the peak

Random params are created on device by the run's jitted, sharded init (train_state.init_state); no
checkpoint is needed. `--cached` (default) feeds latents and text encodings as the encoding cache does
(data/cache.py), so the step is the UNet's forward + backward + AdamW + EMA, the same work as diffusers'
UNet training step in bench/torch_reference.py; `--no-cached` adds the frozen VAE encoder and both text
encoders to the step.
Reports one JSON line: step time, images/s per chip, MFU (XLA cost-analysis FLOPs per device of the step
with materialised attention and no remat, see model_flops / step time / metrics.peak_flops_per_device()), the
compiled memory analysis and the runtime peak memory where the backend reports it, and the compile
phase timings; with `--roofline` a line before it, bench/roofline.py's estimate for the same program.
Phase lines go to stderr as it runs (bench/progress.py). Everything is compiled before the timing, the
init programs too, and under the GPU suite the timing waits for its turn on the device (BENCH_TURN).
`--compile_only`: lowers and compiles on abstract shapes only (no arrays), for a mesh of --devices fake
CPU devices; reports the compiled per-device memory (what one chip of that mesh would hold).
It compiles with XLA:CPU's memory-minimising scheduler (`--cpu_scheduler=memory`, the default): the
concurrency-optimised one that XLA:CPU uses by default hoists every fsdp all-gather of the step to the
start of the program (measured: the gathered weights of the whole UNet live at once), which describes
the CPU's scheduling, not an accelerator's; `--cpu_scheduler=concurrency` shows it.
`--compile_only --topology=...` compiles with an accelerator's own compiler instead, for chips that are not
attached (--devices must equal the topology's chip count; the model FLOPs are still counted on that many
fake CPU devices):
    JAX_PLATFORMS=cpu /work/tpuvenv/bin/python bench/train_step.py --compile_only --topology=tpu:v5e:2x4 \
        --devices=8 --mesh=data=1,fsdp=8,tensor=1      # libtpu: pip install -e '.[tpu-aot]'
    /work/gpuvenv/bin/python bench/train_step.py --compile_only --topology=gpu:h100 --devices=1 \
        --mesh=data=1,fsdp=1,tensor=1 --attention=cudnn   # XLA:GPU: pip install -e '.[gpu-aot]'
The GPU compile needs no GPU or driver: the chip is described by bench/gpu_specs/<name>.txtpb. It checks that
a step lowers for the GPU (cuDNN attention's custom calls and their shape rules included) and reports
XLA:GPU's memory analysis; it does not autotune, so kernel choices can differ from a run on the GPU.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import aot  # noqa: E402
from progress import progress, wait_turn  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="stage3_multiaspect", help="configs/<name>.py")
    p.add_argument("--config_arg", default=None, help="the config's variant argument")
    p.add_argument("--size", default="1024x1024", help="HxW of the bucket (pixels)")
    p.add_argument("--per_device_batch", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=1,
                   help="gradient accumulation (config.optim.microbatches): the per-device batch runs "
                        "as this many microbatches")
    p.add_argument("--mesh", default="", help="e.g. data=1,fsdp=8,tensor=1 (default: the config's)")
    p.add_argument("--remat", default=None,
                   help="none | full | dots | dots_no_batch (default: the config's)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the config's)")
    p.add_argument("--attention", default=None,
                   help="auto | xla | chunked | cudnn | splash (default: the config's)")
    p.add_argument("--cached", action=argparse.BooleanOptionalAction, default=True,
                   help="latents + text encodings as inputs (the encoding cache); --no-cached: raw images")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile_only", action="store_true")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (compile_only on CPU)")
    p.add_argument("--transformer_depth", default="",
                   help="e.g. 0,1,1: a lighter UNet of the same widths (mid depth = last entry), for quick "
                        "memory experiments; default: the preset's")
    p.add_argument("--peak_buffers", type=int, default=0,
                   help="compile_only: also print the N largest shape groups live at the compiled program's "
                        "memory peak, and report the device memory its buffer assignment allocates "
                        "(allocated_gib; an XLA dump in a temporary folder, bench/peak_buffers.py)")
    p.add_argument("--roofline", type=int, default=0, metavar="N",
                   help="GPU or TPU (a run, or compile_only with --topology=gpu:... or tpu:...): also "
                        "estimate the step time from the optimized HLO at the chip's peak FLOP/s and memory "
                        "bandwidth (bench/roofline.py), report roofline_step_s and roofline_mfu (TPU: also "
                        "roofline_overlapped_s, every kernel and DMA overlapped), and print the N costliest "
                        "groups")
    p.add_argument("--cpu_scheduler", choices=("memory", "concurrency"), default="memory",
                   help="compile_only: XLA:CPU's instruction scheduler (see the module docstring)")
    p.add_argument("--topology", default="",
                   help="compile_only for accelerator chips that are not here (deviceless AOT): e.g. "
                        "tpu:v5e:2x4 (needs libtpu: pip install -e '.[tpu-aot]') or gpu:h100 (needs XLA:GPU: "
                        "pip install -e '.[gpu-aot]'); see the module docstring")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override applied last, e.g. optim.mu_dtype=bfloat16 (repeatable)")
    p.add_argument("--aot", choices=("save", "load"), default=None,
                   help="save: write every program compiled (the step and, also with --compile_only, the "
                        "init programs) to --aot_dir; load: take the ones there instead of compiling "
                        "(bench/aot.py: the GPU suite compiles here, deviceless, and runs them on the GPU)")
    p.add_argument("--aot_dir", default=os.path.join(ROOT, "bench_out", "aot"))
    p.add_argument("--trace_steps", type=int, default=0, metavar="N",
                   help="after the timing, trace N more steps (jax.profiler, sdxl_jax/profiling.py): a JSON "
                        "line with each step's measured span and busy time and, with --roofline, the "
                        "measured time of every kind, part and source of the program against the "
                        "estimate; the XSpace and kernels.tsv (one line per instruction) go to --trace_dir")
    p.add_argument("--trace_dir", default=os.path.join(ROOT, "bench_out", "trace"))
    p.add_argument("--out", default="", help="also append the JSON line to this file")
    p.add_argument("--tag", default="", help="free text copied into the JSON line")
    return p.parse_args(argv)


def build_config(args, n_devices):
    import dataclasses
    import importlib

    from sdxl_jax import config_lib
    from sdxl_jax.models import unet as unet_lib

    config = importlib.import_module(f"configs.{args.config}").get_config(args.config_arg)
    for part in filter(None, args.mesh.split(",")):
        k, v = part.split("=")
        config.mesh[k] = int(v)
    for key in ("remat", "dtype", "attention"):
        if getattr(args, key) is not None:
            config.model[key] = getattr(args, key)
    config.compilation_cache_dir = ""
    if args.transformer_depth:
        depth = tuple(int(d) for d in args.transformer_depth.split(","))
        lighter = dataclasses.replace(unet_lib.PRESETS[config.model.unet], transformer_depth=depth,
                                      mid_transformer_depth=max(depth[-1], 1))
        unet_lib.PRESETS[f"{config.model.unet}_depth_{args.transformer_depth}"] = lighter
        config.model.unet = f"{config.model.unet}_depth_{args.transformer_depth}"
    config.data.batch_size = args.per_device_batch * n_devices
    config.optim.microbatches = args.microbatches
    config_lib.apply_overrides(config, args.set)
    return config


def make_batch(setup, config, h, w, cached):
    from sdxl_jax import train_state
    from sdxl_jax.data import cache

    b = config.data.batch_size
    if cached:
        m = setup.models
        return cache.example_batch(m.conditioner.config, m.latent_channels, m.downsample, b, h, w)
    return train_state.example_batch(config, b, h, w)


def compile_step(setup, config, batch, beside=None):
    """(compiled, batch shardings, phase seconds, beside's result) for the real train step on abstract
    inputs. `beside`, a function of no arguments, runs in a thread while XLA compiles: the compile
    releases the GIL, so the model FLOPs' second lowering (~30 s for the base) costs no wall time there."""
    import concurrent.futures

    import flax.linen as nn
    import jax

    from sdxl_jax import parallel
    from sdxl_jax.train_step import make_train_step, state_formats

    shardings = parallel.batch_shardings_like(batch, config, setup.mesh)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()}
    state_in = state_formats(setup, config)  # config.state_layout, as the training loop compiles it
    jitted = jax.jit(
        make_train_step(setup, config),
        in_shardings=(state_in, setup.frozen_shardings, shardings),
        out_shardings=(state_in, parallel.replicated(setup.mesh)),
        donate_argnums=(0,),
    )
    t0 = time.time()
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(parallel.rules(config)):
        lowered = jitted.lower(setup.abstract_state, setup.abstract_frozen, abstract)
        t1 = time.time()
        progress(f"lowered in {t1 - t0:.1f} s; compiling")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            counting = pool.submit(beside) if beside else None
            compiled = lowered.compile()
            t2 = time.time()
            progress(f"compiled in {t2 - t1:.1f} s")
            result = counting.result() if counting else None
    return compiled, shardings, {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}, result


def model_flops(setup, config, batch):
    """Per-device FLOPs of the model's work (train_step.model_flops: the step with materialised attention
    and no remat, counted by XLA's cost analysis of the lowered program). For an AOT topology the count
    is taken on this host's fake CPU devices; run() checked the device counts match."""
    import jax

    from sdxl_jax import parallel, train_state, train_step

    if setup.mesh.devices.flat[0].platform != jax.default_backend():
        setup = train_state.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()))
    return train_step.model_flops(setup, config, batch)


def needs_model_flops(setup, config, batch):
    """Whether the compiled step's own count is not the model's work (train_step.not_model_flops, the
    training loop's rule) or there is none (deviceless TPU and GPU compiles have no cost analysis)."""
    import jax

    from sdxl_jax import train_step

    aot = setup.mesh.devices.flat[0].platform != jax.default_backend()
    return aot or train_step.not_model_flops(setup, config, batch)


def random_batch(batch, shardings):
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for k, v in batch.items():
        if v.dtype.kind == "f" and k not in ("aesthetic_score",):
            v = rng.standard_normal(v.shape).astype(v.dtype) * (0.5 if k in ("latents", "image") else 1.0)
        elif k.startswith("ids"):
            v = rng.integers(0, 49408, v.shape).astype(v.dtype)
        out[k] = jax.device_put(v, shardings[k])
    return out


GPU_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")


def topology_devices(spec: str):
    """Devices of an accelerator topology that is not attached, for ahead-of-time compilation: the
    accelerator's own compiler lowers and compiles the step on this host, and its memory analysis is that
    chip's. "tpu:<name>" (libtpu; e.g. tpu:v5e:2x4, tpu:v5p:2x2x1) or "gpu:<spec>[:<n>]" (XLA:GPU from
    jax's CUDA plugin with the target description bench/gpu_specs/<spec>.txtpb; e.g. gpu:h100, or
    gpu:h100:8 for one host of 8)."""
    platform, _, name = spec.partition(":")
    if platform == "gpu" and name:
        return _gpu_topology_devices(spec, *name.partition(":")[::2])
    if platform != "tpu" or not name:
        raise SystemExit(f"--topology={spec!r}: expected tpu:<topology> (e.g. tpu:v5e:2x4) or gpu:<spec>[:n] "
                         f"(e.g. gpu:h100; specs: {', '.join(_gpu_specs())})")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: not on a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chips to guard: compiles run side by side
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as e:  # no libtpu, or a topology name it does not know
        raise SystemExit(f"--topology={spec!r}: {type(e).__name__}: {e}. Install the TPU compiler "
                         "(pip install -e '.[tpu-aot]', version-matched to jax) and use a name such as "
                         "v5e:2x4, v5p:2x2x1 or v6e:2x4.") from e


def _gpu_specs():
    return sorted(f.removesuffix(".txtpb") for f in os.listdir(GPU_SPECS) if f.endswith(".txtpb"))


def _gpu_topology_devices(spec, name, count):
    path = os.path.join(GPU_SPECS, f"{name}.txtpb")
    if not os.path.exists(path):
        raise SystemExit(f"--topology={spec!r}: no bench/gpu_specs/{name}.txtpb; have "
                         f"{', '.join(_gpu_specs())}")
    if count and not count.isdigit():
        raise SystemExit(f"--topology={spec!r}: the GPU count after the spec is a number, e.g. gpu:{name}:8")
    from jax.experimental import topologies

    try:  # the plugin registers under JAX_PLATFORMS=cpu without looking for a GPU (run() sets it)
        topology = topologies.get_topology_desc(platform="cuda", target_config=open(path).read(),
                                                topology=f"1x1x{count or 1}")
    except Exception as e:  # no CUDA plugin
        raise SystemExit(f"--topology={spec!r}: {type(e).__name__}: {e}. Install XLA:GPU in a separate "
                         "environment (pip install -e '.[gpu-aot]', version-matched to jax).") from e
    return topology.devices


def run(args):
    with aot.programs(args.aot, args.aot_dir):
        return _run(args)


def _run(args):
    if args.topology and not args.compile_only:
        raise SystemExit("--topology compiles for chips that are not attached: add --compile_only")
    dump_dir = None
    if (args.compile_only and args.peak_buffers) or args.roofline:  # both read the step's optimized HLO
        import tempfile

        dump_dir = tempfile.mkdtemp(prefix="xla_dump_")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir}"
                                   " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*")
    if args.compile_only:
        concurrency = str(args.cpu_scheduler == "concurrency").lower()
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
            f" --xla_cpu_enable_concurrency_optimized_scheduler={concurrency}"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    from sdxl_jax import metrics as metrics_lib
    from sdxl_jax import parallel, train_state

    devices = topology_devices(args.topology) if args.topology else jax.devices()
    n = len(devices)
    if n != jax.device_count():  # model FLOPs are counted on as many fake CPU devices
        raise SystemExit(f"--topology={args.topology} has {n} chips: pass --devices={n}")
    chip, roofline_error, r = None, None, {}
    if args.roofline:  # before any compile: a chip with known figures
        try:
            chip = chip_roofline(devices[0])
        except ValueError as e:  # a timed run keeps its measurement without the estimate
            if args.compile_only:
                raise SystemExit(f"--roofline: {e}") from e
            roofline_error = str(e)
            print(f"WARNING --roofline: {e}; timing without the estimate", file=sys.stderr, flush=True)
    config = build_config(args, n)
    h, w = (int(x) for x in args.size.split("x"))
    mesh = parallel.make_mesh(config.mesh, devices)
    t0 = time.time()
    setup = train_state.make_setup(config, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
    result = {
        "bench": "train_step",
        "tag": args.tag,
        "device": devices[0].device_kind,
        "platform": devices[0].platform,
        "n_devices": n,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "unet": config.model.unet,
        "params": n_params,
        "size": [h, w],
        "per_device_batch": args.per_device_batch,
        "microbatches": config.optim.microbatches,
        "global_batch": config.data.batch_size,
        "remat": config.model.remat,
        "dtype": config.model.dtype,
        "attention": config.model.attention,
        "mu_dtype": config.optim.mu_dtype,
        "state_layout": config.state_layout,  # "auto": the compiler's on GPUs, row-major elsewhere
        "compute_copy": setup.abstract_state.compute_params is not None,  # config.compute_copy, resolved
        "overrides": args.set,
        "cached": args.cached,
        "cpu_scheduler": args.cpu_scheduler if args.compile_only and not args.topology else None,
        "setup_s": round(time.time() - t0, 2),
    }
    progress(f"setup in {result['setup_s']} s ({n_params / 1e6:.0f} M params); lowering the step")
    batch = make_batch(setup, config, h, w, args.cached)
    count = needs_model_flops(setup, config, batch)
    compiled, shardings, phases, counted = compile_step(
        setup, config, batch, beside=(lambda: model_flops(setup, config, batch)) if count else None)
    result.update(phases)
    if dump_dir and aot.summary().get("jit_step_fn") == "loaded":  # no compile, so no dump: its HLO
        aot.write_optimized_hlo(compiled, dump_dir, "jit_step_fn")
    stats = metrics_lib.compiled_stats(compiled)
    gib = float(1 << 30)
    result["flops_per_device"] = stats.get("flops")
    if not count and not (stats.get("flops") or 0) > 0:  # a backend without XLA's count
        counted = model_flops(setup, config, batch)
    result["model_flops_per_device"] = counted or result["flops_per_device"]
    for k in ("peak_bytes", "compiler_peak_bytes", "argument_size_in_bytes", "temp_size_in_bytes",
              "output_size_in_bytes", "alias_size_in_bytes", "generated_code_size_in_bytes"):  # fmt: skip
        if k in stats:
            result[k.replace("_in_bytes", "").replace("_bytes", "") + "_gib"] = round(stats[k] / gib, 3)
    progress("cost analysis and model FLOPs read")
    from sdxl_jax.models import layers

    platform = setup.mesh.devices.flat[0].platform  # the compiled program's, also for an AOT topology
    result["attention_fallbacks"] = layers.attention_fallbacks(platform)  # [] when the asked-for kernel ran
    result["attention_kernel"] = layers.resolved_kernel(config.model.attention, platform)  # what "auto" ran
    if roofline_error:
        result["roofline_error"] = roofline_error
    if chip is not None:  # read before the timing, so that the suite's parts read their dumps side by side
        from roofline import format_roofline, roofline

        estimate = {"bench": "train_step_roofline", "tag": args.tag}
        try:
            r = roofline(dump_dir, *chip, platform=platform, model_flops=result.get("model_flops_per_device"),
                         keep_kernels=bool(args.trace_steps))  # the trace's ops are set against them
        except Exception as e:  # an HLO form the reader does not know: the measurement still stands
            if args.compile_only:
                raise
            estimate["roofline_error"] = f"{type(e).__name__}: {e}"
        else:
            estimate.update(roofline_step_s=round(r["step_s"], 5), roofline_kernels=r["kernels"],
                            roofline_mfu=round(r["mfu"], 4) if "mfu" in r else None)
            if r["async_copy_s"]:  # a TPU's DMAs: the step between the two estimates
                estimate["roofline_overlapped_s"] = round(r["overlapped_s"], 5)
        result.update((k, v) for k, v in estimate.items() if k.startswith("roofline"))
        emit(estimate, args.out)  # its own line, before the measurement's: a cut timing keeps it
        if "roofline_step_s" in estimate:
            print(format_roofline(r, args.roofline), flush=True)
    if args.compile_only and args.aot == "save":  # the init programs too, in the step's formats
        train_state.compile_init(setup, config, compiled.input_formats[0][0])
        progress("init programs compiled")
    if not args.compile_only:
        from sdxl_jax import train_state

        init_formats = compiled.input_formats[0][0]  # the state drawn in them: placing it copies nothing
        try:
            train_state.compile_init(setup, config, init_formats)  # its programs, before the turn
        except Exception as e:  # layouts a jit cannot give its outputs: drawn row-major, then placed
            progress(f"the init in the step's formats did not compile ({type(e).__name__}: {e}); row-major")
            init_formats = None
            train_state.compile_init(setup, config)
        result["init_in_step_formats"] = init_formats is not None
        progress("init programs compiled")
        result["turn_wait_s"] = round(wait_turn(), 1)
        timed, more_steps = time_steps(setup, config, compiled, batch, shardings, args, init_formats)
        result.update(timed)
        peak = metrics_lib.peak_flops_per_device()
        flops = result.get("model_flops_per_device")
        if peak and flops and flops == flops:  # NaN where the backend has no cost analysis
            result["mfu"] = round(flops / result["step_s"] / peak, 4)
            result["peak_flops_per_device"] = peak
    if args.aot:  # what each program compiled or loaded did
        result["aot"] = aot.summary()
    allocated = None
    if args.compile_only and args.peak_buffers:  # the device memory the buffer assignment allocates
        from peak_buffers import allocations

        allocated = allocations(dump_dir)
        main = allocated.get(0, {"parameters": 0, "temp": 0})
        result["allocated_gib"] = round((main["parameters"] + main["temp"]) / gib, 3)
        result["allocated_temp_gib"] = round(main["temp"] / gib, 3)
    emit(result, args.out)
    if args.trace_steps and not args.compile_only:  # after the measurement's line: a failed trace keeps it
        emit(trace_steps(more_steps, args, r.get("kernel_list")), args.out)
    if allocated is not None:
        from peak_buffers import format_allocations, format_peak, peak_buffers

        print(format_allocations(allocated), flush=True)
        print(format_peak(peak_buffers(dump_dir), args.peak_buffers), flush=True)
    if dump_dir is not None:
        import shutil

        shutil.rmtree(dump_dir, ignore_errors=True)
    return result


def trace_steps(more_steps, args, kernel_list=None) -> dict:
    """Traces args.trace_steps steps (more_steps runs them and waits) into args.trace_dir: their measured
    time per step and, given the estimate's kernels, the measurement set against it (roofline.trace_fields).
    Errors are reported in the line, not raised: the timing before it stands."""
    import shutil

    from roofline import trace_fields

    from sdxl_jax import profiling

    out = {"bench": "train_step_trace", "tag": args.tag, "trace_steps": args.trace_steps}
    shutil.rmtree(args.trace_dir, ignore_errors=True)  # no earlier run's kernels.tsv beside this trace
    try:
        kept = profiling.capture(lambda: more_steps(args.trace_steps),
                                 os.path.join(args.trace_dir, "step_fn.xplane.pb"))
        progress(f"traced {args.trace_steps} steps into {kept}")
        out.update(trace_fields(kept, args.trace_steps, "step_fn", kernel_list,
                                os.path.join(args.trace_dir, "kernels.tsv")))
    except Exception as e:  # a diagnostic: the measured step time stands without it
        out["trace_error"] = f"{type(e).__name__}: {e}"
    return out


def chip_roofline(device) -> tuple[float, float]:
    """(dense bf16 FLOP/s, memory bytes/s) of a GPU, from metrics.PEAK_FLOPS and bench/gpu_specs/<name>.txtpb
    (name: the spec whose name is in the device kind, e.g. h100 in "NVIDIA H100 80GB HBM3"), or of a TPU,
    from metrics.PEAK_FLOPS and roofline.TPU_BANDWIDTH; ValueError for another device."""
    from roofline import TPU_BANDWIDTH, read_spec

    from sdxl_jax import metrics as metrics_lib

    kind = device.device_kind
    peak = next((f for name, f in metrics_lib.PEAK_FLOPS.items() if kind.startswith(name)), None)
    if device.platform == "tpu":
        bandwidth = next((b for name, b in TPU_BANDWIDTH.items() if kind.startswith(name)), None)
        if peak is not None and bandwidth is not None:
            return peak, bandwidth
    spec = next((n for n in _gpu_specs() if n in kind.lower().split()), None)
    if device.platform != "gpu" or peak is None or spec is None:
        raise ValueError(f"no peak FLOP/s and memory bandwidth for {kind!r} ({device.platform}); it reads "
                         f"GPUs with a bench/gpu_specs file ({', '.join(_gpu_specs())}) and an entry in "
                         "sdxl_jax.metrics.PEAK_FLOPS, and the TPUs in roofline.TPU_BANDWIDTH")
    return peak, read_spec(os.path.join(GPU_SPECS, f"{spec}.txtpb"))["memory_bandwidth"]


def time_steps(setup, config, compiled, batch, shardings, args, init_formats=None):
    import jax

    from sdxl_jax import train_state, train_step

    state = train_state.init_state(setup, config, init_formats)
    state = train_step.place(state, compiled.input_formats[0][0])  # a no-op where drawn in its formats
    frozen = train_state.init_frozen_params(setup, config)
    dev_batch = random_batch(batch, shardings)
    jax.block_until_ready((state, frozen, dev_batch))
    progress(f"state on device; {args.warmup} warm-up steps")
    for _ in range(args.warmup):
        state, out = compiled(state, frozen, dev_batch)
    jax.block_until_ready(state)
    progress(f"timing {args.steps} steps")
    timed_from = time.time()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, out = compiled(state, frozen, dev_batch)
    jax.block_until_ready((state, out))
    step_s = (time.perf_counter() - t0) / args.steps
    progress(f"timed: {step_s:.4f} s a step")
    res = {
        "timed_window": [round(timed_from, 1), round(time.time(), 1)],  # wall clock, to spot overlapping runs
        "step_s": round(step_s, 5),
        "images_per_s_per_chip": round(args.per_device_batch / step_s, 3),
        "loss": float(out["loss"]),
        "nonfinite": int(out["nonfinite"]),
    }
    try:
        mem = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in mem:
            res["runtime_peak_gib"] = round(mem["peak_bytes_in_use"] / float(1 << 30), 3)
    except Exception:  # CPU and some plugins do not report memory stats
        pass

    def more_steps(n):  # for --trace_steps, after the timing
        nonlocal state
        for _ in range(n):
            state, _ = compiled(state, frozen, dev_batch)
        jax.block_until_ready(state)

    return res, more_steps


def emit(result, out_path):
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    if out_path:
        with open(out_path, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    run(parse_args())
