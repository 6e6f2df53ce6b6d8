"""Device traces read back per HLO op (sdxl_jax/profiling.py) and set against bench/roofline.py's kernels.

A program's trace on the CPU names every thunk it ran by its HLO instruction, as a GPU's kernels and a
TPU's ops are named: each instruction of the optimized program is found in the trace once per run.
"""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from sdxl_jax import config_lib, profiling

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import roofline  # noqa: E402


def _step_fn(w, x):
    def loss(w):
        h = x
        for wi in w:
            h = jnp.tanh(h @ wi)
        return jnp.mean(h**2)

    g = jax.grad(loss)(w)
    return [wi - 0.1 * gi for wi, gi in zip(w, g, strict=True)]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(compiled step, its kernels per bench/roofline.py, the trace's device, events) for 3 traced runs."""
    w = [jnp.full((128, 128), 0.01) for _ in range(3)]
    x = jnp.ones((256, 128))
    compiled = jax.jit(_step_fn).lower(w, x).compile()
    comps, entry = roofline.parse_module(compiled.as_text())
    ks = roofline.kernels(comps, entry, 1e12, 1e11)
    w = jax.block_until_ready(compiled(w, x))  # else the warm-up run's ops would be in the trace
    log_dir = str(tmp_path_factory.mktemp("trace"))
    jax.profiler.start_trace(log_dir, profiler_options=profiling.trace_options(hlo=False))
    for _ in range(3):
        w = compiled(w, x)
    jax.block_until_ready(w)
    jax.profiler.stop_trace()
    (path,) = profiling.trace_files(log_dir)
    device, events = profiling.op_events(path, "step_fn")
    return compiled, ks, device, events, path


def test_every_op_of_the_program_is_traced_once_per_run(traced):
    compiled, ks, device, events, _ = traced
    assert device == "/host:CPU device 0"
    per_op = profiling.summarize(events, 3)["per_op"]
    names = {k["name"] for k in ks}
    assert per_op and set(per_op) == names, (sorted(per_op), sorted(names))
    assert {n for _, n in per_op.values()} == {3}  # no while loop: each instruction once a run
    assert all(e.module == "jit__step_fn" for e in events)


def test_the_module_filter_keeps_only_that_program(traced):
    path = traced[4]
    assert profiling.op_events(path, "no_such_module") == ("", [])


def test_summary_per_step(traced):
    events = traced[3]
    s = profiling.summarize(events, 3)
    assert s["ops"] == len(events) / 3
    assert 0 < s["busy_s"] <= s["span_s"]
    assert s["op_time_s"] == pytest.approx(sum(e.duration_ns for e in events) / 3 / 1e9)
    text = profiling.format_summary("cpu", s, top=3)
    assert "per step" in text and len(text.splitlines()) == 4


def test_busy_time_is_the_union_of_overlapping_ops():
    op = profiling.OpEvent
    ev = [op("a", "", 0, 10), op("b", "", 5, 10), op("c", "", 30, 5)]
    assert profiling.busy_ns(ev) == 20  # [0, 15) and [30, 35)
    assert profiling.busy_ns([]) == 0


def test_against_trace_matches_the_estimate_kernel_by_kernel(traced, tmp_path):
    _, ks, _, events, _ = traced
    s = profiling.summarize(events, 3)
    a = roofline.against_trace(ks, s["per_op"], 3)
    assert a["unmatched_s"] == 0 and a["unmeasured_s"] == 0
    assert a["matched_measured_s"] == pytest.approx(s["op_time_s"])
    assert a["matched_estimated_s"] == pytest.approx(sum(k["seconds"] * k["count"] for k in ks))
    assert sum(g["kernels"] for g in a["by_kind"]) == len(ks)
    # a trace that saw ops the estimate does not list, and missed one it does
    extra = dict(s["per_op"], **{"copy.999": [3e6, 3]})
    missing = ks[0]["name"]
    extra.pop(missing)
    b = roofline.against_trace(ks, extra, 3)
    assert b["unmatched_s"] == pytest.approx(1e-3) and b["unmatched_top"][0][1] == "copy_999"
    assert b["unmeasured_s"] == pytest.approx(ks[0]["seconds"] * ks[0]["count"])
    tsv = tmp_path / "kernels.tsv"
    roofline.write_kernels_tsv(b, str(tsv))
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t")[:5] == ["name", "kind", "source", "estimated_us", "measured_us"]
    assert len(lines) == 1 + len(ks)
    row = next(line.split("\t") for line in lines if line.startswith(missing + "\t"))
    assert row[4] == ""  # not measured
    assert "measured" in roofline.format_against_trace(b)


@pytest.mark.parametrize("key,value", [("steps", -1), ("skip", -2)])
def test_a_bad_profile_config_is_refused(key, value):
    from configs import stage1_256

    c = stage1_256.get_config("smoke")
    c.profile[key] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.profile.{key}"):
        config_lib.validate(c, num_devices=1)


def test_roofline_cli_sets_a_saved_trace_against_a_dump(traced, tmp_path, monkeypatch, capsys):
    compiled, ks, _, _, path = traced
    (tmp_path / "module_0001.jit__step_fn.cpu_after_optimizations.txt").write_text(compiled.as_text())
    tsv = tmp_path / "k.tsv"
    argv = ["roofline.py", str(tmp_path), "--platform=cpu", f"--trace={path}", "--trace_steps=3",
            f"--tsv={tsv}"]
    monkeypatch.setattr(sys, "argv", argv)
    roofline.main()
    out = capsys.readouterr().out
    assert "trace of 3 step(s) on /host:CPU device 0" in out
    assert "0.00 ms measured in ops the estimate does not list" in out
    assert len(tsv.read_text().splitlines()) == 1 + len(ks)


def _profile_config(steps, skip):
    import ml_collections

    return ml_collections.ConfigDict(dict(profile=dict(steps=steps, skip=skip)))


def step_fn(x):
    return jnp.tanh(x @ x) * 0.5


def test_step_profiler_keeps_a_trace_the_run_ended_inside(tmp_path, capsys):
    import socket

    profiler = profiling.StepProfiler(_profile_config(steps=5, skip=1), str(tmp_path), first_step=3)
    f, x = jax.jit(step_fn), jnp.ones((64, 64))
    for step in range(3, 7):  # the run's steps 4..7; the trace starts before the second and wants 5
        profiler.before_step(step, x)
        x = f(x)
        profiler.after_step(step + 1, x)
    profiler.stop(x)  # the run ended after 3 traced steps
    (path,) = profiling.trace_files(tmp_path / "profile")
    assert os.path.relpath(path, tmp_path) == os.path.join(
        "profile", "plugins", "profile", "step_4", f"{socket.gethostname()}_p0.xplane.pb")
    _, events = profiling.op_events(path, "step_fn")
    assert events and {n for _, n in profiling.summarize(events, 3)["per_op"].values()} == {3}
    assert "trace of 3 step(s)" in capsys.readouterr().out
    profiler.stop(x)  # once only


def test_a_trace_that_cannot_start_leaves_the_run_going(tmp_path):
    x = jnp.ones((8, 8))
    first = profiling.StepProfiler(_profile_config(steps=1, skip=0), str(tmp_path / "a"), first_step=0)
    second = profiling.StepProfiler(_profile_config(steps=1, skip=0), str(tmp_path / "b"), first_step=0)
    first.before_step(0, x)
    second.before_step(0, x)  # jax runs one trace at a time: this one is skipped, with a warning
    second.after_step(1, x)
    first.after_step(1, x)
    assert profiling.trace_files(tmp_path / "a") and not (tmp_path / "b").exists()


def _xspace(tmp_path, planes: str) -> str:
    from jax.profiler import ProfileData

    path = tmp_path / "synthetic.xplane.pb"
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace(planes))
    return str(path)


