"""The speedrun's measuring tools: benchmarks/levers.py sets each lever as train.py will read it, and
benchmarks/tta_views.py shifts photos by whole pixels, filling the edge by reflection."""

import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_every_lever_is_train_py_flags_or_a_utils_setting_it_reads(monkeypatch):
    import levers

    import train
    import utils.warps

    for name, (flags, settings) in levers.LEVERS.items():
        train.parse_args(["--data", "x", *flags])  # exits on a flag train.py does not have
        for setting in settings:
            assert setting.startswith("utils."), f"{name}: {setting} is not a setting of utils"
    monkeypatch.setitem(utils.warps.AUGMENTATION, "horizontal_flip", True)
    levers.apply("utils.warps.AUGMENTATION[horizontal_flip]", "alternate")
    assert utils.warps.AUGMENTATION["horizontal_flip"] == "alternate"
    monkeypatch.setattr(utils.warps, "AUGMENTATION", utils.warps.AUGMENTATION)
    levers.apply("utils.warps.AUGMENTATION", {"horizontal_flip": False})
    assert utils.warps.AUGMENTATION == {"horizontal_flip": False}


@pytest.mark.parametrize("d", [3, -3])
def test_tta_views_shift_by_whole_pixels_and_reflect_the_edge(d):
    from tta_views import shifted

    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    moved = shifted(images, d)
    assert moved.shape == images.shape
    inner = slice(None, -3) if d > 0 else slice(3, None)  # pixel (r, c) shows (r + d, c + d)
    source = slice(3, None) if d > 0 else slice(None, -3)
    assert np.array_equal(moved[:, inner, inner], images[:, source, source])
    # one row past the edge shows the row before the edge (numpy's "reflect")
    if d > 0:
        assert np.array_equal(moved[:, 13, :13], images[:, 14, 3:])
    else:
        assert np.array_equal(moved[:, 2, 3:], images[:, 1, :13])
