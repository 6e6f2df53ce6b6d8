"""bench/ helpers that reports rest on: the peak-buffer reader of XLA dumps (bench/peak_buffers.py), the
loop-state reader (bench/loop_state.py), the roofline estimate of a GPU or TPU step (bench/roofline.py), the
restore-relayout memory bench (bench/restore_relayout.py), the executables compiled ahead of time
(bench/aot.py), and the GPU suite's script (bench/gpu_suite.sh), which runs only when a session is lent a
GPU, and the check of the wheels it carries there (bench/wheel_closure.py)."""

import json
import lzma
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import aot  # noqa: E402
from loop_state import loop_state  # noqa: E402
from peak_buffers import allocations, format_allocations, format_peak, peak_buffers  # noqa: E402
from roofline import format_roofline, kernels, parse_module, roofline  # noqa: E402
from wheel_closure import missing, read_image  # noqa: E402

PROGRAM = """
import jax, jax.numpy as jnp

def step_fn(x):  # at the last dot, y, z and y + 1 (4 MiB f32[1024,1024] each) are live together
    y = x @ x
    z = jnp.exp(y) @ y
    return z @ (y + 1.0)

jax.jit(step_fn).lower(jax.ShapeDtypeStruct((1024, 1024), jnp.float32)).compile()
"""


def test_peak_buffers_reads_the_peak_of_a_cpu_dump(tmp_path):
    dump = f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=dump)
    subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True, timeout=300)
    peak = peak_buffers(str(tmp_path))
    groups = {shape: (count, size) for shape, count, size in peak["groups"]}
    count, size = groups["f32[1024,1024]"]
    assert count >= 3 and size == count * 4 * 1024 * 1024
    assert peak["total"] >= size and peak["position"] >= 0
    assert peak["groups"][0][0] == "f32[1024,1024]"  # largest first
    assert "f32[1024,1024]" in format_peak(peak, top=1)
    allocated = allocations(str(tmp_path))
    assert allocated[0]["parameters"] == 4 * 1024 * 1024  # x
    assert allocated[0]["temp"] >= 3 * 4 * 1024 * 1024  # y, y + 1 and the result at least
    assert format_allocations(allocated).startswith("memory space 0: ")


LOOP_PROGRAM = """
import jax, jax.numpy as jnp

def step_fn(w, x, v):  # the loop overwrites copies of x and v; w's cast is loop-invariant, made before it
    def body(i, c):
        x, vs = c
        x = jnp.tanh(x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32) + i
        return x, tuple(u * (k + 2.0) + i for k, u in enumerate(vs))
    return jax.lax.fori_loop(0, 4, body, (x, tuple(v + k for k in range(6))))

s = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
jax.jit(step_fn).lower(s, s, jax.ShapeDtypeStruct((8,), jnp.float32)).compile()
"""


def test_loop_state_names_what_enters_the_loop(tmp_path):
    dump = f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=dump)
    subprocess.run([sys.executable, "-c", LOOP_PROGRAM], env=env, check=True, timeout=300)
    state = loop_state(str(tmp_path))
    # counter, x, six f32[8], cast w: past the fifth, HLO writes each operand after an /*index=N*/ comment
    assert state["arrays"] == 9 == sum(count for _, count, _ in state["groups"]), state
    assert not [g for g in state["groups"] if g[0][0] == "tuple"], state  # every operand parsed
    groups = {key: (count, nbytes) for key, count, nbytes in state["groups"]}
    assert groups[("s32", "copy")] == (1, 4), state  # the counter
    assert groups[("f32", "copy")] == (2, 4 * 2**20 + 32), state  # x's copy and one f32[8]
    # w's cast, made before the loop: f32 where XLA:CPU runs the bf16 dot in f32 (jax 0.10.2), bf16 where it
    # runs it in bf16 (jax 0.11.2 and 0.12); with it, the other five f32[8] come from fusions
    if ("bf16", "fusion") in groups:
        assert groups[("bf16", "fusion")] == (1, 2 * 2**20), state
        assert groups[("f32", "fusion")] == (5, 5 * 32), state
    else:
        assert groups[("f32", "fusion")] == (6, 4 * 2**20 + 5 * 32), state


