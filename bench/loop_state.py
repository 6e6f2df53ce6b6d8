"""What a compiled program's largest loop carries in: the initial state of the while loop with the most
carried arrays (the microbatch scan in a train step), grouped by dtype and by the instruction that makes
each array.

    .venv/bin/python bench/loop_state.py DUMP_DIR [--module step_fn]

DUMP_DIR is an XLA dump (XLA_FLAGS="--xla_dump_to=DUMP_DIR --xla_dump_hlo_as_text"). A loop-invariant
value that XLA computes before the loop (a `convert` of a weight to bf16, a layout `copy`) is held for the
whole loop; arguments passed through (`parameter`, `get-tuple-element` of the entry tuple) are not extra
memory. bench/RESULTS.md (sessions 11 and 12) used it on the uncached TPU step.
"""

import argparse
import collections
import glob
import os
import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_DEF = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def _nbytes(dtype: str, dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n * _BYTES.get(dtype, 4)


def loop_state(dump_dir: str, module: str = "step_fn") -> dict:
    """{"loop": name, "arrays": count, "total": bytes, "groups": [((dtype, producer), count, bytes)]
    largest first} for the last optimized module whose name contains `module`."""
    files = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations.txt")))
    if not files:
        raise FileNotFoundError(f"no *{module}*after_optimizations.txt in {dump_dir}: dump with "
                                "XLA_FLAGS='--xla_dump_to=DIR --xla_dump_hlo_as_text'")
    with open(files[-1]) as f:
        defs = {m.group(1): m.group(2) for m in map(_DEF.match, f) if m}
    loops = []
    for name, rhs in defs.items():
        m = re.match(r"\((.*)\) while\(%?([\w.\-]+)\)", rhs)
        if m:
            loops.append((len(_ARRAY.findall(m.group(1))), name, m.group(2)))
    if not loops:
        raise ValueError(f"{files[-1]} has no while loop")
    count, name, init = max(loops)
    tuple_ops = re.search(r"tuple\((.*)\)", defs[init])
    if tuple_ops is None:
        raise ValueError(f"the initial state {init} of {name} is not a tuple instruction")
    groups, total = collections.defaultdict(lambda: [0, 0]), 0
    for operand in tuple_ops.group(1).split(","):
        operand = re.sub(r"/\*.*?\*/", "", operand).strip()  # long operand lists carry /*index=N*/
        producer = defs.get(operand.split(" ")[-1].lstrip("%"), "")
        m = re.match(r"(\w+)\[([\d,]*)\]\S* ([\w\-]+)\(", producer)
        if m is None:  # a tuple-shaped operand (nested state): counted as one group, size not parsed
            groups[("tuple", "?")][0] += 1
            continue
        dtype, dims, op = m.groups()
        size = _nbytes(dtype, dims)
        groups[(dtype, op)][0] += 1
        groups[(dtype, op)][1] += size
        total += size
    ordered = sorted(((k, c, b) for k, (c, b) in groups.items()), key=lambda g: -g[2])
    return {"loop": name, "arrays": count, "total": total, "groups": ordered}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump_dir")
    p.add_argument("--module", default="step_fn")
    args = p.parse_args()
    state = loop_state(args.dump_dir, args.module)
    total = state["total"] / 2**20
    print(f"{state['loop']}: {state['arrays']} carried arrays, {total:.2f} MiB initial state")
    for (dtype, op), count, nbytes in state["groups"]:
        print(f"  {dtype:>5} from {op:<18} {count:5d} arrays {nbytes / 2**20:10.2f} MiB")


if __name__ == "__main__":
    main()
