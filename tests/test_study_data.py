"""The label-efficiency study's subjects (tools/study_data.py): deterministic, and labels aligned with the image."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nilearn.datasets", reason="the study's template ships with nilearn (the demo extra)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import study_data  # noqa: E402


@pytest.fixture(scope="module")
def template():
    return study_data.load_study_template()


def test_subject_is_deterministic_and_subjects_differ(template):
    a_img, a_lab, a_aff = study_data.make_subject(template, 3, spacing=4.0)
    b_img, b_lab, b_aff = study_data.make_subject(template, 3, spacing=4.0)
    c_img, c_lab, _ = study_data.make_subject(template, 4, spacing=4.0)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab) and np.array_equal(a_aff, b_aff)
    assert (a_lab != c_lab).mean() > 0.02  # another seed is another warp
    assert np.allclose(np.abs(np.diag(a_aff)[:3]), 4.0)


@pytest.mark.parametrize("seed", [0, 7])
def test_labels_stay_on_the_warped_anatomy(template, seed):
    """Labels only inside the brain and on their side of the midline, and the T1 contrast between the label classes
    survives the warp: white matter brighter than grey matter voxel by voxel on average. A label warped differently
    from its image would mix the classes and wash this out."""
    image, label, affine = study_data.make_subject(template, seed, spacing=4.0)
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    assert not label[image == 0].any() and (image >= 0).all()
    for gm_label, wm_label in ((1, 2), (3, 4)):
        gm, wm = image[label == gm_label].mean(), image[label == wm_label].mean()
        assert wm > 1.15 * gm, (gm_label, gm, wm)
    # Left labels left of the midline, right labels right of it (world x, RAS), and the halves about equal.
    x = affine[0, 0] * np.arange(label.shape[0]) + affine[0, 3]
    side = {c: x[np.nonzero(label == c)[0]].mean() for c in (1, 2, 3, 4)}
    assert side[1] < -20 and side[2] < -10 and side[3] > 20 and side[4] > 10, side
    assert 0.8 < (label == 1).sum() / (label == 3).sum() < 1.25