ROOFLINE_PROGRAM = """
import jax, jax.numpy as jnp

def step_fn(x, w, k, xs):
    y = x @ w
    c = jax.lax.conv_general_dilated(k, jnp.ones((3, 3, 8, 16)), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _, ys = jax.lax.scan(lambda carry, a: (carry, carry @ a), x[:64, :64], xs)
    return y, c, ys

f32 = jnp.float32
shapes = [(256, 128), (128, 512), (2, 32, 32, 8), (5, 64, 64)]
jax.jit(step_fn).lower(*(jax.ShapeDtypeStruct(s, f32) for s in shapes)).compile()
"""


def test_roofline_counts_dots_convolutions_and_loop_iterations_of_a_cpu_dump(tmp_path):
    dump = f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=dump)
    subprocess.run([sys.executable, "-c", ROOFLINE_PROGRAM], env=env, check=True, timeout=300)
    dot = 2 * 256 * 512 * 128
    conv = 2 * (2 * 32 * 32 * 16) * (3 * 3 * 8)
    loop = 5 * 2 * 64 * 64 * 64  # the scan's body, its known trip count times
    r = roofline(str(tmp_path), 1e12, 1e11, platform="cpu", model_flops=dot + conv + loop)
    assert r["kernel_flops"] == dot + conv + loop
    assert r["step_s"] >= (dot + conv + loop) / 1e12 and r["mfu"] <= 1.0
    assert "MFU" in format_roofline(r)
    with open(next(tmp_path.glob("*step_fn*cpu_after_optimizations.txt"))) as f:
        comps, entry = parse_module(f.read())
    ks = kernels(comps, entry, 1e12, 1e11)
    row = 64 * 64 * 4  # one f32[64,64] slice of xs and of ys
    in_loop = [k for k in ks if k["count"] == 5]
    assert sum(k["flops"] for k in in_loop) == 2 * 64 * 64 * 64
    # Each iteration reads a row of xs and the carry and writes a row of ys (XLA:CPU: 2 rows + an index
    # for the slice and for the in-place update, 3 for the dot), never a whole f32[5,64,64] buffer.
    assert max(k["bytes"] for k in in_loop) < 4 * row
    assert sum(k["bytes"] for k in in_loop) >= 4 * row


# XLA:GPU's forms (lines of an H100 compile's optimized HLO, cut down; the cuBLAS call written in its form):
# a Triton GEMM fusion, a cuBLAS call, cuDNN convolutions (forward, data gradient, filter gradient) with
# their u8 workspace, cuDNN attention forward and backward, a multi-output fusion read by element (name#k),
# an in-place dynamic-update-slice (also in an async-start, as jax 0.11's XLA:GPU runs a scan's),
# conditionals of an index and of a pred, and an fsdp all-gather.
GPU_MODULE = os.path.join(ROOT, "tests", "data", "xla_gpu_step_excerpt.hlo")


def test_train_step_roofline_refuses_a_chip_it_has_no_figures_for_before_compiling():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--roofline=5",
                          "--config=stage1_256", "--config_arg=smoke", "--size=64x64", "--compile_only",
                          "--devices=1", "--mesh=data=1,fsdp=1,tensor=1"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0
    assert "--roofline: no peak FLOP/s and memory bandwidth for 'cpu' (cpu)" in out.stderr
    assert "compile_s" not in out.stdout


def test_train_step_roofline_knows_tpu_and_gpu_chips():
    import types

    import train_step as bench

    def chip(platform, kind):
        return bench.chip_roofline(types.SimpleNamespace(platform=platform, device_kind=kind))

    assert chip("tpu", "TPU v5 lite") == (197e12, 819e9)
    assert chip("gpu", "NVIDIA H200") == (989e12, 4.8e12)
    with pytest.raises(ValueError, match="TPU v3"):
        chip("tpu", "TPU v3")


