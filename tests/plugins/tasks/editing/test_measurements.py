"""Background fidelity scores of an edit."""

from __future__ import annotations

import numpy as np
import pytest

from t2ialign.plugins.tasks.editing.measurements import background_scores


def test_background_scores_ignore_the_allowed_region():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    region = np.zeros((32, 32), dtype=bool)
    region[8:16, 8:16] = True
    b = a.copy()
    b[region] = 0
    inside = background_scores(a, b, region)
    assert inside["bg_psnr"] == float("inf") and inside["bg_fraction"] == pytest.approx(1 - 64 / 1024)
    c = a.copy()
    c[0, 0] = 255 - c[0, 0]
    outside = background_scores(a, c, region)
    assert np.isfinite(outside["bg_psnr"]) and outside["bg_ssim"] < 1.0
