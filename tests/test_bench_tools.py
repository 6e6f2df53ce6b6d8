"""bench/ helpers that reports rest on: the peak-buffer reader of XLA dumps (bench/peak_buffers.py)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from peak_buffers import format_peak, peak_buffers  # noqa: E402

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