def test_train_step_draws_the_state_row_major_where_the_steps_formats_do_not_compile(monkeypatch):
    """The bench draws its state in the compiled step's formats; should a jit refuse those as its outputs
    (a GPU's layouts), it draws row-major and places the state, and still times the step."""
    import train_step as bench

    from sdxl_jax import train_state

    compile_init = train_state.compile_init

    def refuse_formats(setup, config, formats=None):
        if formats is not None:
            raise ValueError("these layouts")
        return compile_init(setup, config)

    monkeypatch.setattr(train_state, "compile_init", refuse_formats)
    result = bench.run(bench.parse_args(["--config=stage1_256", "--config_arg=smoke", "--size=64x64",
                                         "--per_device_batch=1", "--steps=1", "--warmup=1"]))
    assert result["init_in_step_formats"] is False and result["step_s"] > 0, result


def test_roofline_reads_xla_gpu_gemms_convolutions_and_attention():
    with open(GPU_MODULE) as f:
        comps, entry = parse_module(f.read())
    ks = {k["name"]: k for k in kernels(comps, entry, 1e15, 1e12)}
    assert ks["gemm_fusion_dot.7"]["flops"] == 2 * 4096 * 640 * 640
    assert ks["gemm_fusion_dot.7"]["kind"] == "gemm"
    # The same GEMM as a cuBLAS call (what autotuning on a GPU may pick): its dims from backend_config, no
    # s8 workspace in its bytes.
    assert (ks["cublas"]["flops"], ks["cublas"]["kind"]) == (2 * 4096 * 640 * 640, "gemm")
    assert ks["cublas"]["bytes"] == (4096 * 640 + 640 * 640 + 4096 * 640) * 2
    conv = 2 * (128 * 128 * 320) * (3 * 3 * 320)  # the forward's multiply-adds, in all three
    assert [ks[f"conv.{i}"]["flops"] for i in (1, 2, 3)] == [conv, conv, conv]
    image = 128 * 128 * 320 * 2
    kernel = 320 * 3 * 3 * 320 * 2
    # The filter gradient reads x and the fusion's second output (not its whole tuple); no workspace.
    assert ks["conv.2"]["bytes"] == image + image + kernel
    scores = 10 * 4096 * 4096
    assert ks["attn.1"]["flops"] == 2 * 2 * scores * 64 and ks["attn.1"]["kind"] == "attention"
    assert ks["attn.2"]["flops"] == 5 * 2 * scores * 64
    # The in-place update reads the new f32[1280,1280] block and the index, writes it: not the stack.
    assert ks["dus_fusion"]["bytes"] == 2 * 1280 * 1280 * 4 + 4
    # The same fusion run on another stream (XLA:GPU wraps a scan's stacking in async-start / -done): the
    # fusion's cost, not the async tuple's (the stack read and written twice over).
    assert "fusion-start.1" not in ks and "fusion-done.1" not in ks
    assert ks["async_dus_fusion"]["bytes"] == ks["dus_fusion"]["bytes"]
    assert ks["async_dus_fusion"]["source"].startswith("fwd UNet/down_blocks_*/attentions_*/")
    assert ks["out"]["kind"] == "layout copy"
    # A conditional costs its dearer branch (the update, not the skip): its fusion reads and writes g.
    assert ks["update_fusion"]["bytes"] == 2 * 1280 * 1280 * 4 and "s.0" not in ks
    # A pred conditional (lax.cond of a bool: ema.every > 1) names true_ and false_computation.
    assert ks["ema_fusion"]["bytes"] == 2 * 1280 * 1280 * 4
    # branch="cheapest" counts the skips instead (ema.every > 1: the steps without the EMA's update).
    skips = {k["name"]: k for k in kernels(comps, entry, 1e15, 1e12, branch="cheapest")}
    assert set(skips) == set(ks) - {"update_fusion", "ema_fusion"}
    # The all-gather sends its shard over the links, overlapped with compute: listed, no time; done is free.
    assert (ks["ags"]["kind"], ks["ags"]["bytes"], ks["ags"]["seconds"]) == ("collective", 640 * 640 * 2, 0.0)
    assert "agd" not in ks
    assert ks["gemm_fusion_dot.7"]["source"] == "fwd UNet/down_blocks_*/attentions_*/proj_in/dot_general"
    assert ks["conv.2"]["source"].startswith("bwd ")
    # The optimizer and EMA update, fused per leaf with the non-finite select at its root: the step's, not
    # the model's forward.
    assert ks["update_fusion"]["source"] == "step jit(_where)/select_n"


