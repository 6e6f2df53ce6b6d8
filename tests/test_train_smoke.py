"""Each stage config's `:smoke` variant through the real command line (`python train.py ...`), on one CPU
device: tiny models, shapes data, 4 steps, checkpoints, metrics.jsonl, TensorBoard and preview PNGs.

Slow (each run compiles its own programs, ~1-3 min of CPU): `pytest -m slow tests/test_train_smoke.py`.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def _train(config, workdir, cache_dir, *overrides):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/{config}:smoke",
           f"--workdir={workdir}", f"--config.compilation_cache_dir={cache_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _check_workdir(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in records)  # finite, sane
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) >= ["2", "4"]
    assert [f for f in os.listdir(os.path.join(workdir, "samples")) if f.endswith(".png")]
    assert os.listdir(os.path.join(workdir, "tensorboard"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["stage1_256.py", "stage3_multiaspect.py", "refiner.py"])
def test_smoke_run(config, tmp_path, cache_dir):
    out = _train(config, str(tmp_path), cache_dir)
    assert "compiled train step" in out and "TFLOPs per device" in out
    _check_workdir(str(tmp_path))


@pytest.mark.slow
def test_stage2_smoke_from_stage1(tmp_path, cache_dir):
    stage1, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    _train("stage1_256.py", stage1, cache_dir)
    out = _train("stage2_512.py", stage2, cache_dir, f"--config.init_from={stage1}")
    assert f"initialised params and EMA from {stage1} step 4" in out
    _check_workdir(stage2)
