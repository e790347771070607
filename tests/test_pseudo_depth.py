"""``mesadepth pseudo-depth`` on a copy of the tiny world's video (teacher-and-cka.md A5, A7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mesadepth import teachers as T
from mesadepth.cli import main
from mesadepth.data.video import VideoScene, VideoSnippetDataset
from mesadepth.io import read_png_uint16, read_rgb, write_png


@pytest.fixture(scope="module")
def demo_teacher(tmp_path_factory) -> Path:
    """A tiny project depth model saved as a fine-tuning run would save it."""
    from mesadepth.models.backbone import build_encoder
    from mesadepth.models.depth_head import DepthModel, save_depth_model

    torch.manual_seed(0)
    model = DepthModel.from_encoder(build_encoder("tiny-cpu"), num_filters=(8, 8, 8)).eval()
    for p in model.decoder.parameters():
        p.data.normal_(0, 0.05)
    return save_depth_model(model, tmp_path_factory.mktemp("teacher") / "model.safetensors")


@pytest.fixture
def video(tiny_world, tmp_path) -> Path:
    root = tmp_path / "video"
    shutil.copytree(tiny_world / "video", root)
    return root


def _scenes(root: Path) -> list[Path]:
    return sorted(p for p in (root / "training").iterdir() if p.is_dir())


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("leres_depth/*.png")}


def test_cli_writes_one_png_per_frame_then_skips_then_overwrites(video, demo_teacher, capsys):
    spec = f"mesadepth:{demo_teacher},flip=false,shift_window=false"  # one pass per frame
    args = ["pseudo-depth", "--teacher", spec, "--data", str(video), "--batch", "8", "--quiet"]
    assert main([*args, "--npy", "--summary", str(video / "summary.json")]) == 0
    out = capsys.readouterr().out
    scenes = _scenes(video)
    n_frames = sum(len(VideoScene(s).all_frames) for s in scenes)
    assert f"{n_frames} written, 0 skipped" in out
    teacher = T.build_teacher(spec, device="cpu")
    for s in scenes:
        scene = VideoScene(s, pseudo_depth="leres_depth")  # one PNG per *.jpg, or it raises
        assert [p.stem for p in scene.pseudo_depth_files] == [f.stem for f in scene.frames]
        assert f"{scene.name}: {len(scene)} frames, {len(scene)} written, 0 skipped" in out
        expected = teacher.predict([read_rgb(f) for f in scene.frames])
        for i, png in enumerate(scene.pseudo_depth_files):
            code = read_png_uint16(png)
            assert code.shape == scene.frame(i).shape[:2] and int(code.max()) == 60000
            stored = np.load(png.with_suffix(".npy"))
            np.testing.assert_allclose(stored, expected[i], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(code, T.encode_pseudo_depth(stored))
        record = json.loads((s / "leres_depth" / "teacher.json").read_text())
        assert record["teacher"]["spec"] == teacher.spec and record["frames"] == len(scene)
    summary = json.loads((video / "summary.json").read_text())
    assert summary["frames_written"] == n_frames and summary["frames_skipped"] == 0
    # SC-DepthV3's loader reads them raw, paired by position.
    ds = VideoSnippetDataset(video, pseudo_depth="leres_depth")
    assert float(ds[0]["pseudo_depth"].max()) == 60000.0

    before = _mtimes(video)
    assert main(args) == 0
    assert f"0 written, {n_frames} skipped" in capsys.readouterr().out
    assert _mtimes(video) == before

    assert main([*args, "--overwrite", "--scenes", scenes[0].name]) == 0
    out = capsys.readouterr().out
    n0 = len(VideoScene(scenes[0]).all_frames)
    assert f"{n0} written, 0 skipped" in out
    after = _mtimes(video)
    changed = {p for p in after if after[p] != before[p]}
    assert changed == {str(p) for p in (scenes[0] / "leres_depth").glob("*.png")}


def test_cli_refuses_mismatches(video, demo_teacher, capsys):
    spec = f"mesadepth:{demo_teacher},flip=false,shift_window=false"
    scene = _scenes(video)[0]
    args = ["pseudo-depth", "--teacher", spec, "--data", str(video), "--quiet"]
    args += ["--scenes", scene.name]
    # A PNG that names no frame would shift the pairing by position.
    write_png(scene / "leres_depth" / "9999999.png", np.ones((48, 64), np.uint16))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "9999999.png" in err and "sorted position" in err
    (scene / "leres_depth" / "9999999.png").unlink()
    # An existing map of another size is refused unless --overwrite.
    write_png(scene / "leres_depth" / "0000000.png", np.ones((10, 12), np.uint16))
    assert main(args) == 2
    assert "12x10 but its frame 0000000.jpg is 64x48" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert read_png_uint16(scene / "leres_depth" / "0000000.png").shape == (48, 64)
    capsys.readouterr()
    # Another teacher must not fill up a folder started by a different one.
    (scene / "leres_depth" / "0000003.png").unlink()
    other = scene.parent / "elsewhere"
    shutil.copytree(scene / "leres_depth", other / scene.name / "leres_depth")
    assert main([*args[:2], f"files:{other}", *args[3:]]) == 2
    assert "written by teacher" in capsys.readouterr().err
    # Frame count mismatch of a files teacher.
    assert (
        main(
            ["pseudo-depth", "--teacher", f"files:{other}", "--data", str(video)]
            + ["--scenes", scene.name, "--overwrite", "--quiet"]
        )
        == 2
    )
    assert "7 *.png pseudo-depth file(s)" in capsys.readouterr().err


def test_files_teacher_round_trip_is_bit_exact(video, tmp_path):
    scenes = _scenes(video)
    src = tmp_path / "pre"
    rng = np.random.default_rng(0)
    stored = {}
    for s in scenes:
        for f in VideoScene(s).all_frames:
            code = rng.integers(1, 60000, (48, 64)).astype(np.uint16)
            code[rng.integers(48), rng.integers(64)] = 60000
            write_png(src / s.name / "leres_depth" / f"p{f.stem}.png", code)
            stored[(s.name, f.stem)] = code
    result = T.write_pseudo_depth_tree(T.build_teacher(f"files:{src}"), video, progress=False)
    assert result["frames_written"] == len(stored)
    for (scene, stem), code in stored.items():
        got = read_png_uint16(video / "training" / scene / "leres_depth" / f"{stem}.png")
        np.testing.assert_array_equal(got, code)