# XLA:TPU's forms (cut down from a v5e-8 compile of the base's scanned step): a windowed collective matmul
# (a while loop with no known trip count, unrolled by two: its counter steps by 2), an operand staged in
# VMEM (S(1)) by a copy-start, a batched dot written as a base-dilated convolution, an fsdp all-gather
# wrapped in fusions whose roots are AsyncCollectiveStart / AsyncCollectiveDone, and splash attention's
# Pallas kernels.
TPU_MODULE = os.path.join(ROOT, "tests", "data", "xla_tpu_step_excerpt.hlo")


def test_roofline_reads_xla_tpu_loops_vmem_dmas_and_collectives(tmp_path):
    with open(TPU_MODULE) as f:
        comps, entry = parse_module(f.read())
    ks = {k["name"]: k for k in kernels(comps, entry, 1e14, 1e12)}
    # `counter < 5`, from 1 (a copy of the constant, as XLA:TPU writes it), in steps of 2 (added in the scalar
    # memory space, the counter copied into it and the sum out of it, as XLA:TPU may): two iterations (three
    # from 0, four in steps of 1). Each multiplies a 5120-wide input by two 80-wide weight windows; the
    # window's padded tap does no work.
    assert ks["wfusion"]["count"] == 2
    assert ks["wfusion"]["flops"] == 2 * (2 * 4096 * 2 * 80) * 5120
    assert ks["wfusion"]["bytes"] == 2 * 4096 * 5120 * 2  # the weights and the result stay in VMEM
    assert (ks["cps"]["kind"], ks["cps"]["count"], ks["cps"]["sent"]) == ("collective", 2, 80 * 5120 * 2 * 2)
    # The batched dot as a convolution whose window spans the batch and the heads with lhs dilation: one
    # tap of each window meets data, so 2 x 64 FLOPs per score.
    assert ks["scores"]["flops"] == 2 * (2 * 10 * 4096 * 512) * 64
    assert ks["scores"]["bytes"] == (2 * 4096 * 10 * 64 + 2 * 512 * 10 * 64) * 2 + 2 * 10 * 4096 * 512 * 4
    # Splash attention's Pallas kernels (cross-attention: 4096 image tokens, 128 padded text tokens): the
    # forward's two products, dkv's four.
    scores = 2 * 10 * 4096 * 128 * 64
    fwd, dkv = ks["splash_mha_fwd_segmented_residuals.1"], ks["splash_mha_dkv_segmented_no_residuals.1"]
    assert (fwd["flops"], dkv["flops"], fwd["kind"]) == (2 * 2 * scores, 2 * 4 * scores, "attention")
    assert fwd["source"] == "splash attention (fwd)"
    # Their grids: 2 rows x 10 heads x 32 query blocks x 1 key block (their s8 block masks), each step
    # charged grid_step_s on top of the roofline time where asked.
    assert fwd["grid_steps"] == dkv["grid_steps"] == 2 * 10 * 32 * 1
    # The fused backward (a dkv kernel with dQ's per-key-block partials, a 5-D result): five products, over
    # 512-query blocks.
    fused = ks["splash_mha_dkv_segmented_no_residuals.2"]
    assert (fused["flops"], fused["grid_steps"]) == (2 * 5 * scores, 2 * 10 * 8 * 1)
    charged = {k["name"]: k for k in kernels(comps, entry, 1e14, 1e12, grid_step_s=1e-6)}
    assert charged[fwd["name"]]["seconds"] == pytest.approx(fwd["seconds"] + 640e-6)
    assert charged["scores"]["seconds"] == ks["scores"]["seconds"] and "grid_steps" not in ks["scores"]
    # The DMA that stages the loop's weights in VMEM moves them once; the copy out of VMEM writes only.
    assert (ks["prefetch"]["kind"], ks["prefetch"]["bytes"]) == ("async copy", 2 * 80 * 5120 * 2)
    assert ks["prefetch"]["source"] == "(DMA between HBM and VMEM)"
    assert ks["out"]["bytes"] == 2 * 4096 * 2 * 80 * 2 and ks["acc"]["bytes"] == 2  # its scalar, in HBM
    # The all-gather over the mesh axis of 8 sends its shard to 7 chips; the waiting fusion is free.
    shard = 352 * 1280 * 2
    assert (ks["started"]["kind"], ks["started"]["bytes"]) == ("collective", shard)
    assert ks["started"]["sent"] == 7 * shard
    assert not {"gathered", "cpd", "prefetched"} & set(ks)

    dump = tmp_path / "dump"
    dump.mkdir()
    shutil.copy(TPU_MODULE, dump / "module_0003.jit_step_fn.cl_1.after_optimizations.txt")
    r = roofline(str(dump), 1e14, 1e12, platform="tpu", model_flops=1e9)
    assert r["collective_sent_bytes"] == 2 * ks["cps"]["sent"] + ks["started"]["sent"]
    hbm = sum(k["bytes"] * k["count"] for k in ks.values() if k["kind"] != "collective")
    assert r["overlapped_s"] == max(r["kernel_flops"] / 1e14, hbm / 1e12) < r["step_s"]
    assert r["async_copy_s"] == ks["prefetch"]["bytes"] / 1e12
    text = format_roofline(r)
    assert "DMAs between HBM and VMEM" in text and "collectives send" in text
    assert r["grid_steps"] == 2 * 640 + 160 and "1,440 grid steps a step (not charged" in text
    slow = roofline(str(dump), 1e14, 1e12, platform="tpu", grid_step_s=1e-6)
    assert slow["step_s"] == pytest.approx(r["step_s"] + 1440e-6)
    assert "at 1 us each, 1.4 ms in the step time" in format_roofline(slow)


