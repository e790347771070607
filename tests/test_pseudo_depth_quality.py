"""The teacher's pseudo-depth scored against ground-truth video depth (pipeline report input)."""

from __future__ import annotations

import numpy as np
import pytest

from mesadepth.data.video import write_scene_list, write_video_scene
from mesadepth.errors import MissingFileError
from mesadepth.evaluation.pseudo_depth import pseudo_depth_quality

K = np.array([[40.0, 0, 16], [0, 40.0, 12], [0, 0, 1]])


def _scene(root, name, depth, pseudo, with_depth=True):
    n = depth.shape[0]
    frames = np.zeros((n, *depth.shape[1:], 3), dtype=np.uint8)
    write_video_scene(
        root / "training" / name,
        frames,
        K,
        depths_m=depth if with_depth else None,
        pseudo_depths=pseudo,
    )


def test_scale_only_pseudo_depth_scores_zero_and_a_flat_one_scores_the_constant_map(tmp_path):
    rng = np.random.default_rng(0)
    depth = rng.uniform(1.0, 5.0, (3, 24, 32))
    _scene(tmp_path, "exact", depth, depth * 5000)  # raw units: depth x 5000 (scale only)
    _scene(tmp_path, "flat", depth, np.full(depth.shape, 30000.0))
    write_scene_list(tmp_path / "training" / "val.txt", ["exact"])
    write_scene_list(tmp_path / "training" / "train.txt", ["flat"])
    q = pseudo_depth_quality(tmp_path, crop=None)
    assert q["measured"] and q["val"]["frames"] == 3 and q["train"]["frames"] == 3
    # Zero up to the PNGs' quantisation (1/5000 m for the ground truth, 1 unit for pseudo-depth).
    assert q["val"]["pseudo_depth"]["abs_rel"] < 1e-4
    assert q["val"]["abs_rel_fraction"] < 1e-3
    # A flat map is the constant baseline itself.
    assert q["train"]["abs_rel_fraction"] == pytest.approx(1.0, abs=1e-12)
    # Hand check of the baseline for one frame: |median(g) - g| / g averaged.
    g = (np.trunc(depth[0] * 5000) / 5000).astype(np.float32).ravel()  # as the PNG stores it
    med = np.partition(g, (g.size - 1) // 2)[(g.size - 1) // 2]
    want = np.mean(np.abs(med.astype(np.float64) - g) / g)
    one = pseudo_depth_quality(tmp_path, crop=None, splits=("train",), frames_per_scene=1)
    assert one["train"]["frames"] == 1
    assert one["train"]["constant_depth"]["abs_rel"] == pytest.approx(want, rel=1e-6)


def test_video_without_ground_truth_is_reported_not_scored(tmp_path):
    depth = np.full((2, 24, 32), 2.0)
    _scene(tmp_path, "a", depth, depth * 1000, with_depth=False)
    write_scene_list(tmp_path / "training" / "val.txt", ["a"])
    q = pseudo_depth_quality(tmp_path)
    assert q["measured"] is False and "ground-truth depth" in q["reason"]
    with pytest.raises(MissingFileError, match="val.txt"):
        pseudo_depth_quality(tmp_path / "elsewhere")
