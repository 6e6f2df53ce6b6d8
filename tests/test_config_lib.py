"""Bad configs fail in config_lib.validate, before any model is built, with a message saying what to fix."""

import pytest

from configs import common
from sdxl_jax import config_lib


def _ok():
    c = common.base()
    c.data.batch_size = 16
    return c


def test_valid_config_passes():
    config_lib.validate(_ok(), num_devices=8)


def test_unknown_key_names_the_key_and_the_close_match():
    c = _ok()
    with c.unlocked():
        c.optim.learning_rate = 1e-4
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        config_lib.validate(c, num_devices=8)
    c = _ok()
    c.total_stepz = 5
    with pytest.raises(config_lib.ConfigError, match=r"'total_stepz'.*Did you mean 'total_steps'"):
        config_lib.validate(c, num_devices=8)


def test_batch_not_divisible_by_the_data_axes():
    c = _ok()
    c.data.batch_size = 12
    with pytest.raises(config_lib.ConfigError, match=r"batch_size=12 is not divisible by the 8 batch shards"):
        config_lib.validate(c, num_devices=8)
    c.mesh.update(data=-1, fsdp=4, tensor=2)  # 4 batch shards: 12 divides
    config_lib.validate(c, num_devices=8)
    with pytest.raises(config_lib.ConfigError, match="split evenly over 5 processes"):
        config_lib.validate(_ok(), num_devices=8, process_count=5)


def test_missing_init_from_path(tmp_path):
    c = _ok()
    c.init_from = str(tmp_path / "stage1_that_never_ran")
    with pytest.raises(config_lib.ConfigError, match=r"config.init_from=.*does not exist; point it at"):
        config_lib.validate(c, num_devices=8)


def test_bucket_paths_for_init_from(fake_gcs):
    """The documented stage-2 command passes --config.init_from=gs://BUCKET/sdxl/stage1: a workdir in a
    bucket is accepted (os.path.exists said it did not exist); official weights there are refused with
    the fix, before anything is built."""
    from etils import epath

    epath.Path("gs://bucket/sdxl/stage1/checkpoints/1000/_CHECKPOINT_METADATA").write_text("{}")
    epath.Path("gs://bucket/weights/sd_xl_base_1.0.safetensors").write_bytes(b"x")
    c = _ok()
    c.init_from = "gs://bucket/sdxl/stage1"
    config_lib.validate(c, num_devices=8)
    for path in ("gs://bucket/weights/sd_xl_base_1.0.safetensors", "gs://bucket/sdxl/stage1_that_never_ran"):
        c.init_from = path
        with pytest.raises(config_lib.ConfigError, match=r"not a training workdir.*copy them there \(gsutil"):
            config_lib.validate(c, num_devices=8)


def test_bad_choices_and_ranges():
    c = _ok()
    c.optim.schedule = "cosin"
    with pytest.raises(config_lib.ConfigError, match=r"config.optim.schedule='cosin' is not one of"):
        config_lib.validate(c, num_devices=8)
    c = _ok()
    c.diffusion.max_index = 1200
    with pytest.raises(config_lib.ConfigError, match="0 <= min < max <= 1000"):
        config_lib.validate(c, num_devices=8)
    c = _ok()
    c.ema.every = 0
    with pytest.raises(config_lib.ConfigError, match=r"config.ema.every=0 must be a positive integer"):
        config_lib.validate(c, num_devices=8)
    c = _ok()
    c.mesh.fsdp = 3
    with pytest.raises(config_lib.ConfigError, match="does not fit 8 devices"):
        config_lib.validate(c, num_devices=8)
    c = _ok()
    c.data.cover_scale = 0.5
    with pytest.raises(config_lib.ConfigError, match=r"cover_scale=0.5 must be >= 1"):
        config_lib.validate(c, num_devices=8)
    c = _ok()
    c.optim.mu_dtype = "float16"  # fp16's range cannot hold small moments: only fp32 or bf16
    with pytest.raises(config_lib.ConfigError, match=r"config.optim.mu_dtype='float16' is not one of"):
        config_lib.validate(c, num_devices=8)


def test_overrides_parse_as_the_key_type_and_name_a_wrong_key():
    c = _ok()
    config_lib.apply_overrides(c, ["optim.mu_dtype=bfloat16", "optim.lr=3e-5", "data.batch_size=32",
                                   "data.random_flip=False"])  # fmt: skip
    got = (c.optim.mu_dtype, c.optim.lr, c.data.batch_size, c.data.random_flip)
    assert got == ("bfloat16", 3e-5, 32, False)
    with pytest.raises(config_lib.ConfigError, match=r"config.optim.mu_dtyp is not a config key"):
        config_lib.apply_overrides(c, ["optim.mu_dtyp=bfloat16"])
    with pytest.raises(config_lib.ConfigError, match=r"write KEY=VALUE"):
        config_lib.apply_overrides(c, ["optim.lr"])


def test_json_round_trip():
    c = _ok()
    back = config_lib.from_json(config_lib.to_json(c))
    assert back.data.batch_size == 16 and list(back.sharding_rules[0][1]) == ["data", "fsdp"]


def test_model_choices_match_the_model_code():
    """config_lib stays import-light (no jax), so it lists the kernels and remat policies itself; they
    must be exactly the ones the models accept (the remat list once lacked dots_no_batch)."""
    from sdxl_jax.models import layers, unet

    assert set(config_lib.CHOICES["model.attention"]) == set(layers.ATTENTION_KERNELS)
    assert set(config_lib.CHOICES["model.remat"]) == set(unet.REMAT_POLICIES)
