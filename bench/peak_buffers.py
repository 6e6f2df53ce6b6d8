"""What is live at the peak of a compiled XLA program: the buffers of its buffer assignment, grouped by shape.

    .venv/bin/python bench/peak_buffers.py DUMP_DIR [--top 25] [--module step_fn]

DUMP_DIR is an XLA dump (XLA_FLAGS="--xla_dump_to=DUMP_DIR --xla_dump_hlo_as_text"); bench/train_step.py
--compile_only --peak_buffers does both steps. XLA writes, per compiled module, the schedule's live ranges
with the buffers live at the peak (`*-live-range.txt`, "Live ranges at N (peak)") and the buffer
assignment (`*-buffer-assignment.txt`, each value's shape). Grouping the peak's buffers by shape tells
activations (leading batch dimension), gathered weights (full parameter shapes) and attention scores
(B, H, L, S) apart, which the totals of memory_analysis() cannot. It also sums what the buffer assignment
allocates per memory space (`allocations`): the memory the program takes on the device.
"""

import argparse
import collections
import glob
import os
import re


def peak_buffers(dump_dir: str, module: str = "step_fn") -> dict:
    """{"position": schedule index of the peak, "total": bytes, "groups": [(shape, count, bytes)] largest
    first} for the last compiled module whose name contains `module`."""
    ranges = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations-live-range.txt")))
    if not ranges:
        raise FileNotFoundError(f"no *{module}*after_optimizations-live-range.txt in {dump_dir}: dump with "
                                "XLA_FLAGS='--xla_dump_to=DIR --xla_dump_hlo_as_text'")
    live = ranges[-1]
    assignment = live.replace("-live-range.txt", "-buffer-assignment.txt")
    with open(assignment) as f:
        shapes = dict(re.findall(r"value: <\d+ (\S+) @\S+> \(size=\d+,offset=\d+\): ([^{\s]+)", f.read()))
    with open(live) as f:
        text = f.read()
    at = re.search(r"Live ranges at (\d+) \(peak\):", text)
    if at is None:
        raise ValueError(f"{live} has no 'Live ranges at N (peak)' section (XLA version?)")
    groups, counts, total = collections.Counter(), collections.Counter(), 0
    for name, index, size in re.findall(r"^\s+(\S+?)\{([^}]*)\}: (\d+) bytes", text[at.end():], flags=re.M):
        shape = shapes.get(f"{name}{{{index}}}" if index else name)  # tuple elements: name{i}
        if shape is None:  # a while loop's state shares its buffers with the loop's operands
            shape = "loop state (shape not recorded)" if name.startswith("while") else f"? ({name})"
        groups[shape] += int(size)
        counts[shape] += 1
        total += int(size)
    return {"position": int(at.group(1)), "total": total,
            "groups": [(s, counts[s], b) for s, b in groups.most_common()]}


def allocations(dump_dir: str, module: str = "step_fn") -> dict:
    """{memory space color: {"parameters": bytes, "temp": bytes}}: what the buffer assignment of the last
    compiled module whose name contains `module` allocates (color 0 is the device's main memory, a TPU's
    HBM). Its parameters are the program's arguments; its temp, every other allocation, the preallocated
    temp heap included. This is the memory the program takes on the device, where memory_analysis()'s
    temp_size can differ from it by GiBs (a v5e's scanned SDXL step at 2 rows: 17.44 GiB reported against
    9.59 allocated; bench/RESULTS.md, session 24)."""
    files = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations-buffer-assignment.txt")))
    if not files:
        raise FileNotFoundError(f"no *{module}*after_optimizations-buffer-assignment.txt in {dump_dir}")
    with open(files[-1]) as f:
        text = f.read()
    out = collections.defaultdict(lambda: {"parameters": 0, "temp": 0})
    for size, attributes in re.findall(r"^allocation \d+: size (\d+)(.*?):\s*$", text, flags=re.M):
        color = re.search(r"\bcolor (\d+)", attributes)
        kind = "parameters" if re.search(r"\bparameter \d+", attributes) else "temp"
        out[int(color.group(1)) if color else 0][kind] += int(size)
    return dict(out)


def format_allocations(allocated: dict) -> str:
    gib = float(1 << 30)
    return "; ".join(f"memory space {color}: {(a['parameters'] + a['temp']) / gib:.2f} GiB allocated "
                     f"(parameters {a['parameters'] / gib:.2f} + temp {a['temp'] / gib:.2f})"
                     for color, a in sorted(allocated.items()) if a["parameters"] + a["temp"] >= 1 << 20)


def format_peak(peak: dict, top: int = 25) -> str:
    gib = float(1 << 30)
    lines = [f"live at the peak (schedule position {peak['position']}): {peak['total'] / gib:.2f} GiB"]
    for shape, count, size in peak["groups"][:top]:
        lines.append(f"  {size / gib:7.2f} GiB  {count:5d} x {shape}")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump_dir")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--module", default="step_fn")
    a = p.parse_args()
    print(format_allocations(allocations(a.dump_dir, a.module)))
    print(format_peak(peak_buffers(a.dump_dir, a.module), a.top))
