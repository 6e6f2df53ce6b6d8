"""Every config in configs/ loads, with each of its variants, through ml_collections config_flags."""

import glob
import importlib.util
import os

import ml_collections as mlc
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if os.path.basename(p) not in ("__init__.py", "common.py")
)


def _load_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parse(argv):
    fv = flags.FlagValues()
    # config_flags reads the --config.x=y overrides from sys.argv unless given sys_argv.
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, sys_argv=["prog", *argv])
    fv(["prog", *argv])
    return fv.config


def test_base_has_the_documented_top_level_keys():
    c = common.base()
    for key in ("seed", "total_steps", "checkpoint_every", "log_every", "sample_every", "init_from"):
        assert key in c
    assert "source" in c.data and "path" in c.data


def test_buckets_table_is_the_papers():
    assert len(common.SDXL_BUCKETS) == 40
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in common.SDXL_BUCKETS)
    assert common.SDXL_BUCKETS[0] == (512, 2048) and common.SDXL_BUCKETS[-1] == (2048, 512)
    assert (1024, 1024) in common.SDXL_BUCKETS


def test_parse_arg_rejects_unknown_arguments():
    assert common.parse_arg("smoke", smoke=False).smoke is True
    with pytest.raises(ValueError, match="unknown config argument"):
        common.parse_arg("smok", smoke=False)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_file_loads_with_every_variant(path):
    mod = _load_module(path)
    assert mod.__doc__ and "python" in mod.__doc__, "each config's docstring holds its launch command"
    for variant in getattr(mod, "VARIANTS", (None,)):
        arg = f":{variant}" if variant else ""
        config = _parse([f"--config={path}{arg}"])
        assert isinstance(config, mlc.ConfigDict)
        assert set(common.base().keys()) <= set(config.keys())


@pytest.mark.parametrize("path", CONFIG_FILES[:1], ids=os.path.basename)
def test_overrides_apply_and_unknown_keys_are_rejected(path):
    config = _parse([f"--config={path}", "--config.optim.lr=0.123", "--config.seed=7"])
    assert config.optim.lr == 0.123 and config.seed == 7
    with pytest.raises(Exception, match="lrr"):
        _parse([f"--config={path}", "--config.optim.lrr=1"])


def _get(name, arg=None):
    return _load_module(os.path.join(ROOT, "configs", f"{name}.py")).get_config(arg)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_variant_validates(path):
    from sdxl_jax import config_lib

    mod = _load_module(path)
    for variant in getattr(mod, "VARIANTS", (None,)):
        config = mod.get_config(variant)
        # the real stages target pods: validate them on a 256-device mesh; shapes-data configs on 8 CPUs.
        config_lib.validate(config, num_devices=8 if config.data.source == "shapes" else 256)
        if variant == "smoke":
            assert config.model.unet == "tiny" and config.data.source == "shapes" and config.total_steps <= 10
            assert config.data.buckets != "sdxl" and config.data.resolution <= 128  # CPU-sized images


def test_stage_hyper_parameters_follow_the_paper():
    s1, s2, s3, ref = (_get(n) for n in ("stage1_256", "stage2_512", "stage3_multiaspect", "refiner"))
    assert (s1.total_steps, s1.data.resolution, s1.data.batch_size) == (600_000, 256, 2048)
    assert (s2.total_steps, s2.data.resolution) == (200_000, 512)
    assert s3.data.buckets == "sdxl" and s3.diffusion.offset_noise == 0.05
    assert ref.model.unet == "sdxl_refiner" and ref.model.text == "sdxl_refiner"
    assert (ref.diffusion.min_index, ref.diffusion.max_index) == (0, 200)
    for c in (s1, s2, s3, ref):
        assert c.diffusion.parameterization == "eps" and c.diffusion.sigma_sampling == "discrete"
