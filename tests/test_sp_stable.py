"""The supervised stage's ranking-depth option and the loud flag of a stage that made depth worse
(issue 18, item 3)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import threads_for_tests, tiny_video_recipe

from mesadepth.data.video import read_scene_list
from mesadepth.errors import ConfigError
from mesadepth.io import read_depth_png, write_png
from mesadepth.losses.supervised import confident_ranking_loss, ranking_depth
from mesadepth.stages.video import depth_change, depth_worse_warning, run_video


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ranking_depth_modes_hand_values():
    d = torch.tensor([1.0, 2.0, 4.0, 9.0, 3.0, 3.0], dtype=torch.float64).view(2, 1, 1, 3)
    assert torch.equal(ranking_depth(d, "raw"), d)
    # Per-image means 7/3 and 5.
    expected = torch.tensor([3 / 7, 6 / 7, 12 / 7, 9 / 5, 3 / 5, 3 / 5], dtype=torch.float64)
    torch.testing.assert_close(ranking_depth(d, "mean").view(-1), expected, rtol=1e-15, atol=0)
    with pytest.raises(ConfigError, match="raw"):
        ranking_depth(d, "log")  # type: ignore[arg-type]


def test_mean_ranking_depth_makes_the_ranking_loss_ignore_the_prediction_scale():
    """The reference L_mr pays for scaling the prediction up (raw differences grow); with
    ``mean`` the loss and the direction of its gradient do not depend on the scale."""
    mode = "mean"
    pseudo = 1 + 2 * torch.rand(2, 1, 16, 20, generator=gen(1), dtype=torch.float64)
    # Mostly in the teacher's order, as a trained DepthNet is.
    noise = torch.rand(2, 1, 16, 20, generator=gen(0), dtype=torch.float64)
    pred = (0.3 * pseudo + 0.2 * noise).requires_grad_()
    m = torch.rand(2, 1, 16, 20, generator=gen(2), dtype=torch.float64)

    def loss(p: torch.Tensor, depth: str) -> torch.Tensor:
        return confident_ranking_loss(p, pseudo, m, generator=gen(5), numerics="safe", depth=depth)

    raw = loss(pred, "raw")
    assert loss(4 * pred, "raw").item() < 0.9 * raw.item()  # stretching pays on raw depth
    base = loss(pred, mode)
    base.backward()
    g0 = pred.grad.clone()
    for s in (4.0, 0.25, 37.0):
        p = (s * pred.detach()).requires_grad_()
        scaled = loss(p, mode)
        assert scaled.item() == pytest.approx(base.item(), rel=1e-12)
        scaled.backward()
        # L(s p) = L(p) => grad(s p) = grad(p) / s.
        torch.testing.assert_close(p.grad * s, g0, rtol=1e-9, atol=1e-15)
    # Scale-invariant, so no gradient along the depth itself (Euler: <grad, p> = 0), where the
    # reference's gradient has a component that scales the whole map up.
    assert abs(float((g0 * pred.detach()).sum())) < 1e-12
    p = pred.detach().clone().requires_grad_()
    loss(p, "raw").backward()
    assert float((p.grad * p.detach()).sum()) < -1e-3


def test_depth_change_flags_a_stage_that_made_depth_worse():
    worse = depth_change({"abs_rel": 0.1779, "rmse": 1.0}, {"abs_rel": 0.2717})
    assert worse == {"abs_rel_start": 0.1779, "abs_rel_end": 0.2717, "depth_worse": True}
    line = depth_worse_warning("supervised", worse)
    assert line.startswith("WARNING: the supervised stage made held-out depth WORSE")
    assert "0.1779 -> 0.2717 (+52.7 %)" in line and "depth_worse: true" in line
    better = depth_change({"abs_rel": 0.1779}, {"abs_rel": 0.1540})
    assert better is not None and better["depth_worse"] is False
    assert depth_change({"abs_rel": 0.2}, {"abs_rel": 0.2})["depth_worse"] is False
    # Photo mode, no start (resumed without it), or a NaN: nothing to compare.
    assert depth_change({"val_loss": 0.3}, {"val_loss": 0.2}) is None
    assert depth_change(None, {"abs_rel": 0.2}) is None
    assert depth_change({"abs_rel": math.nan}, {"abs_rel": 0.2}) is None


def _with_inverted_pseudo_depth(tiny_world: Path, tmp_path: Path) -> Path:
    """The tiny world's video with a teacher that has near and far swapped (1 / depth stored as
    pseudo-depth): a ranking loss that follows it must make depth worse."""
    root = tmp_path / "video"
    shutil.copytree(tiny_world / "video", root)
    training = root / "training"
    for name in read_scene_list(training / "train.txt") + read_scene_list(training / "val.txt"):
        for png in sorted((training / name / "depth").glob("*.png")):
            d = read_depth_png(png, 5000.0)
            inv = np.where(d > 0, 1.0 / np.maximum(d, 1e-3), 0.0)
            write_png(
                training / name / "leres_depth" / png.name,
                np.trunc(inv / inv.max() * 60000.0).astype(np.uint16),
            )
    shutil.copy(training / "train.txt", training / "val.txt")
    return root


@pytest.mark.slow
@pytest.mark.learning(seed=0)
def test_a_stage_that_makes_depth_worse_says_so_in_metrics_and_stdout(
    tiny_world, tmp_path, capsys, learning_seed, learning_record
):
    """A teacher with near and far swapped and only the ranking loss: held-out depth gets worse,
    and the run writes depth_worse: true with both AbsRels and prints the WARNING line."""
    before = torch.get_num_threads()
    threads = threads_for_tests(1)  # MESADEPTH_TEST_THREADS overrides
    torch.set_num_threads(threads)
    try:
        root = _with_inverted_pseudo_depth(tiny_world, tmp_path)
        recipe = tiny_video_recipe(
            root,
            tmp_path / "sp",
            "v3",
            "trainer.log_every_n_steps=50",  # the recipe default, as this run always had
            "data.size=[64,64]",
            "optim.lr=1e-3",
            "optim.epochs=1",
            "optim.epoch_size=12",
            "loss.ranking_numerics=safe",
            "loss.term_weights={photo: 0, geometry: 0, normal_matching: 0, normal_rank: 0, "
            "mask_rank: 1}",
            "validation.pose=never",
            "figures=0",
            f"trainer.seed={learning_seed}",
            f"data.seed={learning_seed}",
        )
        metrics = run_video(recipe)
    finally:
        torch.set_num_threads(before)
    written = json.loads((tmp_path / "sp" / "metrics.json").read_text())
    learning_record["AbsRel end/start (> 1.1)"] = written["abs_rel_end"] / written["abs_rel_start"]
    assert written["depth_worse"] is True
    assert written["abs_rel_start"] == pytest.approx(written["validation_start"]["abs_rel"])
    assert written["abs_rel_end"] == pytest.approx(written["validation"]["abs_rel"])
    assert written["abs_rel_end"] > 1.1 * written["abs_rel_start"], written
    assert metrics["torch_threads"] == threads
    assert "WARNING: the supervised stage made held-out depth WORSE" in capsys.readouterr().out
