"""A compiled GPU or TPU program's step time as the chip's roofline gives it: each kernel of the optimized
HLO takes max(its FLOPs / the chip's peak FLOP/s, its bytes / the chip's memory bandwidth), and the kernels
run one after another. The sum estimates the step time, and the model's FLOPs over it the MFU, from an
ahead-of-time compile without the chip (or from a run on one).

    XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*" \\
    JAX_PLATFORMS=cpu python bench/train_step.py --compile_only --topology=gpu:h100 ... --out=R.jsonl
    python bench/roofline.py DIR --spec=bench/gpu_specs/h100.txtpb --bench_json=R.jsonl
    python bench/roofline.py DIR --platform=tpu --peak_flops=197e12 --bandwidth=819e9 ...   # a TPU v5e
    (or bench/train_step.py ... --roofline=25, which dumps, reads and reports in one go)

What a kernel costs here:
- FLOPs: 2 per multiply-add of every dot and convolution, in fusions (Triton GEMMs) and in cuBLAS and
  cuDNN calls; a cuDNN attention call 2 per multiply-add of its products, two in the forward (S = QK^T,
  O = PV) and five in the backward (S again, dP, dV, dQ, dK). Elementwise work is not counted: next to its
  bytes it is never the bound. XLA:TPU writes batched dots and windowed collective matmuls as
  convolutions whose windows span the batch; only their taps that meet data count (_hlo_conv_flops).
  Splash attention's Pallas kernels count their products too (forward 2, dkv 4, dq 3, the fused backward
  5: _splash_flops).
- Grid steps: a Pallas kernel runs as a loop over its grid, one block per step, and each step has a fixed
  cost beyond its work (issuing the next block's DMAs, waiting on them). For splash kernels the steps are
  counted (batch x heads x query blocks x key blocks: _splash_grid_steps) and reported; `grid_step_s`
  charges each that many seconds on top of the kernel's roofline time (default 0: not charged; no TPU has
  measured it here).
- Bytes: every operand read once and every result written once, except that an operand a fusion only
  slices counts as its slices, and a buffer updated in place by a dynamic-update-slice (a scan's stacked
  output) counts as the update written; a fusion that XLA:GPU runs on another stream (async-start, as it
  runs a scan's stacking and slicing) costs the fusion's own. A custom call's workspace is not counted.
  Only device memory (HBM) counts: on a TPU an operand or result in VMEM (layout S(1)) is free, and the
  DMA that stages it there (copy-start, async slices: kind "async copy") costs its bytes.
- Loops: a while body counts its trip count times: XLA:GPU states it, for XLA:TPU it is read from the
  condition (`counter < N`, the counter's start and step: trip_count).
- Collectives (fsdp's all-gathers and reduce-scatters) are listed with the bytes they send but add no
  time: they use the links between chips, and XLA's scheduler overlaps them with compute. The summary
  gives what each chip sends a step (ring algorithms: an all-gather its shard n - 1 times).

Why it is an estimate, not a bound: reads served from L2 (50 MB on an H100; a UNet activation at 1024^2
and batch 1 is 2.6 to 10.5 MB in bf16) are faster than the memory bandwidth, which makes small
memory-bound kernels faster than this; each kernel's launch and ramp (a few microseconds; see the count of
small kernels) and kernels that reach less than peak make them slower. On a TPU the DMAs run beside the
kernels, so the sum is the upper of two estimates; `overlapped_s`, max(all FLOPs / peak, all HBM bytes /
bandwidth), every kernel and DMA overlapped, is the lower. It ranks where the time goes (GEMMs,
convolutions, attention, memory-bound fusions, layout copies, by model part and by the jax op behind each
kernel); a measured step time is the figure to hold it against (the GPU suite's; no TPU has measured one).
"""