_STATS = """
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
  stat_metadata { key: 2 value { id: 2 name: "hlo_module" } }
  stat_metadata { key: 3 value { id: 3 name: "loop_add_fusion.3" } }
  stat_metadata { key: 4 value { id: 4 name: "jit_step_fn" } }
  stat_metadata { key: 5 value { id: 5 name: "jit_other" } }"""


def test_a_gpu_trace_is_read_from_the_device_plane_not_the_hosts_launches(tmp_path):
    """An XSpace shaped as a GPU's: the host's launch annotations carry hlo_op too, but the device plane's
    kernels are the ops; a kernel without hlo_op (a library's) keeps its own name; another module's goes."""
    path = _xspace(tmp_path, f"""
planes {{ id: 1 name: "/host:CPU"
  lines {{ id: 1 name: "tf_XLAGpu" timestamp_ns: 1000
    events {{ metadata_id: 1 offset_ps: 0 duration_ps: 100000
             stats {{ metadata_id: 1 ref_value: 3 }} stats {{ metadata_id: 2 ref_value: 4 }} }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "launch" }} }} {_STATS} }}
planes {{ id: 2 name: "/device:GPU:0"
  lines {{ id: 1 name: "Stream #13(compute)" timestamp_ns: 2000
    events {{ metadata_id: 1 offset_ps: 0 duration_ps: 5000000
             stats {{ metadata_id: 1 ref_value: 3 }} stats {{ metadata_id: 2 ref_value: 4 }} }}
    events {{ metadata_id: 2 offset_ps: 6000000 duration_ps: 2000000 }}
    events {{ metadata_id: 1 offset_ps: 9000000 duration_ps: 1000000
             stats {{ metadata_id: 1 ref_value: 3 }} stats {{ metadata_id: 2 ref_value: 5 }} }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "loop_add_fusion_3" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "sm90_xmma_gemm_bf16" }} }} {_STATS} }}
""")
    device, events = profiling.op_events(path, "step_fn")
    assert device == "/device:GPU:0"
    assert [(e.op, e.module, e.start_ns, e.duration_ns) for e in events] == [
        ("loop_add_fusion.3", "jit_step_fn", 2000, 5000), ("sm90_xmma_gemm_bf16", "", 8000, 2000)]