def test_aot_loads_a_saved_program_without_compiling_and_compiles_the_rest(tmp_path, monkeypatch):
    """bench/aot.py: a program saved here loads where it is lowered again from other source lines (its key
    leaves out debug locations, which hold a host's paths) and runs as compiled, without a compile; another
    program compiles; a file that does not load is recorded, and its program compiled."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src import compiler

    x = jnp.linspace(0.0, 3.0, 8)

    def program():  # a new function each call, so that jax's in-memory caches do not answer
        def f(v):
            return jnp.sin(v) * 2.0 + 1.0

        return f

    with aot.programs("save", str(tmp_path)):
        saved = jax.jit(program()).lower(x).compile()
    assert aot.events()[-1]["action"] == "saved"
    (path,) = tmp_path.glob("jit_f-*.xla.xz")
    want = np.asarray(saved(x))

    def refuse(*args, **kwargs):
        raise AssertionError("compiled")

    def g(v):  # the same program from other source lines: other debug locations
        return jnp.sin(v) * 2.0 + 1.0

    g.__name__ = g.__qualname__ = "f"
    monkeypatch.setattr(compiler, "backend_compile_and_load", refuse)
    n = len(aot.events())
    with aot.programs("load", str(tmp_path)):
        loaded = jax.jit(g).lower(x).compile()
    assert [e["action"] for e in aot.events()[n:]] == ["loaded"]
    np.testing.assert_array_equal(np.asarray(loaded(x)), want)
    with pytest.raises(AssertionError, match="compiled"):  # outside the context, XLA compiles again
        jax.jit(program()).lower(x).compile()
    monkeypatch.undo()

    with aot.programs("load", str(tmp_path)):
        other = jax.jit(lambda v: jnp.cos(v) - 1.0).lower(x).compile()
    assert aot.events()[-1]["action"] == "compiled: no file"
    np.testing.assert_allclose(np.asarray(other(x)), np.cos(np.asarray(x)) - 1.0, rtol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # load mode writes nothing

    path.write_bytes(lzma.compress(b"not an executable"))
    with aot.programs("load", str(tmp_path)):
        again = jax.jit(program()).lower(x).compile()
    assert aot.events()[-1]["action"] == "load_failed" and aot.events()[-1]["error"]
    np.testing.assert_array_equal(np.asarray(again(x)), want)


OPTIMIZED_HLO_PROGRAM = """
import sys
sys.path.insert(0, sys.argv[2])
import jax, jax.numpy as jnp
import aot

