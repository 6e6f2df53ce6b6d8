"""Test-wide setup: 8 fake CPU devices (set before jax is imported) so sharding is tested here."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
