"""Device traces of chosen train steps (config.profile) and the per-op times read back from them.

`jax.profiler` writes an XSpace (`<host>.xplane.pb`, the file TensorBoard's profile plugin and xprof open).
In it every op of a compiled program that ran carries the op's HLO instruction name (`hlo_op`) and its
module (`hlo_module`): XLA:CPU's thunks on host threads (seen here); a GPU's kernels on the device plane's
stream lines, cuBLAS and cuDNN calls too, and a TPU's ops on its "XLA Ops" line (as public readers of JAX
traces take them; not yet seen here, and a GPU kernel without `hlo_op` is named by itself).
`op_events` reads them for one device; `summarize` gives the time per op and per step, which
bench/roofline.py sets against its estimate for the same instruction names.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import shutil
import socket
import tempfile

import jax
from etils import epath


@dataclasses.dataclass(frozen=True)
class OpEvent:
    op: str  # HLO instruction name (e.g. "loop_add_fusion.3", "custom-call.12")
    module: str  # HLO module (e.g. "jit_step_fn"); "" where the trace does not say
    start_ns: float
    duration_ns: float


def trace_files(root) -> list[str]:
    """The XSpace files under `root` (a jax.profiler log dir), oldest run first."""
    return sorted(glob.glob(os.path.join(os.fspath(root), "**", "*.xplane.pb"), recursive=True))


def _stats(event) -> dict:
    try:
        return dict(event.stats)
    except Exception:  # a stat the reader cannot convert
        return {}


def op_events(path: str, module: str = "") -> tuple[str, list[OpEvent]]:
    """(device, events) of the first device plane in the XSpace at `path` that holds events
    ("/device:GPU:0", "/device:TPU:0"; each event's op is its `hlo_op`, or where it has none its own name:
    a TPU's op, a GPU kernel's, e.g. an XLA fusion's kernel "loop_add_fusion_3"), else of the host's XLA:CPU
    thunks of its lowest device ordinal (launches on a host are not taken for a device's ops).
    `module`: keep ops of HLO modules whose name contains it (e.g. "step_fn"), and ops whose module the
    trace does not name."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    keep = (lambda m: not m or module in m) if module else (lambda m: True)
    host = {}  # device ordinal -> events, from XLA:CPU's thunks
    for plane in data.planes:
        device_plane = plane.name.startswith("/device:")
        lines = list(plane.lines)
        if device_plane and any(line.name == "XLA Ops" for line in lines):  # TPU: one line of ops
            lines = [line for line in lines if line.name == "XLA Ops"]
        events = []
        for line in lines:
            for e in line.events:
                stats = _stats(e)
                op = stats.get("hlo_op") or (e.name if device_plane else None)
                if not op:
                    continue
                mod = str(stats.get("hlo_module", ""))
                if not keep(mod):
                    continue
                event = OpEvent(str(op), mod, float(e.start_ns), float(e.duration_ns))
                if device_plane:
                    events.append(event)
                else:
                    host.setdefault(int(stats.get("device_ordinal", 0)), []).append(event)
        if device_plane and events:
            return plane.name, sorted(events, key=lambda e: e.start_ns)
    if host:
        ordinal = min(host)
        return f"/host:CPU device {ordinal}", sorted(host[ordinal], key=lambda e: e.start_ns)
    return "", []


def busy_ns(events: list[OpEvent]) -> float:
    """Time in which at least one op ran (the union of their intervals: streams overlap)."""
    total, end = 0.0, -float("inf")
    for e in sorted(events, key=lambda e: e.start_ns):
        stop = e.start_ns + e.duration_ns
        if stop > end:
            total += stop - max(e.start_ns, end)
            end = stop
    return total


def summarize(events: list[OpEvent], steps: int) -> dict:
    """Per step: the span from the first op's start to the last op's end, the busy time, the ops' summed
    time and count; and {op: [summed ns, count]} over all steps. Instruction names are unique within a
    program only: where the events name several programs, per_op's keys are "module/op"."""
    per_op: dict[str, list] = {}
    several = len({e.module for e in events if e.module}) > 1
    for e in events:
        t = per_op.setdefault(f"{e.module}/{e.op}" if several else e.op, [0.0, 0])
        t[0] += e.duration_ns
        t[1] += 1
    span = (max(e.start_ns + e.duration_ns for e in events) - events[0].start_ns) if events else 0.0
    steps = max(int(steps), 1)
    return {
        "steps": steps,
        "span_s": span / steps / 1e9,
        "busy_s": busy_ns(events) / steps / 1e9,
        "op_time_s": sum(t[0] for t in per_op.values()) / steps / 1e9,
        "ops": len(events) / steps,
        "per_op": per_op,
    }


def format_summary(device: str, s: dict, top: int = 10, unit: str = "step") -> str:
    lines = [
        f"trace of {s['steps']} {unit}(s) on {device}: per {unit} {s['span_s'] * 1e3:.2f} ms from the first "
        f"op to the last, {s['busy_s'] * 1e3:.2f} ms busy, {s['ops']:.0f} ops"
    ]
    ranked = sorted(s["per_op"].items(), key=lambda kv: -kv[1][0])[:top]
    for op, (ns, n) in ranked:
        lines.append(f"  {ns / s['steps'] / 1e6:9.3f} ms {n / s['steps']:6.0f}x  {op}")
    return "\n".join(lines)


def trace_options(hlo: bool = True):
    """jax.profiler's options without Python's function calls (the stage-1 smoke's 2-step trace: 23.6 MB
    with them, 17.1 MB without; they also slow the host); `hlo`: include the programs' HLO (xprof's op
    profile and graph viewer read it; 15.3 MB of those 17.1)."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.enable_hlo_proto = hlo
    return options


def capture(fn, dest: str, hlo: bool = False) -> str:
    """Runs fn(), which must wait for its own results, under jax.profiler and writes the XSpace to the
    file `dest` (its folder made); returns dest. Whatever was dispatched before must have finished: its
    ops would run into the trace."""
    local = tempfile.mkdtemp(prefix="sdxl_jax_trace_")
    try:
        jax.profiler.start_trace(local, profiler_options=trace_options(hlo))
        try:
            fn()
        finally:
            jax.profiler.stop_trace()
        files = trace_files(local)
        if not files:
            raise FileNotFoundError(f"jax.profiler wrote no XSpace under {local}")
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        shutil.copyfile(files[-1], dest)
        return dest
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


class StepProfiler:
    """Traces config.profile.steps train steps, once per run, after config.profile.skip steps of the run
    (the first steps compile and warm up). Every process traces its own devices into a local folder, then
    copies the XSpace to `<workdir>/profile/plugins/profile/step_<first>/<host>_p<process>.xplane.pb`
    (local or gs://: `tensorboard --logdir <workdir>/profile` or xprof opens it); process 0 prints the
    slowest ops of its first device."""

    def __init__(self, config, workdir: str, first_step: int):
        self.steps = int(config.profile.steps)
        self.start = first_step + int(config.profile.skip)
        self.workdir = workdir
        self.local = None
        self.traced = 0  # steps run since the trace started

    def before_step(self, step: int, state) -> None:
        if self.steps > 0 and self.local is None and step == self.start:
            jax.block_until_ready(state)  # the steps before, dispatched ahead, stay out of the trace
            self.local = tempfile.mkdtemp(prefix="sdxl_jax_trace_")
            try:
                jax.profiler.start_trace(self.local, profiler_options=trace_options())
            except Exception as e:  # e.g. another trace in progress in this process
                logging.warning("profile from step %d not taken: %s: %s", step, type(e).__name__, e)
                shutil.rmtree(self.local, ignore_errors=True)
                self.local, self.steps = None, 0

    def after_step(self, step: int, state) -> None:
        if self.local is not None:
            self.traced = step - self.start
            if self.traced >= self.steps:
                self.stop(state)

    def stop(self, state=None) -> None:
        """Ends a trace in progress (also when the run ends first) and keeps its files."""
        if self.local is None or self.steps <= 0:
            return
        try:
            try:
                jax.block_until_ready(state)  # the traced steps' ops, not only their launches
            finally:
                jax.profiler.stop_trace()
            files = trace_files(self.local)
            if not files:
                raise FileNotFoundError(f"jax.profiler wrote no XSpace under {self.local}")
            dest = epath.Path(self.workdir) / "profile" / "plugins" / "profile" / f"step_{self.start}"
            dest.mkdir(parents=True, exist_ok=True)
            name = f"{_safe(socket.gethostname())}_p{jax.process_index()}.xplane.pb"
            (dest / name).write_bytes(epath.Path(files[-1]).read_bytes())
            if jax.process_index() == 0:
                device, events = op_events(files[-1], "step_fn")
                print(format_summary(device, summarize(events, max(self.traced, 1))), flush=True)
                logdir = epath.Path(self.workdir) / "profile"
                print(f"trace written to {dest} (tensorboard --logdir {logdir})", flush=True)
        except Exception as e:  # a trace is a diagnostic: the run goes on without it
            logging.warning("profile from step %d not kept: %s: %s", self.start, type(e).__name__, e)
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
            self.local, self.steps = None, 0