def step_fn(x, w):
    for _ in range(3):
        x = jax.nn.gelu(x @ w)
    return (x ** 2).sum()

args = (jax.ShapeDtypeStruct((256, 512), jnp.float32), jax.ShapeDtypeStruct((512, 512), jnp.float32))
compiled = jax.jit(jax.grad(step_fn, argnums=1)).lower(*args).compile()
aot.write_optimized_hlo(compiled, sys.argv[1], "jit_step_fn")
"""


def test_a_loaded_programs_optimized_hlo_reads_as_xlas_dump(tmp_path):
    """A loaded program has no compile for XLA to dump: aot.write_optimized_hlo writes its optimized HLO
    where bench/roofline.py looks, and the estimate from it is the one from XLA's dump of the compile."""
    dump, written = tmp_path / "dump", tmp_path / "written"
    written.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*")
    subprocess.run([sys.executable, "-c", OPTIMIZED_HLO_PROGRAM, str(written), os.path.join(ROOT, "bench")],
                   env=env, check=True, timeout=300)  # fmt: skip
    from_dump = roofline(str(dump), 1e12, 1e11, platform="cpu")
    from_written = roofline(str(written), 1e12, 1e11, platform="cpu")
    assert from_written["kernels"] == from_dump["kernels"] > 0
    for key in ("step_s", "kernel_flops", "bytes", "by_part", "by_kind"):
        assert from_written[key] == from_dump[key], key


