"""Training metrics on host 0: console progress line, TensorBoard scalars, workdir/metrics.jsonl."""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import numpy as np
from etils import epath

from sdxl_jax import paths

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (CPU) report no MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return None


def compiled_stats(compiled) -> dict:
    """FLOPs and memory of a compiled step (per device, as XLA reports them)."""
    out = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["flops"] = float(cost.get("flops", float("nan")))
    except Exception:  # some backends do not implement cost analysis
        out["flops"] = float("nan")
    try:
        mem = compiled.memory_analysis()
        for key in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            out[key] = int(getattr(mem, key))
        out["peak_bytes"] = (
            out["argument_size_in_bytes"]
            + out["output_size_in_bytes"]
            + out["temp_size_in_bytes"]
            - out["alias_size_in_bytes"]
        )
        # The compiler's own peak, where the backend reports one (TPU). It can be well under peak_bytes:
        # for the full base on TPU v5e, peak_bytes 15.84 GiB against HBM allocations of 14.67 GiB
        # (bench/RESULTS.md, 2026-11-27 session 7).
        compiler_peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
        if compiler_peak > 0:
            out["compiler_peak_bytes"] = compiler_peak
    except Exception:
        pass
    return out


def format_stats(name: str, stats: dict) -> str:
    gib = 1 << 30
    parts = [f"compiled {name}:"]
    if "peak_bytes" in stats:
        parts.append(
            f"memory per device {stats['peak_bytes'] / gib:.3f} GiB "
            f"(args {stats['argument_size_in_bytes'] / gib:.3f}, "
            f"temp {stats['temp_size_in_bytes'] / gib:.3f}, out {stats['output_size_in_bytes'] / gib:.3f}, "
            f"aliased {stats['alias_size_in_bytes'] / gib:.3f})"
        )
        if "compiler_peak_bytes" in stats:
            parts.append(f"compiler's peak {stats['compiler_peak_bytes'] / gib:.3f} GiB")
    parts.append(f"{stats.get('flops', float('nan')) / 1e12:.3f} TFLOPs per device per step")
    return " ".join(parts)