def test_a_tpu_trace_reads_its_xla_ops_line_only(tmp_path):
    path = _xspace(tmp_path, """
planes { id: 1 name: "/device:TPU:0"
  lines { id: 1 name: "XLA Modules" timestamp_ns: 0
    events { metadata_id: 1 offset_ps: 0 duration_ps: 9000000 } }
  lines { id: 2 name: "XLA Ops" timestamp_ns: 0
    events { metadata_id: 2 offset_ps: 1000000 duration_ps: 3000000 }
    events { metadata_id: 3 offset_ps: 5000000 duration_ps: 3000000 } }
  event_metadata { key: 1 value { id: 1 name: "jit_step_fn(1)" } }
  event_metadata { key: 2 value { id: 2 name: "fusion.7" } }
  event_metadata { key: 3 value { id: 3 name: "convolution.2" } } }
""")
    device, events = profiling.op_events(path, "step_fn")
    assert device == "/device:TPU:0" and [e.op for e in events] == ["fusion.7", "convolution.2"]
    s = profiling.summarize(events, 1)
    assert (s["span_s"], s["busy_s"]) == (7e-6, 6e-6)


def test_ops_of_several_programs_are_told_apart_by_module():
    op = profiling.OpEvent
    events = [op("fusion.1", "jit_loop", 0, 5), op("fusion.1", "jit_decode", 10, 5), op("k", "", 20, 1)]
    assert set(profiling.summarize(events, 1)["per_op"]) == {"jit_loop/fusion.1", "jit_decode/fusion.1", "/k"}
    # one program (and kernels the trace gives no program): plain instruction names, as the estimate's
    assert set(profiling.summarize(events[:1] + events[2:], 1)["per_op"]) == {"fusion.1", "k"}


def test_capture_keeps_the_trace_and_stops_it_on_an_error(tmp_path):
    f, x = jax.jit(step_fn), jnp.ones((16, 16))
    jax.block_until_ready(f(x))
    with pytest.raises(ZeroDivisionError):
        profiling.capture(lambda: 1 / 0, str(tmp_path / "a" / "x.xplane.pb"))
    # the failed capture stopped its trace, so another can start
    dest = profiling.capture(lambda: jax.block_until_ready(f(x)), str(tmp_path / "b" / "y.xplane.pb"))
    assert dest == str(tmp_path / "b" / "y.xplane.pb") and not (tmp_path / "a").exists()
    _, events = profiling.op_events(dest, "step_fn")
    assert {n for _, n in profiling.summarize(events, 1)["per_op"].values()} == {1}