def test_train_step_runs_the_programs_its_compile_only_run_saved(tmp_path):
    """bench/train_step.py --compile_only --aot=save compiles every program a timed run needs (the step and
    the init programs, in the step's formats), and the timed run with --aot=load compiles none of them:
    its loss is the one a run that compiles gets."""
    smoke = [sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--config=stage1_256",
             "--config_arg=smoke", "--size=64x64", "--per_device_batch=2", "--steps=1", "--warmup=1",
             "--mesh=data=1,fsdp=1,tensor=1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as on one GPU
    env["JAX_PLATFORMS"] = "cpu"

    def run(*args):
        out = subprocess.run(smoke + list(args), capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    saved = run("--compile_only", "--devices=1", "--aot=save", f"--aot_dir={tmp_path}")
    loaded = run("--aot=load", f"--aot_dir={tmp_path}")
    compiled = run()
    assert {"jit_step_fn", "jit__lambda", "jit_frozen"} <= set(saved["aot"]), saved["aot"]
    assert set(saved["aot"].values()) == {"saved"}
    # the configs' "auto" attention, on this CPU the chunked kernel
    assert (saved["attention"], saved["attention_kernel"]) == ("auto", "chunked")
    assert saved["attention_fallbacks"] == []
    # every program the compile-only run saved loads (the timed run compiles only small ones of its own)
    assert {name: loaded["aot"].get(name) for name in saved["aot"]} == dict.fromkeys(saved["aot"], "loaded")
    assert loaded["loss"] == compiled["loss"] and loaded["init_in_step_formats"], (loaded, compiled)


def test_restore_relayout_bench_runs_in_both_modes():
    """Both modes run on the tiny UNet (four state trees) and report the same state size."""
    got = []
    for mode in ("groups", "whole"):
        out = subprocess.run([sys.executable, "bench/restore_relayout.py", f"--mode={mode}", "--unet=tiny",
                              "--trees=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        got.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert [g["mode"] for g in got] == ["groups", "whole"]
    assert got[0]["state_gib"] == got[1]["state_gib"] > 0


def _wheel(directory, name, version, *requires):
    """A wheel file holding only its METADATA: all that bench/wheel_closure.py reads."""
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    stem = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(directory / f"{stem}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{stem}.dist-info/METADATA", "\n".join(lines) + "\n")


def test_the_carried_wheels_must_bring_what_the_gpu_image_lacks(tmp_path):
    """importlib_metadata 10 declares lazy-importer below Python 3.15 and the GPU image has none: the check
    must name it, and pass once it is carried. Markers are read for the image's Python 3.12, extras are
    left out, known image versions are compared, and two wheels of one package are refused."""
    image = read_image(os.path.join(ROOT, "bench", "gpu_image_packages.txt"))
    assert image["huggingface-hub"] == "1.33.0" and "zipp" in image and "lazy-importer" not in image
    _wheel(tmp_path, "diffusers", "0.42.1", "importlib_metadata", "huggingface-hub<3.0,>=1.32.0",
           "torch>=1.4; extra == 'torch'")  # fmt: skip
    needs = ['lazy-importer>=0.1; python_version < "3.15"', 'backports.old; python_version < "3.8"']
    _wheel(tmp_path, "importlib_metadata", "10.2.0", "zipp>=3.20", *needs)
    assert missing(str(tmp_path), image) == [
        "importlib_metadata-10.2.0-py3-none-any.whl needs lazy-importer>=0.1; python_version < \"3.15\": "
        "not in the image, not carried"]  # fmt: skip
    _wheel(tmp_path, "lazy-importer", "0.1.0")
    assert missing(str(tmp_path), image) == []
    _wheel(tmp_path, "ml_collections", "1.1.0", "huggingface_hub>=2")
    assert missing(str(tmp_path), image) == [
        "ml_collections-1.1.0-py3-none-any.whl needs huggingface_hub>=2: the GPU machine would have "
        "huggingface_hub 1.33.0"]  # fmt: skip
    os.remove(tmp_path / "ml_collections-1.1.0-py3-none-any.whl")
    _wheel(tmp_path, "lazy-importer", "0.2.0")
    (problem,) = missing(str(tmp_path), image)
    assert "two versions of lazy-importer" in problem


@pytest.mark.slow
def test_the_gpu_suite_runs_every_part_and_its_summary_on_cpu(tmp_path):
    """`SMOKE=1 bench/gpu_suite.sh preflight`, then `bench/gpu_suite.sh smoke`: every part's command line at
    tiny sizes, compiled ahead and loaded (about 5 minutes), so that a session's few GPU minutes are not
    lost to a broken script (the cudnn part runs too: off a GPU the kernel falls back to chunked
    attention)."""
    aot_dir = tmp_path / "aot"
    env = dict(os.environ, OUTDIR=str(tmp_path / "preflight"), PY=sys.executable, AOT_DIR=str(aot_dir),
               SMOKE="1")  # fmt: skip
    out = subprocess.run(["bash", "bench/gpu_suite.sh", "preflight"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ours = {"ours_train_1024", "ours_train_1024_scan", "ours_train_1024_dots", "ours_train_1024_cudnn",
            "ours_train_1024_cudnn_b4", "ours_sample_1024", "ours_sample_1024_chunked"}  # fmt: skip
    assert {p.name for p in aot_dir.iterdir()} == ours  # every part but the autotuned one compiles ahead
    # The smoke run loads them; the sampling part's loading run is made to fail, and it runs again compiled.
    # (the autotuned part runs only where nothing loads by default: here too, to run its command line)
    env = dict(os.environ, OUTDIR=str(tmp_path), PY=sys.executable, AOT_DIR=str(aot_dir),
               FAIL_AOT_PART="ours_sample_1024", AUTOTUNED="1")  # fmt: skip
    out = subprocess.run(["bash", "bench/gpu_suite.sh", "smoke"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "suite.jsonl")]
    summary = json.loads(out.stdout.strip().splitlines()[-2])
    assert set(summary["aot"]) == ours - {"ours_sample_1024"}, summary["aot"]
    # the step and the state's and frozen params' init; the sampling bench's four programs
    programs = {"train": {"jit_step_fn", "jit__lambda", "jit_frozen"},
                "sample": {"jit_init_unet", "jit_init_vae", "jit_loop", "jit__decode_to_uint8"}}  # fmt: skip
    for part, events in summary["aot"].items():
        names = programs["sample" if "sample" in part else "train"]
        assert {n: events.get(n) for n in names} == dict.fromkeys(names, "loaded"), (part, events)
    assert summary["rerun_compiled"] == ["ours_sample_1024"], summary
    assert [r["rc"] for r in rows if r.get("part") == "ours_sample_1024" and "rc" in r] == [2], rows
    parts = {r["part"].removesuffix("_live") for r in rows
             if "part" in r and "rc" not in r and "skipped" not in r}  # fmt: skip
    assert parts >= {"ours_train_1024", "torch_train_1024", "ours_sample_1024", "torch_sample_1024",
                     "ours_train_1024_scan", "ours_train_1024_dots", "ours_train_1024_cudnn",
                     "ours_train_1024_cudnn_b4", "ours_train_1024_cudnn_b4_autotuned",
                     "ours_sample_1024_chunked"}, rows  # fmt: skip
    assert summary["summary"] and summary["device"] == "cpu" and summary["failed_or_skipped"] == []
    assert summary["attention_fallbacks"] == {  # on a CPU cuDNN's parts ran chunked, and say so
        "ours_sample_1024": ["cudnn on cpu: needs an NVIDIA GPU"],
        "ours_train_1024_cudnn": ["cudnn on cpu: needs an NVIDIA GPU"],
        "ours_train_1024_cudnn_b4": ["cudnn on cpu: needs an NVIDIA GPU"],
        "ours_train_1024_cudnn_b4_autotuned": ["cudnn on cpu: needs an NVIDIA GPU"]}, summary  # fmt: skip
    for key in ("train_speedup_vs_diffusers", "sample_speedup_vs_diffusers", "scan_speedup",
                "autotune_speedup"):
        assert summary[key] > 0, summary
    # --roofline has no figures for a CPU: the parts that ask for it keep their timings and say why.
    assert sorted(summary["roofline_errors"]) == [
        "ours_sample_1024", "ours_train_1024", "ours_train_1024_cudnn", "ours_train_1024_cudnn_b4"], summary
    # The target's part runs 4 rows (its --per_device_batch overrides the suite's 1); a CPU has no MFU.
    (b4,) = [r for r in rows if r.get("part") == "ours_train_1024_cudnn_b4" and "step_s" in r]
    assert (b4["per_device_batch"], b4["global_batch"]) == (4, 4), b4
    assert "train_1024_cudnn_b4_mfu" in summary, summary
    for error in summary["roofline_errors"].values():
        assert "no peak FLOP/s and memory bandwidth for 'cpu'" in error
    assert summary["measured_over_roofline"] == {}, summary
    # Parts f and c traced 2 steps / 1 batch after their timing: their span is about the timed step's or
    # batch's; the XSpaces are kept for the device call to bring back (no estimate on a CPU to set them
    # against). The sampling part's loading run failed; its rerun traced.
    assert set(summary["trace"]) == {"ours_train_1024_cudnn_b4", "ours_sample_1024"}, summary["trace"]
    for trace in summary["trace"].values():
        assert 0.3 < trace["span_over_timed"] < 3 and trace["kernels"] > 100, summary["trace"]
        assert "measured_over_estimated" not in trace, trace
    assert (tmp_path / "trace_f" / "step_fn.xplane.pb").stat().st_size > 0
    assert (tmp_path / "trace_c" / "sample.xplane.pb").stat().st_size > 0
    # Every part compiled side by side, then timed in its own turn, after the suite gave it the device
    # (go_at: whole seconds, rounded down): no two timings overlap.
    assert set(summary["turns"]) == parts, summary["turns"]
    go_at = {r["part"]: r["go_at"] for r in rows if "go_at" in r}
    timed = {r["part"]: r["timed_window"] for r in rows if "timed_window" in r}
    assert len(timed) == 8, timed  # our train-step and sampling parts
    assert all(window[0] >= go_at[part] for part, window in timed.items()), (timed, go_at)
    windows = sorted(timed.values())
    assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:], strict=False)), windows