import argparse
import collections
import glob
import json
import os
import re
import sys

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
# dtype[dims] and the layout after it, whose S(n) names a memory space other than the device memory (TPU:
# S(1) VMEM, the core's scratchpad; scalars and semaphores in others): only arrays without one are in HBM.
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\](\{[^}]*\})?")
_SPACE = re.compile(r"S\((\d+)\)")
_INSTR = re.compile(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)")
_HEADER = re.compile(r"(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
# Instructions that launch no kernel and move no bytes of their own.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency", "domain"}
_OPENERS = {"(": ")", "{": "}", "[": "]"}


def _closing(text: str, start: int) -> int:
    """The index just past the bracket that closes text[start]; quoted strings are skipped."""
    stack, i = [], start
    while i < len(text):
        c = text[i]
        if c == '"':
            i = text.index('"', i + 1)
            while text[i - 1] == "\\":
                i = text.index('"', i + 1)
        elif c in _OPENERS:
            stack.append(_OPENERS[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    raise ValueError(f"no closing bracket: {text[start:start + 80]}")


def _arrays(shape: str) -> list:
    """[(dtype, dims, memory space)] of a shape; memory space 0 is the device memory."""
    out = []
    for t, dims, layout in _ARRAY.findall(shape):
        space = _SPACE.search(layout)
        out.append((t, [int(d) for d in dims.split(",") if d], int(space.group(1)) if space else 0))
    return out


def _count(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _nbytes(arrays, space: int | None = 0) -> int:
    """Bytes of the arrays in memory space `space` (None: in any)."""
    return sum(_count(d) * _BYTES.get(t, 4) for t, d, sp in arrays or () if space is None or sp == space)


class Instr:
    """One HLO instruction: its result arrays, opcode, operand names and the attribute text after them."""

    __slots__ = ("name", "arrays", "op", "operands", "attrs", "root", "index")

    def __init__(self, name, shape, op, operands, attrs, root, index):
        self.name, self.op, self.operands, self.attrs, self.root, self.index = (
            name, op, operands, attrs, root, index)
        self.arrays = _arrays(shape)

    def attr(self, key: str) -> str | None:
        m = re.search(rf"(?:^|[\s,]){re.escape(key)}=", self.attrs)
        if m is None:
            return None
        i = m.end()
        if self.attrs[i] in "{[(":
            return self.attrs[i:_closing(self.attrs, i)]
        if self.attrs[i] == '"':
            return self.attrs[i + 1:self.attrs.index('"', i + 1)]
        return re.match(r"[^,\s]*", self.attrs[i:]).group(0)


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if m is None:
        return None
    root, name, rest = m.groups()
    end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
    if end < 0:
        return None
    shape, rest = rest[:end], rest[end:].lstrip()
    om = re.match(r"([\w\-]+)\(", rest)
    if om is None:
        return None
    close = _closing(rest, om.end() - 1)
    inside = rest[om.end():close - 1]
    index = int(inside) if om.group(1) == "parameter" and inside.strip().isdigit() else None
    operands = re.findall(r"%([\w.\-]+(?:#\d+)?)", inside)  # name#k: element k of a tuple result
    if om.group(1) == "constant":  # its literal
        operands = [inside.strip()]
    elif not operands and om.group(1) != "parameter":  # operands printed without %
        operands = [t.strip().split(" ")[-1] for t in inside.split(",") if t.strip()]
    return Instr(name, shape, om.group(1), operands, rest[close:], bool(root), index)


def parse_module(text: str) -> tuple[dict, str]:
    """{computation name: [Instr, ...]} and the name of the entry computation."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h:
                current = h.group(2)
                comps[current] = []
                entry = current if h.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        ins = _parse_instr(line)
        if ins is not None:
            comps[current].append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the module")
    return comps, entry


def _shapes(comp: list) -> dict:
    """{operand name: [(dtype, dims)]}, with name#k for element k of a tuple-shaped result."""
    shapes = {}
    for ins in comp:
        shapes[ins.name] = ins.arrays
        if len(ins.arrays) > 1:
            for k, a in enumerate(ins.arrays):
                shapes[f"{ins.name}#{k}"] = [a]
    return shapes


def _dot_flops(ins: Instr, shapes: dict) -> int:
    lhs = shapes.get(ins.operands[0]) if ins.operands else None
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    if not lhs or not ins.arrays or contracting is None:
        return 0
    k = _count(lhs[0][1][int(d)] for d in contracting.group(1).split(",") if d)
    return 2 * _count(ins.arrays[0][1]) * k


def _gemm_call_flops(ins: Instr, shapes: dict) -> int:
    """A cuBLAS(Lt) custom call: its dot dimensions are in backend_config."""
    lhs = shapes.get(ins.operands[0]) if ins.operands else None
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
    if not lhs or not ins.arrays or m is None:
        return 0
    dims = [int(d.strip().strip('"')) for d in m.group(1).split(",") if d.strip()]
    return 2 * _count(ins.arrays[0][1]) * _count(lhs[0][1][d] for d in dims)


def _conv_flops(kind: str, ins: Instr, shapes: dict) -> int:
    """2 x |forward output| x |kernel| / output features: the forward convolution and both of its backward
    ones (kind: forward, input (the data gradient) or filter) do the same multiply-adds."""
    labels = ins.attr("dim_labels")
    operands = [shapes.get(o) for o in ins.operands[:2]]
    if labels is None or len(operands) < 2 or not all(operands) or not ins.arrays:
        return 0
    kernel_labels = re.split(r"_|->", labels)[1]
    result = ins.arrays[0][1]
    if kind == "filter":  # (x, dy) -> dk
        fwd_out, kernel = operands[1][0][1], result
    elif kind == "input":  # (dy, k) -> dx
        fwd_out, kernel = operands[0][0][1], operands[1][0][1]
    else:  # (x, k) -> y
        fwd_out, kernel = result, operands[1][0][1]
    cout = kernel[kernel_labels.index("o")] if "o" in kernel_labels else 1
    return 2 * _count(fwd_out) * _count(kernel) // max(cout, 1)


def _hlo_conv_flops(ins: Instr, shapes: dict) -> int:
    """An HLO convolution (XLA:TPU's and XLA:CPU's; XLA:GPU calls cuDNN instead): 2 x |output| x |kernel| /
    output features, as _conv_flops, except along a window dimension wider than its input or over a
    dilated input: there only the taps that meet data count. XLA:TPU writes batched dots and windowed
    collective matmuls as such convolutions (the window spans the batch with lhs dilation, or a padded
    input of 1), where one tap in each window meets data."""
    labels = ins.attr("dim_labels")
    operands = [shapes.get(o) for o in ins.operands[:2]]
    if labels is None or len(operands) < 2 or not all(operands) or not ins.arrays:
        return 0
    lhs_l, rhs_l, out_l = re.split(r"_|->", labels)
    lhs, rhs, out = operands[0][0][1], operands[1][0][1], ins.arrays[0][1]
    window = ins.attr("window") or ""

    def field(name):
        m = re.search(rf"\b{name}=([\d_x]+)", window)
        return m.group(1).split("x") if m else None

    spatial = sorted(c for c in out_l if c.isdigit())
    sizes, strides = field("size"), field("stride")
    pads, lhs_dil, rhs_dil = field("pad"), field("lhs_dilate"), field("rhs_dilate")
    pairs, positions = 1, 1
    for k, d in enumerate(spatial):
        n, m = lhs[lhs_l.index(d)], out[out_l.index(d)]
        w = int(sizes[k]) if sizes else rhs[rhs_l.index(d)]
        st = int(strides[k]) if strides else 1
        lo = int(pads[k].split("_")[0]) if pads else 0
        dl = int(lhs_dil[k]) if lhs_dil else 1
        dr = int(rhs_dil[k]) if rhs_dil else 1
        extent = (n - 1) * dl
        if dl == 1 and n >= w:  # an image's border taps count, as in every convolution FLOP count
            pairs *= m * w
        else:
            pairs *= sum(1 for o in range(m) for t in range(w)
                         if 0 <= o * st + t * dr - lo <= extent and (o * st + t * dr - lo) % dl == 0)
        positions *= m
    return 2 * (_count(out) // max(positions, 1)) * pairs * rhs[rhs_l.index("i")]


def _fmha_flops(ins: Instr, shapes: dict) -> int:
    """A cuDNN attention call: 2 x |S| x head_dim per product, with S = [batch, heads, seq_q, seq_k] from its
    backend_config and head_dim = |q| / (batch x heads x seq_q); the forward has two products (S = QK^T,
    O = PV), the backward five (S again, dP, dV, dQ, dK)."""
    s = re.search(r'"intermediate_tensor_shape":\{"dimensions":\[([^\]]*)\]', ins.attrs)
    q = shapes.get(ins.operands[0]) if ins.operands else None
    if s is None or not q:
        return 0
    b, h, sq, sk = (int(d.strip().strip('"')) for d in s.group(1).split(","))
    head_dim = _count(q[0][1]) // (b * h * sq)
    return 2 * b * h * sq * sk * head_dim * (5 if "Backward" in (ins.attr("custom_call_target") or "") else 2)


def custom_call_flops(ins: Instr, shapes: dict) -> int:
    target = ins.attr("custom_call_target") or ""
    if "gemm" in target.lower() or "matmul" in target.lower():
        return _gemm_call_flops(ins, shapes)
    if target.startswith("__cudnn$conv"):
        kind = "filter" if "BackwardFilter" in target else "input" if "BackwardInput" in target else "forward"
        return _conv_flops(kind, ins, shapes)
    if "fmha" in target.lower() or "flash" in target.lower():
        return _fmha_flops(ins, shapes)
    if target == "tpu_custom_call" and _splash_kernel(ins):
        return _splash_flops(ins, shapes)
    return 0


# Products of L x S x head_dim per splash kernel (its instruction is named after it): the forward S = QK^T
# and O = PV; dkv recomputes S and computes dP, dV and dK; dq recomputes S and dP and computes dQ. The fused
# backward (BlockSizes.use_fused_bwd_kernel) is a dkv kernel that also computes dQ, per key block: it
# returns those unreduced, a 5-D (batch, key blocks, heads, L, head_dim) result.
_SPLASH_PRODUCTS = {"fwd": 2, "dkv": 4, "dq": 3}


def _splash_kernel(ins: Instr) -> str | None:
    """fwd, dkv or dq for a splash attention kernel (XLA:TPU names its instruction after it), else None."""
    if not ins.name.startswith("splash_mha_"):
        return None
    return ins.name.removeprefix("splash_mha_").split("_")[0]


def _splash_flops(ins: Instr, shapes: dict) -> int:
    """A Pallas splash attention kernel (XLA:TPU, jax.experimental.pallas.ops.tpu.splash_attention): 2 x
    batch x heads x L x S x head_dim per product, from its 4-D (batch, heads, length, head_dim) operands
    and results, the queries taken as the longer sequence (SDXL's image tokens; S the text's in
    cross-attention)."""
    kernel = _splash_kernel(ins)
    seqs = _splash_sequences(ins, shapes)
    if kernel not in _SPLASH_PRODUCTS or not seqs:
        return 0
    b, h, _, d = seqs[0]
    lengths = [x[2] for x in seqs if (x[0], x[1], x[3]) == (b, h, d)]
    products = _SPLASH_PRODUCTS[kernel] + (kernel == "dkv" and any(len(a[1]) == 5 for a in ins.arrays))
    return 2 * products * b * h * max(lengths) * min(lengths) * d


def _splash_sequences(ins: Instr, shapes: dict) -> list:
    """The dims of a splash kernel's 4-D (batch, heads, length, head_dim) float operands and results."""
    arrays = [a for o in ins.operands for a in shapes.get(o) or ()] + list(ins.arrays)
    return [a[1] for a in arrays if len(a[1]) == 4 and a[0] in ("bf16", "f16", "f32")]


def _splash_grid_steps(ins: Instr, shapes: dict) -> int:
    """How many grid steps a splash kernel runs: batch x heads (its 4-D operands and results) x the blocks
    of its block mask, the s8[masks, blocks, blocks] operand the kernel reads first; 0 for other
    instructions."""
    if _splash_kernel(ins) not in _SPLASH_PRODUCTS:
        return 0
    mask = re.search(r"s8\[(\d+),(\d+),(\d+)\]", ins.attr("operand_layout_constraints") or "")
    seqs = _splash_sequences(ins, shapes)
    if mask is None or not seqs:
        return 0
    return seqs[0][0] * seqs[0][1] * int(mask.group(2)) * int(mask.group(3))


def _computation_flops(comp: list, comps: dict, shapes: dict | None = None) -> int:
    """The FLOPs of the dots, convolutions and library calls in `comp` (and in the fusions nested in it);
    `shapes` names the operands where they are not in `comp`."""
    shapes = _shapes(comp) if shapes is None else shapes
    total = 0
    for ins in comp:
        if ins.op == "dot":
            total += _dot_flops(ins, shapes)
        elif ins.op == "convolution":
            total += _hlo_conv_flops(ins, shapes)
        elif ins.op == "custom-call":
            total += custom_call_flops(ins, shapes)
        elif ins.op in ("fusion", "call"):
            called = (ins.attr("calls") or ins.attr("to_apply") or "").lstrip("%")
            total += _computation_flops(comps.get(called, []), comps)
    return total


def _fusion_bytes(ins: Instr, comps: dict, shapes: dict) -> int:
    """What one fusion reads and writes: an operand it only slices counts as the slices; an operand updated
    in place by a dynamic-update-slice at the root is not read, and only the update is written."""
    body = comps.get((ins.attr("calls") or "").lstrip("%"))
    if body is None:
        return sum(_nbytes(shapes.get(o)) for o in ins.operands) + _nbytes(ins.arrays)
    by_name = {b.name: b for b in body}
    params = {b.name: b.index for b in body if b.op == "parameter"}
    users = collections.defaultdict(list)
    for b in body:
        for o in b.operands:
            users[o].append(b)
    root = next((b for b in body if b.root), None)
    outputs = [root] if root is not None else []
    if root is not None and root.op == "tuple":
        outputs = [by_name[o] for o in root.operands if o in by_name]
    # where each output lives: the fusion's own result arrays (a TPU fusion may write to VMEM)
    spaces = [a[2] for a in ins.arrays] if len(ins.arrays) == len(outputs) else [0] * len(outputs)
    written, in_place = 0, set()
    for out, space in zip(outputs, spaces, strict=True):
        if space:
            continue
        if out.op == "dynamic-update-slice" and out.operands and out.operands[0] in params:
            in_place.add(out.operands[0])
            written += _nbytes(by_name[out.operands[1]].arrays, None) if out.operands[1] in by_name else 0
        else:
            written += _nbytes(out.arrays, None)
    read = 0
    for name, index in params.items():
        if name in in_place or index is None or index >= len(ins.operands):
            continue
        full = _nbytes(shapes.get(ins.operands[index]))
        us = users.get(name, [])
        if us and all(u.op in ("slice", "dynamic-slice") and u.operands[0] == name for u in us):
            read += min(full, sum(_nbytes(u.arrays, None) for u in us))
        else:
            read += full
    return read + written


_SCRATCH = ("u8", "s8")  # a custom call's last result of this type is its workspace, not data


def _kind(ins: Instr, flops: int) -> str:
    if ins.op == "custom-call":
        target = ins.attr("custom_call_target") or ""
        if "fmha" in target or _splash_kernel(ins):
            return "attention"
        if target.startswith("__cudnn$conv"):
            return "convolution"
        return "gemm" if flops else "custom-call"
    if ins.op == "fusion":
        if flops:
            return "convolution" if "conv" in (ins.attr("calls") or "") else "gemm"
        kind = ins.attr("kind") or ""
        return "fusion (reduction)" if kind == "kInput" else "fusion"
    if ins.op in ("copy", "transpose"):
        return "layout copy"
    return ins.op


def _source(ins: Instr) -> str:
    """The jax op behind a kernel, with block and layer numbers folded: .../attn1/dot_general."""
    m = re.search(r'op_name="([^"]*)"', ins.attrs)
    if m is None and _splash_kernel(ins):  # XLA:TPU keeps no jax op for Pallas kernels
        return f"splash attention ({_splash_kernel(ins)})"
    if m is None:
        return "(no metadata)"
    name = m.group(1)
    backward = "transpose(" in name
    name = re.sub(r"^jit\([^)]*\)/", "", name)
    wrapper = re.compile(r"\b(jvp|transpose|checkpoint|remat|vmap|pjit|cond|branch_\d+_fun)\(([^()]*)\)")
    while wrapper.search(name):  # transpose(jvp(UNet)) -> UNet
        name = wrapper.sub(r"\2", name)
    name = re.sub(r"_\d+\b", "_*", name)
    # outside the model: the optimizer, the EMA and the non-finite select, which XLA fuses per leaf (the
    # select at the fusion's root, so that such a kernel's op is select_n)
    return ("bwd " if backward else "fwd " if "UNet" in name else "step ") + name


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# XLA:TPU's markers around its own collectives and buffers: no kernel, no bytes of their own.
_FREE_TARGETS = ("AsyncCollectiveStart", "AsyncCollectiveDone", "ConcatBitcast", "AllocateBuffer",
                 "AssumeGatherIndicesInBound")


def _collective(ins: Instr, comps: dict) -> Instr | None:
    """The collective an instruction runs (itself, or the one inside an async wrapper: XLA:GPU's
    async-start, XLA:TPU's fusion whose root is AsyncCollectiveStart), or None."""
    if ins.op.startswith(_COLLECTIVES):
        return ins
    if ins.op not in ("async-start", "fusion"):
        return None
    called = comps.get((ins.attr("calls") or "").lstrip("%"), [])
    if ins.op == "fusion":
        root = next((i for i in called if i.root), None)
        target = root.attr("custom_call_target") if root is not None and root.op == "custom-call" else None
        if target != "AsyncCollectiveStart":
            return None
    return next((i for i in called if i.op.startswith(_COLLECTIVES)), None)


def _async_done(ins: Instr, comps: dict) -> bool:
    """XLA:TPU's fusion that waits for a collective (its root AsyncCollectiveDone): no work of its own."""
    if ins.op != "fusion":
        return False
    called = comps.get((ins.attr("calls") or "").lstrip("%"), [])
    root = next((i for i in called if i.root), None)
    return root is not None and root.op == "custom-call" and \
        root.attr("custom_call_target") == "AsyncCollectiveDone"


def _group_size(collective: Instr) -> int:
    """The chips in each of a collective's replica groups: {{0,1,..}}, the iota form [groups,size]<=[n], or
    XLA:TPU's mesh['axis_0'=8,'axis_1'=1] {'axis_0'} (the product of the named axes)."""
    groups = collective.attr("replica_groups") or ""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", collective.attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        n = 1
        for axis in re.findall(r"'([^']+)'", m.group(2)):
            n *= int(sizes.get(axis, 1))
        return n
    iota = re.match(r"\[(\d+),(\d+)\]<=", groups)
    if iota:
        return int(iota.group(2))
    first = re.search(r"\{([\d,]+)\}", groups)
    return len(first.group(1).split(",")) if first else 1


def _sent(collective: Instr, operand_bytes: int) -> float:
    """The bytes a collective sends from each chip, in the usual ring algorithms over its group of n: an
    all-gather its shard to n - 1 peers, a reduce-scatter or all-to-all (n - 1) / n of its operand, an
    all-reduce twice that, a collective-permute its operand."""
    op, n = collective.op, _group_size(collective)
    if op.startswith("all-gather"):
        return operand_bytes * (n - 1)
    if op.startswith(("reduce-scatter", "all-to-all")):
        return operand_bytes * (n - 1) / max(n, 1)
    if op.startswith("all-reduce"):
        return 2 * operand_bytes * (n - 1) / max(n, 1)
    return operand_bytes


def kernels(comps: dict, entry: str, peak_flops: float, bandwidth: float, branch: str = "dearest",
            grid_step_s: float = 0.0) -> list:
    """[{name, kind, source, flops, bytes, seconds, count}] for every kernel the program runs (a while loop's
    body counted its known trip count times). Collectives are listed with the bytes they send and 0 s: they
    use the links between chips, and XLA's scheduler overlaps them with compute. Of a conditional's branches
    the `branch` one ("dearest": an update, not a skipped step; "cheapest": the step that skips it). A
    splash kernel also gives its `grid_steps`, each charged `grid_step_s` on top of its roofline time."""
    if branch not in ("dearest", "cheapest"):
        raise ValueError(f"branch={branch!r}: dearest or cheapest")
    pick = max if branch == "dearest" else min
    out = []

    def walk(comp_name, times):
        comp = comps.get(comp_name, [])
        shapes = _shapes(comp)
        for ins in comp:
            if ins.op in _FREE or ins.op.endswith("-done"):
                continue
            collective = _collective(ins, comps)
            if collective is not None:  # on the chips' links, overlapped with compute: not summed
                nbytes = sum(_nbytes(shapes.get(o), None) for o in ins.operands)
                out.append({"name": ins.name, "kind": "collective", "source": _source(ins), "flops": 0,
                            "bytes": nbytes, "seconds": 0.0, "count": times,
                            "sent": _sent(collective, nbytes)})
                continue
            if _async_done(ins, comps):
                continue
            if ins.op == "while":
                walk((ins.attr("body") or "").lstrip("%"), times * trip_count(ins, comp, comps))
                continue
            if ins.op == "custom-call" and ins.attr("custom_call_target") in _FREE_TARGETS:
                continue
            vmem = [a for a in ins.arrays if a[2] == 1] if ins.op in ("copy-start", "async-start") else []
            if vmem:  # TPU: a DMA to or from VMEM, beside compute
                moved = max(_nbytes([a], 1) for a in vmem)
                source = _source(ins)
                out.append({"name": ins.name, "kind": "async copy", "flops": 0,
                            "source": _DMA if source == "(no metadata)" else source,
                            "bytes": moved, "seconds": moved / bandwidth, "count": times})
                continue
            if ins.op == "call":
                walk((ins.attr("to_apply") or "").lstrip("%"), times)
                continue
            if ins.op == "async-start":  # XLA:GPU's fusion run on another stream: the fusion's own cost
                walk((ins.attr("calls") or "").lstrip("%"), times)
                continue
            if ins.op == "conditional":
                # An index selects among branch_computations; a pred between true_ and false_computation.
                named = ins.attr("branch_computations") or " ".join(
                    ins.attr(f"{b}_computation") or "" for b in ("true", "false"))
                costs = []
                for b in re.findall(r"%?([\w.\-]+)", named):
                    inside = kernels(comps, b, peak_flops, bandwidth, branch, grid_step_s)
                    costs.append((sum(k["seconds"] * k["count"] for k in inside), b))
                if costs:
                    walk(pick(costs)[1], times)
                continue
            if ins.op == "fusion":
                flops = _computation_flops(comps.get((ins.attr("calls") or "").lstrip("%"), []), comps)
                nbytes = _fusion_bytes(ins, comps, shapes)
            else:
                flops = _computation_flops([ins], comps, shapes)  # a dot, convolution or library call
                results = list(ins.arrays)
                if ins.op == "custom-call" and len(results) > 1 and results[-1][0] in _SCRATCH:
                    results = results[:-1]
                nbytes = sum(_nbytes(shapes.get(o)) for o in ins.operands) + _nbytes(results)
            seconds = max(flops / peak_flops, nbytes / bandwidth)
            k = {"name": ins.name, "kind": _kind(ins, flops), "source": _source(ins), "flops": flops,
                 "bytes": nbytes, "seconds": seconds, "count": times}
            steps = _splash_grid_steps(ins, shapes) if ins.op == "custom-call" else 0
            if steps:
                k.update(grid_steps=steps, seconds=seconds + steps * grid_step_s)
            out.append(k)

    walk(entry, 1)
    return out


def trip_count(ins: Instr, comp: list, comps: dict) -> int:
    """How many times a while loop runs its body: XLA:GPU's known_trip_count, else read from a condition
    `counter < N` (or <=) over a tuple element, from its constant in the loop's input (0 where that is no
    constant) in the steps the body adds (XLA:TPU states no count); 1 where neither says."""
    trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    if trip:
        return int(trip.group(1))
    cond = comps.get((ins.attr("condition") or "").lstrip("%"), [])
    by_name = {c.name: c for c in cond}
    root = next((c for c in cond if c.root), None)
    if root is None or root.op != "compare" or len(root.operands) != 2:
        return 1
    direction = root.attr("direction")
    a, b = (by_name.get(o) for o in root.operands)
    if direction in ("GT", "GE"):  # N > counter
        a, b, direction = b, a, {"GT": "LT", "GE": "LE"}[direction]
    if direction not in ("LT", "LE") or a is None or b is None or a.op != "get-tuple-element" \
            or b.op != "constant":
        return 1
    limit = _constant(b)
    element = int(a.attr("index") or -1)
    start, here = 0, {c.name: c for c in comp}
    init = here.get(ins.operands[0]) if ins.operands else None
    if init is not None and init.op == "tuple" and 0 <= element < len(init.operands):
        first = here.get(init.operands[element])
        while first is not None and first.op in ("copy", "bitcast") and first.operands:  # XLA:TPU copies it
            first = here.get(first.operands[0])
        start = _constant(first) if first is not None and first.op == "constant" else 0
    if limit is None or start is None:
        return 1
    step = _loop_step(comps.get((ins.attr("body") or "").lstrip("%"), []), element)
    return max(1, -(-(limit - start + (direction == "LE")) // step))


def _loop_step(body: list, element: int) -> int:
    """What a while body adds to its counter (tuple element `element`) per iteration: XLA:TPU unrolls
    its windowed collective matmuls by two and counts in twos. 1 where the body does not say."""
    by_name = {b.name: b for b in body}
    root = next((b for b in body if b.root), None)
    if root is None or root.op != "tuple" or element >= len(root.operands):
        return 1
    add = _uncopied(by_name.get(root.operands[element]), by_name)
    if add is None or add.op != "add":
        return 1
    args = [_uncopied(by_name.get(o), by_name) for o in add.operands]
    counter = [a for a in args
               if a is not None and a.op == "get-tuple-element" and a.attr("index") == str(element)]
    steps = [_constant(a) for a in args if a is not None and a.op == "constant"]
    return steps[0] if counter and steps and steps[0] and steps[0] > 0 else 1


def _uncopied(ins: Instr | None, by_name: dict) -> Instr | None:
    """`ins`, or what it copies: XLA:TPU may copy a loop's counter into the scalar memory space (S(6)) to
    add to it, and the sum back out of it."""
    while ins is not None and ins.op in ("copy", "bitcast") and ins.operands:
        ins = by_name.get(ins.operands[0])
    return ins


def _constant(ins: Instr) -> int | None:
    """A scalar integer constant's value (parse_instr keeps its literal as the one operand)."""
    literal = ins.operands[0] if ins.operands else ""
    return int(literal) if re.fullmatch(r"-?\d+", literal) else None


# HBM bytes/s per TPU chip (its device_kind prefix); its peak FLOP/s is sdxl_jax.metrics.PEAK_FLOPS'.
TPU_BANDWIDTH = {"TPU v4": 1228e9, "TPU v5 lite": 819e9, "TPU v5e": 819e9, "TPU v5p": 2765e9,
                 "TPU v6 lite": 1640e9, "TPU v6e": 1640e9}


def read_spec(path: str) -> dict:
    """memory_bandwidth (bytes/s) and the rest of a GpuTargetConfig text proto's device numbers."""
    with open(path) as f:
        text = f.read()
    return {k: float(v) for k, v in re.findall(r"^\s*(\w+):\s*([\d.]+)\s*$", text, re.M)}


_DMA = "(DMA between HBM and VMEM)"  # XLA:TPU's memory-space assignment: operands staged beside compute


def _part(source: str) -> str:
    if source == _DMA:
        return "DMAs between HBM and VMEM (beside compute)"
    if source.startswith("splash attention"):
        return "model attention (splash kernels, forward and backward)"
    if source.startswith("bwd"):
        return "model backward"
    if "UNet" in source:
        return "model forward"
    return "outside the model (optimizer, EMA, accumulation, copies)"


def _groups(ks: list, key, peak_flops: float, bandwidth: float) -> list:
    groups = collections.defaultdict(lambda: {"kernels": 0, "seconds": 0.0, "flops": 0, "bytes": 0,
                                              "memory_bound_seconds": 0.0})
    for k in ks:
        g = groups[key(k)]
        g["kernels"] += k["count"]
        g["seconds"] += k["seconds"] * k["count"]
        g["flops"] += k["flops"] * k["count"]
        g["bytes"] += k["bytes"] * k["count"]
        if k["bytes"] / bandwidth > k["flops"] / peak_flops:
            g["memory_bound_seconds"] += k["seconds"] * k["count"]
    return sorted(({"name": name, **g} for name, g in groups.items()), key=lambda g: -g["seconds"])


def roofline(dump_dir: str, peak_flops: float, bandwidth: float, module: str = "step_fn",
             model_flops: float | None = None, small_s: float = 5e-6, platform: str = "",
             branch: str = "dearest", keep_kernels: bool = False, grid_step_s: float = 0.0) -> dict:
    """The estimate for the last optimized module in dump_dir whose name holds `module`: step_s (the sum of
    every kernel's max(FLOPs / peak_flops, bytes / bandwidth)), groups by part, kind and source, and, given
    the step's model FLOPs, mfu (model_flops / step_s / peak_flops). `platform` (gpu, cpu) picks that
    compiler's module where a dump holds several; `branch` which of a conditional's branches to count
    (kernels()); `keep_kernels`: the kernels themselves too, as kernel_list; `grid_step_s`: the fixed cost
    charged per Pallas grid step (kernels())."""
    # XLA:GPU names its dump <module>.<target>_gpu_after_optimizations.txt, XLA:TPU <module>.<fingerprint>.
    # after_optimizations.txt
    pattern = f"*{module}*.after_optimizations.txt" if platform == "tpu" else \
        f"*{module}*{platform}_after_optimizations.txt"
    files = sorted(glob.glob(os.path.join(dump_dir, pattern)))
    if not files:
        raise FileNotFoundError(f"no {pattern} in {dump_dir}: dump with "
                                "XLA_FLAGS='--xla_dump_to=DIR --xla_dump_hlo_as_text'")
    with open(files[-1]) as f:
        comps, entry = parse_module(f.read())
    ks = kernels(comps, entry, peak_flops, bandwidth, branch, grid_step_s)
    step_s = sum(k["seconds"] * k["count"] for k in ks)
    kernel_flops = sum(k["flops"] * k["count"] for k in ks)
    hbm_bytes = sum(k["bytes"] * k["count"] for k in ks if k["kind"] != "collective")
    result = {
        "module": os.path.basename(files[-1]),
        "peak_flops": peak_flops,
        "bandwidth": bandwidth,
        "kernels": sum(k["count"] for k in ks),
        "small_kernels": sum(k["count"] for k in ks if k["seconds"] < small_s),
        "small_s": small_s,
        "step_s": step_s,
        "kernel_flops": kernel_flops,
        "bytes": sum(k["bytes"] * k["count"] for k in ks),
        "memory_bound_s": sum(k["seconds"] * k["count"] for k in ks
                              if k["bytes"] / bandwidth > k["flops"] / peak_flops),
        # every kernel and DMA overlapped with every other: the step's lower estimate where, as on a TPU,
        # the compiler prefetches operands into VMEM while other kernels compute
        "overlapped_s": max(kernel_flops / peak_flops, hbm_bytes / bandwidth),
        "async_copy_s": sum(k["seconds"] * k["count"] for k in ks if k["kind"] == "async copy"),
        "collective_sent_bytes": sum(k.get("sent", 0) * k["count"] for k in ks),
        "grid_steps": sum(k.get("grid_steps", 0) * k["count"] for k in ks),
        "grid_step_s": grid_step_s,
        "by_part": _groups(ks, lambda k: _part(k["source"]), peak_flops, bandwidth),
        "by_kind": _groups(ks, lambda k: k["kind"], peak_flops, bandwidth),
        "by_source": _groups(ks, lambda k: k["source"], peak_flops, bandwidth),
    }
    if keep_kernels:
        result["kernel_list"] = ks
    if model_flops:
        result["model_flops"] = model_flops
        result["mfu"] = model_flops / step_s / peak_flops
    return result


def _op_key(name: str) -> str:
    """An instruction's name as a trace or a kernel name may spell it (fusion.3, fusion_3)."""
    return re.sub(r"[.\-]", "_", name)


def against_trace(ks: list, per_op: dict, steps: int) -> dict:
    """The estimate next to a measurement of the same program: `ks` from kernels(), `per_op` {HLO
    instruction name: [summed ns, events]} over `steps` traced steps (sdxl_jax.profiling.summarize).
    Per kind, part and source: estimated and measured seconds a step of the instructions both know;
    `unmatched_s`: measured time a step of ops the estimate does not list (e.g. copies it leaves out),
    `unmeasured_s`: estimated time of kernels the trace did not see; `kernels`: one row per instruction."""
    measured = {}
    for op, (ns, n) in per_op.items():
        m = measured.setdefault(_op_key(op), [0.0, 0])
        m[0] += ns / 1e9 / steps
        m[1] += n / steps
    rows, seen = {}, set()
    for k in ks:
        key = _op_key(k["name"])
        row = rows.setdefault(key, {"name": k["name"], "kind": k["kind"], "source": k["source"],
                                    "estimated_s": 0.0, "count": 0})
        row["estimated_s"] += k["seconds"] * k["count"]
        row["count"] += k["count"]
    for key, row in rows.items():
        if key in measured:
            seen.add(key)
            row["measured_s"], row["launches"] = measured[key]
    groups = {}
    for field, fn in (("by_kind", lambda r: r["kind"]), ("by_part", lambda r: _part(r["source"])),
                      ("by_source", lambda r: r["source"])):
        g = collections.defaultdict(lambda: {"estimated_s": 0.0, "measured_s": 0.0, "kernels": 0})
        for row in rows.values():
            if "measured_s" in row:
                t = g[fn(row)]
                t["estimated_s"] += row["estimated_s"]
                t["measured_s"] += row["measured_s"]
                t["kernels"] += row["count"]
        groups[field] = sorted(({"name": n, **t} for n, t in g.items()), key=lambda t: -t["measured_s"])
    matched = [r for r in rows.values() if "measured_s" in r]
    return {
        "steps": steps,
        "matched_estimated_s": sum(r["estimated_s"] for r in matched),
        "matched_measured_s": sum(r["measured_s"] for r in matched),
        "unmatched_s": sum(t for key, (t, _) in measured.items() if key not in seen),
        "unmatched_top": sorted(((t, key) for key, (t, _) in measured.items() if key not in seen),
                                reverse=True)[:5],
        "unmeasured_s": sum(r["estimated_s"] for r in rows.values() if "measured_s" not in r),
        **groups,
        "kernels": sorted(rows.values(), key=lambda r: -r.get("measured_s", 0.0)),
    }


def format_against_trace(a: dict, top: int = 15) -> str:
    ms = 1e3
    lines = [
        f"measured ({a['steps']} traced steps) against the estimate, per step: ops both know "
        f"{a['matched_measured_s'] * ms:.2f} ms measured, {a['matched_estimated_s'] * ms:.2f} ms estimated; "
        f"{a['unmatched_s'] * ms:.2f} ms measured in ops the estimate does not list, "
        f"{a['unmeasured_s'] * ms:.2f} ms estimated in kernels the trace did not see"
    ]
    for field in ("by_part", "by_kind", "by_source"):
        lines.append(f"\n{'measured ms':>11} {'estimated ms':>12} {'ratio':>6} {'kernels':>7}  {field[3:]}")
        for g in a[field][:top]:
            ratio = g["measured_s"] / g["estimated_s"] if g["estimated_s"] else float("nan")
            lines.append(f"{g['measured_s'] * ms:11.2f} {g['estimated_s'] * ms:12.2f} {ratio:6.2f} "
                         f"{g['kernels']:7d}  {g['name']}")
    return "\n".join(lines)


def write_kernels_tsv(a: dict, path: str) -> None:
    """One line per instruction: name, kind, source, estimated and measured microseconds a step, kernels
    the estimate counts and launches the trace saw a step."""
    with open(path, "w") as f:
        f.write("name\tkind\tsource\testimated_us\tmeasured_us\tcount\tlaunches\n")
        for r in a["kernels"]:
            measured = f"{r['measured_s'] * 1e6:.3f}" if "measured_s" in r else ""
            f.write(f"{r['name']}\t{r['kind']}\t{r['source']}\t{r['estimated_s'] * 1e6:.3f}\t{measured}\t"
                    f"{r['count']}\t{r.get('launches', '')}\n")


def trace_fields(path: str, steps: int, module: str = "", kernel_list: list | None = None,
                 tsv: str = "", prefix: str = "trace_", unit: str = "step") -> dict:
    """A kept trace of `steps` runs of a program (sdxl_jax.profiling.capture), for a bench's JSON line:
    its span, busy time, op time and ops per run; given the estimate's kernels (roofline(...,
    keep_kernels=True)["kernel_list"]), also the measured and estimated time of the instructions both know,
    the measured time in ops the estimate does not list and the estimated time in kernels the trace did not
    see, with kernels.tsv written to `tsv`. Prints both tables. Instruction names are unique within one
    program only: give the kernels of the program `module` names."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from sdxl_jax import profiling

    device, events = profiling.op_events(path, module)
    s = profiling.summarize(events, steps)
    out = {"file": path, "device": device, "span_s": round(s["span_s"], 6), "busy_s": round(s["busy_s"], 6),
           "op_time_s": round(s["op_time_s"], 6), "ops": round(s["ops"], 1)}  # fmt: skip
    print(profiling.format_summary(device, s, unit=unit), flush=True)
    if kernel_list:
        a = against_trace(kernel_list, s["per_op"], s["steps"])
        if tsv:
            write_kernels_tsv(a, tsv)
        out.update(matched_measured_s=round(a["matched_measured_s"], 6),
                   matched_estimated_s=round(a["matched_estimated_s"], 6),
                   unmatched_s=round(a["unmatched_s"], 6), unmeasured_s=round(a["unmeasured_s"], 6))
        print(format_against_trace(a), flush=True)
    return {prefix + k: v for k, v in out.items()}


def format_roofline(r: dict, top: int = 25) -> str:
    ms = 1e3
    lines = [
        f"{r['module']}: {r['kernels']} kernels ({r['small_kernels']} under {r['small_s'] * 1e6:g} us each), "
        f"{r['kernel_flops'] / 1e12:.2f} TFLOP in dots, convolutions and attention, "
        f"{r['bytes'] / 2**30:.1f} GiB moved",
        f"roofline step time {r['step_s'] * ms:.1f} ms at {r['peak_flops'] / 1e12:g} TFLOP/s and "
        f"{r['bandwidth'] / 1e12:g} TB/s ({r['memory_bound_s'] * ms:.1f} ms in memory-bound kernels)",
    ]
    if "mfu" in r:
        lines.append(f"model FLOPs {r['model_flops'] / 1e12:.2f} T: MFU {r['mfu']:.3f} at that step time")
    if r.get("async_copy_s"):
        mfu = f"; MFU {r['model_flops'] / r['overlapped_s'] / r['peak_flops']:.3f}" if "mfu" in r else ""
        lines.append(f"of which {r['async_copy_s'] * ms:.1f} ms DMAs between HBM and VMEM; with every kernel "
                     f"and DMA overlapped {r['overlapped_s'] * ms:.1f} ms{mfu}")
    if r.get("grid_steps"):
        steps_s = r["grid_steps"] * r["grid_step_s"]
        charged = (f"; at {r['grid_step_s'] * 1e6:g} us each, {steps_s * ms:.1f} ms in the step time"
                   if steps_s else " (not charged: --grid_step_us)")
        lines.append(f"Pallas kernels run {r['grid_steps']:,} grid steps a step{charged}")
    if r.get("collective_sent_bytes"):
        lines.append(f"collectives send {r['collective_sent_bytes'] / 2**30:.2f} GiB a step from each chip "
                     "(over the links between chips, overlapped with compute: not in the step time)")
    for field, n in (("by_part", top), ("by_kind", top), ("by_source", top)):
        lines.append(f"\n{'ms':>8} {'share':>6} {'kernels':>7} {'TFLOP':>7} {'GiB':>7} {'mem-bound ms':>12}  "
                     f"{field[3:]}")
        for g in r[field][:n]:
            lines.append(f"{g['seconds'] * ms:8.2f} {g['seconds'] / r['step_s']:6.1%} {g['kernels']:7d} "
                         f"{g['flops'] / 1e12:7.2f} {g['bytes'] / 2**30:7.2f} "
                         f"{g['memory_bound_seconds'] * ms:12.2f}  {g['name']}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump_dir")
    p.add_argument("--module", default="step_fn")
    p.add_argument("--platform", default="gpu",
                   help="the compiler whose module to read (gpu, tpu, cpu; '': any)")
    p.add_argument("--spec", default=os.path.join(os.path.dirname(__file__), "gpu_specs", "h100.txtpb"),
                   help="the chip's GpuTargetConfig (its memory_bandwidth)")
    p.add_argument("--peak_flops", type=float, default=989e12, help="dense bf16 FLOP/s (H100 / H200: 989e12; "
                   "TPU v5e: 197e12)")
    p.add_argument("--bandwidth", type=float, default=0.0,
                   help="memory bytes/s, instead of --spec's (TPU v5e: 819e9; TPU_BANDWIDTH)")
    p.add_argument("--bench_json", default="", help="bench/train_step.py's JSON line(s): the last one's "
                   "model_flops_per_device gives the MFU at the estimated step time")
    p.add_argument("--branch", default="dearest", choices=("dearest", "cheapest"),
                   help="which of a conditional's branches to count (e.g. ema.every > 1: the EMA's update or "
                   "the steps that skip it)")
    p.add_argument("--grid_step_us", type=float, default=0.0, help="a fixed cost charged per Pallas grid "
                   "step (splash attention's), on top of each kernel's roofline time")
    p.add_argument("--trace", default="", help="an XSpace of the same program (bench/train_step.py "
                   "--trace_steps): each kernel's measured time next to its estimate")
    p.add_argument("--trace_steps", type=int, default=2, help="how many steps the --trace holds")
    p.add_argument("--tsv", default="", help="with --trace: write one line per instruction here")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args()
    model_flops = None
    if args.bench_json:
        with open(args.bench_json) as f:
            model_flops = json.loads(f.read().strip().splitlines()[-1]).get("model_flops_per_device")
    bandwidth = args.bandwidth or read_spec(args.spec)["memory_bandwidth"]
    r = roofline(args.dump_dir, args.peak_flops, bandwidth, args.module, model_flops, platform=args.platform,
                 branch=args.branch, keep_kernels=bool(args.trace), grid_step_s=args.grid_step_us * 1e-6)
    ks = r.pop("kernel_list", None)
    print(json.dumps(r) if args.json else format_roofline(r, args.top))
    if args.trace:
        trace_fields(args.trace, args.trace_steps, args.module, ks, args.tsv)


if __name__ == "__main__":
    main()
