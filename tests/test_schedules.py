import math

import pytest
from hydra.errors import ConfigCompositionException

from bitnet_train.config import ScheduleConfig, compose_config
from bitnet_train.schedules import two_stage_lr, two_stage_wd, validate

TOTAL = 1000


def cfg(**kw):
    base = dict(warmup_steps=100, lr_peak=1.5e-3, stage1_end_ratio=0.8, stage2_start=0.5,
                lr_stage2_peak=1e-3, final_ratio=0.0, wd=0.1)
    return ScheduleConfig(**{**base, **kw})


def test_linear_two_stage_lr_values():
    c = cfg(shape="linear")
    assert two_stage_lr(0, TOTAL, c) == pytest.approx(1.5e-5)  # warm-up: peak * 1/100
    assert two_stage_lr(99, TOTAL, c) == pytest.approx(1.5e-3)
    assert two_stage_lr(100, TOTAL, c) == pytest.approx(1.5e-3)  # stage-1 peak
    assert two_stage_lr(300, TOTAL, c) == pytest.approx(1.5e-3 - 0.5 * (1.5e-3 - 1.2e-3))  # halfway down
    assert two_stage_lr(499, TOTAL, c) == pytest.approx(1.2e-3, rel=1e-2)  # end of stage 1
    assert two_stage_lr(500, TOTAL, c) == pytest.approx(1e-3)  # abrupt drop to the stage-2 peak
    assert two_stage_lr(750, TOTAL, c) == pytest.approx(0.5e-3)
    assert two_stage_lr(999, TOTAL, c) == pytest.approx(2e-6)


def test_cosine_two_stage_lr_values():
    c = cfg(shape="cosine")
    assert two_stage_lr(100, TOTAL, c) == pytest.approx(1.5e-3)
    assert two_stage_lr(300, TOTAL, c) == pytest.approx(1.2e-3 + 0.3e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert two_stage_lr(500, TOTAL, c) == pytest.approx(1e-3)
    assert two_stage_lr(750, TOTAL, c) == pytest.approx(0.5e-3)


def test_the_drop_is_abrupt_and_its_point_configurable():
    c = cfg(stage2_start=0.7)
    assert two_stage_lr(699, TOTAL, c) > 1.2e-3
    assert two_stage_lr(700, TOTAL, c) == pytest.approx(1e-3)


def test_weight_decay_two_stages():
    const, cos = cfg(wd_shape="constant"), cfg(wd_shape="cosine")
    assert [two_stage_wd(s, TOTAL, const) for s in (0, 499, 500, 999)] == [0.1, 0.1, 0.0, 0.0]
    assert two_stage_wd(0, TOTAL, cos) == pytest.approx(0.1)  # the cosine peaks at wd
    assert two_stage_wd(250, TOTAL, cos) == pytest.approx(0.05)
    assert two_stage_wd(500, TOTAL, cos) == 0.0


def test_one_stage_schedule_has_no_drop():
    c = cfg(stage2_start=1.0, stage1_end_ratio=0.1, shape="cosine")
    lrs = [two_stage_lr(s, TOTAL, c) for s in range(100, TOTAL)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert two_stage_wd(999, TOTAL, c) == 0.1


@pytest.mark.parametrize("override, allowed", [("shape=exp", "linear, cosine"), ("wd_shape=linear", "constant, cosine")])
def test_an_unknown_shape_fails_at_composition_listing_the_shapes(override, allowed):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([f"stages.pretrain.schedule.{override}"])
    assert f"expected one of [{allowed}]" in str(err.value.__cause__)


@pytest.mark.parametrize("bad", [
    dict(stage2_start=0.0), dict(stage2_start=1.5), dict(lr_peak=-1e-3), dict(lr_peak=0.0), dict(lr_stage2_peak=-1e-4),
    dict(wd=-0.1), dict(wd_stage2=-0.1), dict(warmup_steps=-1), dict(final_ratio=-0.5),
])
def test_invalid_schedules_fail_at_start_naming_the_key(bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=rf"^stages\.x\.schedule\.{key}={value} must be"):
        validate(cfg(**bad), "stages.x.schedule")
