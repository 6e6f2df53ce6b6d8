"""Test-wide setup: 8 fake CPU devices (set before jax is imported) so sharding is tested here.

XLA:CPU's LLVM backend runs at optimisation level 0. The suite is compile-bound: the tiny models' train
steps still have the SDXL structure (hundreds of param leaves, each with its own fused kernels), and LLVM's
optimisation passes are a large part of their compile time. Measured on the 2-core host: the stage-1
smoke state's init compile 20.9 s -> 11.7 s, its train step's 35 s -> 27 s; the README test command
1073 s -> 686 s. It sets LLVM's level, not XLA's HLO passes: the smoke step's compiled memory figures
came out the same at both levels (temp 0.015 GiB per device), and every test passes at both.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def fake_gcs():
    """gs:// served from memory with GCS's object semantics (tests/fake_gcs.py); yields the filesystem."""
    import fake_gcs as lib

    yield lib.install()
    lib.uninstall()
