"""sdxl_jax.data.buckets: the paper's table, the generator, nearest-log-aspect assignment."""

import math

import ml_collections as mlc
import pytest

from configs import common
from sdxl_jax.data import buckets

# Copied from SPEC.md "Multi-aspect buckets (paper App. I)", in its order, as (height, width).
SPEC_TABLE = """
(512,2048) (512,1984) (512,1920) (512,1856) (576,1792) (576,1728) (576,1664) (640,1600) (640,1536)
(704,1472) (704,1408) (704,1344) (768,1344) (768,1280) (832,1216) (832,1152) (896,1152) (896,1088)
(960,1088) (960,1024) (1024,1024) (1024,960) (1088,960) (1088,896) (1152,896) (1152,832) (1216,832)
(1280,768) (1344,768) (1408,704) (1472,704) (1536,640) (1600,640) (1664,576) (1728,576) (1792,576)
(1856,512) (1920,512) (1984,512) (2048,512)
"""


def _spec_table():
    return tuple(tuple(int(x) for x in item.strip("()").split(",")) for item in SPEC_TABLE.split())


def _config(**kw):
    c = common.data()
    c.update(kw)
    return c


def test_sdxl_table_equals_spec_and_configs():
    spec = _spec_table()
    assert len(spec) == 40
    assert buckets.SDXL_BUCKETS == spec
    assert tuple(common.SDXL_BUCKETS) == spec
    assert buckets.from_config(_config(buckets="sdxl")) == spec


def test_square_and_unknown_kind():
    assert buckets.from_config(_config(buckets="square", resolution=512)) == ((512, 512),)
    with pytest.raises(ValueError, match="unknown data.buckets"):
        buckets.from_config(_config(buckets="squares"))


def test_generated_buckets_at_1024_are_paper_buckets():
    gen = buckets.from_config(_config(buckets="generated", resolution=1024, bucket_min_side=512))
    assert len(gen) == 33 and set(gen) <= set(buckets.SDXL_BUCKETS)
    assert all(h * w <= 1024**2 and h % 64 == 0 and w % 64 == 0 for h, w in gen)
    assert all((w, h) in gen for h, w in gen)  # both orientations
    ratios = [h / w for h, w in gen]
    assert ratios == sorted(ratios)


def test_generated_other_resolution_and_bad_settings():
    gen = buckets.generate(512, side_step=32, min_side=256, max_side=1024)
    assert (512, 512) in gen and (256, 1024) in gen and (1024, 256) in gen
    assert all(h * w <= 512**2 and 256 <= min(h, w) and max(h, w) <= 1024 for h, w in gen)
    with pytest.raises(ValueError, match="bucket_min_side"):
        buckets.generate(256, 64, 1024, 2048)
    with pytest.raises(ValueError, match="side_step"):
        buckets.generate(256, 0, 64, 2048)


def test_assign_by_nearest_log_aspect():
    table = buckets.SDXL_BUCKETS
    assert table[buckets.assign(1200, 1600, table)] == (896, 1152)  # 4:3 landscape
    assert table[buckets.assign(1600, 1200, table)] == (1152, 896)
    assert table[buckets.assign(777, 777, table)] == (1024, 1024)
    assert table[buckets.assign(100, 1000, table)] == (512, 2048)  # beyond the table: the extreme bucket
    for h, w in [(300, 500), (1080, 1920), (4000, 3000)]:
        b = buckets.assign(h, w, table)
        best = min(abs(math.log(h / w) - math.log(bh / bw)) for bh, bw in table)
        assert abs(math.log(h / w) - math.log(table[b][0] / table[b][1])) == best
    many = buckets.assign_many([1200, 1600, 777], [1600, 1200, 777], table)
    assert [table[i] for i in many] == [(896, 1152), (1152, 896), (1024, 1024)]


def test_config_is_a_configdict_with_bucket_keys():
    c = _config()
    assert isinstance(c, mlc.ConfigDict) and c.buckets in buckets.KINDS
