"""How good is a teacher's pseudo-depth? Median-scaled errors against ground-truth video depth.

SC-DepthV3 (stage 3) learns from a teacher's pseudo-depth, stored beside the frames as
``<scene>/leres_depth/*.png`` (uint16, depth up to scale; spec geometric-and-supervised 1.4).
Where the video scenes also carry ground truth (``<scene>/depth/*.png``, metres x 5000: the
synthetic world writes it, and some real video sets do), this module scores the stored maps with
the video stages' own validation metric (spec 7.1: median scaling, then AbsRel and the rest),
beside the constant-depth map that the stages' reports use as the no-knowledge baseline. A run
report can then say what its teacher was worth instead of quoting a fixed figure.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mesadepth.data.video import PSEUDO_DEPTH_DIR, VideoScene, read_scene_list
from mesadepth.errors import MissingFileError
from mesadepth.evaluation.metrics import SCALED_METRICS, median_scaled_metrics

__all__ = ["pseudo_depth_quality"]


def _at_size(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (align_corners False), as the stages resize predictions to the GT."""
    if depth.shape == size:
        return depth
    t = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _spread(n: int, limit: int | None) -> list[int]:
    """``limit`` positions spread evenly over ``range(n)`` (all of them when ``limit`` is None)."""
    if limit is None or n <= limit:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, limit)})


def pseudo_depth_quality(
    root: str | Path,
    folder: str = PSEUDO_DEPTH_DIR,
    splits: tuple[str, ...] = ("val", "train"),
    min_depth: float = 0.1,
    max_depth: float = 10.0,
    crop: str | None = "eigen",
    frames_per_scene: int | None = None,
) -> dict[str, Any]:
    """Median-scaled errors of the pseudo-depth under ``root`` against its ground-truth depth.

    Args:
        root: a video root in the SC-Depth layout (``training/{train,val}.txt`` and scenes).
        folder: the pseudo-depth folder inside each scene.
        splits: the scene lists to score; a list file that does not exist is left out.
        min_depth, max_depth, crop: the valid ground truth, as the stages' ``validation.*``.
        frames_per_scene: score at most this many frames per scene, evenly spread (None: all).

    Returns:
        ``{"measured": bool, "reason": str (when not measured), "<split>": {"frames": n,
        "scenes": n, "pseudo_depth": {metric: mean}, "constant_depth": {metric: mean},
        "abs_rel_fraction": pseudo AbsRel / constant AbsRel}}``. Scenes without ``depth/``
        cannot be scored: when no scene of any split has it, ``measured`` is False.

    Raises:
        MissingFileError: a listed scene lacks the pseudo-depth folder (run the teacher first).
    """
    root = Path(root)
    out: dict[str, Any] = {"measured": False, "folder": folder}
    for split in splits:
        list_file = root / "training" / f"{split}.txt"
        if not list_file.is_file():
            continue
        sums = dict.fromkeys(SCALED_METRICS, 0.0)
        base = dict.fromkeys(SCALED_METRICS, 0.0)
        frames = scenes = 0
        for name in read_scene_list(list_file):
            scene = VideoScene(list_file.parent / name, pseudo_depth=folder)
            if not (scene.path / "depth").is_dir():
                continue
            scenes += 1
            for i in _spread(len(scene), frames_per_scene):
                gt = scene.depth(i)
                pred = _at_size(scene.pseudo_depth(i), gt.shape)
                values = median_scaled_metrics(pred, gt, min_depth, max_depth, crop)
                if values is None:
                    continue
                flat = median_scaled_metrics(np.ones_like(gt), gt, min_depth, max_depth, crop)
                for k in sums:
                    sums[k] += values[k]
                    base[k] += flat[k]  # type: ignore[index]
                frames += 1
        if not frames:
            continue
        mean = {k: v / frames for k, v in sums.items()}
        const = {k: v / frames for k, v in base.items()}
        out[split] = {
            "frames": frames,
            "scenes": scenes,
            "pseudo_depth": mean,
            "constant_depth": const,
            "abs_rel_fraction": mean["abs_rel"] / const["abs_rel"]
            if const["abs_rel"] > 0
            else math.nan,
        }
        out["measured"] = True
    if not out["measured"]:
        if not any((root / "training" / f"{s}.txt").is_file() for s in splits):
            raise MissingFileError(root / "training" / f"{splits[0]}.txt", "video scene list")
        out["reason"] = "no listed scene has ground-truth depth (<scene>/depth/*.png)"
    return out