class JsonLines:
    """Lines appended to one file, on a local disk or in an object store.

    Local: an append-mode file, flushed after every line. Object store: an object cannot be appended to
    (gcsfs's open(mode="a") warns and overwrites it) and what is written appears only when the file is
    closed, so the old content is read once, at the first line, and the whole object is rewritten with
    the new lines: at the first line, then at most every `upload_every` seconds, and at close. A crash
    loses at most the lines of the last `upload_every` seconds; each rewrite is atomic on GCS.
    """

    def __init__(self, path, *, upload_every: float = 30.0):
        self.path = epath.Path(path)
        self.upload_every = float(upload_every)
        self._file = None if paths.is_remote(self.path) else self.path.open("a")
        self._text = None  # remote: the object's content as last uploaded plus the lines since
        self._pending = False
        self._uploaded_at = -math.inf

    def write(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        if self._text is None:
            self._text = self.path.read_text() if self.path.exists() else ""
        self._text += line
        self._pending = True
        if time.monotonic() - self._uploaded_at >= self.upload_every:
            self._upload()

    def _upload(self) -> None:
        self.path.write_text(self._text)
        self._pending = False
        self._uploaded_at = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._pending:
            self._upload()


class MetricWriter:
    """Writes on process 0 only; other processes' calls are no-ops.

    The workdir may be local or remote (gs://, through etils.epath). Remote, the jsonl files are
    JsonLines objects rewritten at most every `upload_every` seconds, and TensorBoard starts a new event
    file after every `images` call and every `tb_rotate_every` flushes: tensorboardX's GCS writer uploads
    its whole event file at each flush, so one file growing with preview images would be uploaded again
    and again for the whole run. TensorBoard reads every event file of the folder.
    """

    def __init__(self, workdir: str, total_steps: int, *, tensorboard: bool = True, stream=None,
                 upload_every: float = 30.0, tb_rotate_every: int = 200):  # fmt: skip
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self._tb = None
        self._jsonl = None
        self._root = None
        self._extra = {}  # other jsonl files in the workdir (scalars(jsonl=...)), opened on first use
        self._upload_every = upload_every
        self._tb_rotate_every = tb_rotate_every
        self._tb_files = self._tb_flushes = 0
        self._t0 = None
        self._last = None  # (time, step) at the previous log, for images/s
        if not self.active:
            return
        # epath: the workdir may be remote (gs://); only host 0 gets here, so one writer per file.
        self._root = root = epath.Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        self._jsonl = JsonLines(root / "metrics.jsonl", upload_every=upload_every)
        if tensorboard:
            self._tb = self._new_event_file()

    def _new_event_file(self):
        from tensorboardX import SummaryWriter

        self._tb_files += 1
        self._tb_flushes = 0
        # The suffix keeps files apart when two are started within the same second (same time stamp).
        return SummaryWriter(str(self._root / "tensorboard"), filename_suffix=f".{self._tb_files}")

    def _flush_tb(self, *, rotate: bool = False) -> None:
        self._tb.flush()
        self._tb_flushes += 1
        if paths.is_remote(self._root) and (rotate or self._tb_flushes >= self._tb_rotate_every):
            self._tb.close()
            self._tb = self._new_event_file()

    def start(self, step: int) -> None:
        self._t0 = time.time()
        self._last = (self._t0, step)

    def write(self, step: int, scalars: dict, *, batch_size: int | None = None, flops: float | None = None):
        """Log scalars for `step`; adds images_per_sec, mfu and the ETA from the time since the last call."""
        if not self.active:
            return
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        now = time.time()
        if self._last is not None and step > self._last[1]:
            dt = (now - self._last[0]) / (step - self._last[1])
            if batch_size:
                scalars["images_per_sec"] = batch_size / dt
            peak = peak_flops_per_device()
            if flops and peak and math.isfinite(flops):
                scalars["mfu"] = flops / dt / peak
            eta = dt * (self.total_steps - step)
        else:
            eta = float("nan")
        self._last = (now, step)
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._flush_tb()
        self._progress(step, scalars, eta)

    def _progress(self, step, scalars, eta):
        width = 24
        done = int(width * step / max(self.total_steps, 1))
        bar = "#" * done + "." * (width - done)
        eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        ips = scalars.get("images_per_sec")
        ips_s = f" {ips:.2f} img/s" if ips is not None else ""
        print(
            f"[{bar}] step {step}/{self.total_steps} loss {scalars.get('loss', float('nan')):.5f}"
            f"{ips_s} eta {eta_s}",
            file=self.stream,
            flush=True,
        )

    def scalars(self, step: int, scalars: dict, *, prefix: str = "", jsonl: str | None = None) -> None:
        """Scalars that are not a training step's (an evaluation's): TensorBoard as prefix/key, and one
        {"step", **scalars} line appended to workdir/<jsonl> when given. No rates, no progress line."""
        if not self.active:
            return
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        if jsonl is not None:
            if jsonl not in self._extra:
                self._extra[jsonl] = JsonLines(self._root / jsonl, upload_every=self._upload_every)
            self._extra[jsonl].write(json.dumps({"step": int(step), **scalars}) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{prefix}/{key}" if prefix else key, value, step)
            self._flush_tb()

    def text(self, key: str, value: str, step: int) -> None:
        if self.active and self._tb is not None:
            self._tb.add_text(key, value, step)

    def images(self, key: str, images: np.ndarray, step: int) -> None:
        """uint8 (B, H, W, 3) images to TensorBoard."""
        if self.active and self._tb is not None:
            self._tb.add_images(key, images, step, dataformats="NHWC")
            self._flush_tb(rotate=True)

    def close(self) -> None:
        for f in (self._jsonl, *self._extra.values()):
            if f is not None:
                f.close()
        self._extra = {}
        if self._tb is not None:
            self._tb.close()
