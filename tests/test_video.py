"""SC-Depth video layout: writer, scene reader, snippet rule, datasets, frame-index generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mesadepth.data import video
from mesadepth.data.transforms import Compose, HorizontalFlip, Resize
from mesadepth.errors import DataError, MissingFileError
from mesadepth.io import write_jpeg, write_png

H, W = 24, 32
K = np.array([[28.3, 0.0, 15.7], [0.0, 29.1, 12.2], [0.0, 0.0, 1.0]])


def smooth_frames(n: int, seed: int) -> np.ndarray:
    """Smooth, distinct frames (JPEG keeps them within a few grey levels)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    out = []
    for i in range(n):
        a = rng.uniform(0.5, 1.5, 3)
        img = 128 + 60 * np.sin(u[..., None] * 0.2 * a + i) * np.cos(v[..., None] * 0.15 * a)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def make_dataset(
    root: Path,
    counts: dict[str, int],
    train: list[str] | None = None,
    val: list[str] | None = None,
    pseudo: bool = False,
) -> dict[str, dict]:
    """Scenes under root/training with depth (and pseudo-depth = 1000 (i + 1) per frame i)."""
    truth = {}
    for s, (name, n) in enumerate(counts.items()):
        frames = smooth_frames(n, s)
        depths = np.random.default_rng(100 + s).uniform(0.5, 9.0, (n, H, W)).astype(np.float32)
        pseudo_d = np.stack([np.full((H, W), 1000 * (i + 1)) for i in range(n)]) if pseudo else None
        video.write_video_scene(
            root / "training" / name, frames, K, depths_m=depths, pseudo_depths=pseudo_d
        )
        truth[name] = {"frames": frames, "depths": depths}
    video.write_scene_list(root / "training" / "train.txt", train or list(counts))
    video.write_scene_list(root / "training" / "val.txt", val or list(counts)[-1:])
    return truth


# ----------------------------------------------------------------------------- snippet rule


def test_snippet_indices_hand_cases():
    assert video.snippet_indices(5, 3, 1) == [(1, [0, 2]), (2, [1, 3]), (3, [2, 4])]
    assert video.snippet_indices(4, 3, 1) == [(1, [0, 2]), (2, [1, 3])]
    assert video.snippet_indices(5, 3, 2) == [(2, [0, 4])]
    # L = 5, k = 2: d = 2, offsets (-4, -2, +2, +4), targets 4 .. n - 5
    assert video.snippet_indices(9, 5, 2) == [(4, [0, 2, 6, 8])]
    assert video.snippet_indices(10, 5, 2) == [(4, [0, 2, 6, 8]), (5, [1, 3, 7, 9])]
    assert video.snippet_indices(6, 5, 1) == [(2, [0, 1, 3, 4]), (3, [1, 2, 4, 5])]
    assert video.snippet_indices(8, 5, 2) == []  # n > L but targets [4, 4) is empty
    # n <= L gives none (spec 1.2: "no samples unless N > L (strictly)"), even n = L
    assert video.snippet_indices(3, 3, 1) == []
    assert video.snippet_indices(5, 5, 1) == []
    assert video.snippet_indices(2, 3, 1) == []
    assert video.snippet_indices(0, 3, 1) == []


def test_dataset_length_is_the_sum_over_scenes(tmp_path):
    make_dataset(tmp_path, {"a": 5, "b": 7, "c": 3})
    ds = video.VideoSnippetDataset(tmp_path, split="train")
    assert len(ds) == 3 + 5 + 0  # c has n = L: no snippet
    ds5 = video.VideoSnippetDataset(tmp_path, split="train", sequence_length=5, skip_frames=1)
    assert len(ds5) == 0 + 3 + 0  # a: n = L = 5 gives none; b: targets 2, 3, 4


# ----------------------------------------------------------------------------- round trips


def test_frames_K_and_snippets_round_trip(tmp_path):
    truth = make_dataset(tmp_path, {"a": 5, "b": 6})
    scene = video.VideoScene(tmp_path / "training" / "b")
    assert len(scene) == 6 and [p.name for p in scene.frames][:2] == ["0000000.jpg", "0000001.jpg"]
    np.testing.assert_allclose(scene.K, K, atol=1e-6)
    assert scene.K.dtype == np.float32
    for i in range(6):
        err = np.abs(scene.frame(i).astype(np.float64) - truth["b"]["frames"][i])
        assert err.mean() < 2.0
    ds = video.VideoSnippetDataset(tmp_path, split="train")
    s = ds[3 + 1]  # scene b, second snippet: target 2, refs 1 and 3
    assert (s["scene"], s["index"], s["ref_indices"]) == ("b", 2, [1, 3])
    assert s["image"].shape == (H, W, 3) and s["image"].dtype == np.uint8
    assert len(s["refs"]) == 2
    for arr, i in zip([s["image"], *s["refs"]], [2, 1, 3], strict=True):
        assert np.abs(arr.astype(np.float64) - truth["b"]["frames"][i]).mean() < 2.0
    np.testing.assert_allclose(s["K"], K, atol=1e-6)
    assert "pseudo_depth" not in s


def test_cam_txt_values_exact(tmp_path):
    Kx = np.array([[518.857901, 0, 325.582449], [0, 519.469611, 253.736166], [0, 0, 1]])
    video.write_video_scene(tmp_path / "s", smooth_frames(1, 0), Kx)
    np.testing.assert_allclose(video.VideoScene(tmp_path / "s").K, Kx, rtol=0, atol=1e-4)
    # float32 storage: 325.582449 -> nearest float32 is within 1.5e-5
    np.testing.assert_allclose(video.VideoScene(tmp_path / "s").K, Kx.astype(np.float32))


def test_depth_png_round_trip_within_one_step(tmp_path):
    truth = make_dataset(tmp_path, {"a": 5, "v": 4}, train=["a"], val=["v"])
    with Image.open(tmp_path / "training" / "v" / "depth" / "0000002.png") as img:
        raw = np.asarray(img)
    np.testing.assert_array_equal(raw, np.floor(truth["v"]["depths"][2].astype(np.float64) * 5000))
    ds = video.VideoDepthDataset(tmp_path, split="val")
    assert len(ds) == 4
    s = ds[2]
    assert set(s) >= {"image", "depth", "K", "scene", "index"} and s["index"] == 2
    err = truth["v"]["depths"][2].astype(np.float64) - s["depth"]
    assert err.min() >= -1e-6 and err.max() < 1 / 5000 + 1e-6  # truncation, not rounding
    assert s["depth"].dtype == np.float32


def test_depth_dataset_refuses_count_mismatch(tmp_path):
    make_dataset(tmp_path, {"a": 5, "v": 4}, train=["a"], val=["v"])
    extra = tmp_path / "training" / "v" / "depth" / "0000009.png"
    write_png(extra, np.full((H, W), 5000, np.uint16))
    with pytest.raises(DataError, match="found 5 depth PNG") as exc:
        video.VideoDepthDataset(tmp_path, split="val")
    assert str(tmp_path / "training" / "v" / "depth") in str(exc.value)


def test_poses_round_trip_bit_exact(tmp_path):
    rng = np.random.default_rng(1)
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[:, :3, :] = rng.normal(size=(3, 3, 4))
    video.write_video_scene(tmp_path / "s", smooth_frames(3, 0), K, poses=poses)
    np.testing.assert_array_equal(video.VideoScene(tmp_path / "s").poses(), poses)
    lines = (tmp_path / "s" / "poses.txt").read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 12 for line in lines)
    (tmp_path / "s" / "poses.txt").write_text("1 2 3\n" * 3)
    with pytest.raises(DataError, match="poses.txt"):
        video.VideoScene(tmp_path / "s").poses()


def test_pseudo_depth_is_read_raw(tmp_path):
    make_dataset(tmp_path, {"a": 5}, pseudo=True)
    pd_path = tmp_path / "training" / "a" / "leres_depth" / "0000001.png"
    write_png(pd_path, np.full((H, W), 60000, np.uint16))
    ds = video.VideoSnippetDataset(tmp_path, pseudo_depth="leres_depth")
    s = ds[0]  # target 1
    assert s["pseudo_depth"].dtype == np.float32 and s["pseudo_depth"].shape == (H, W)
    assert float(s["pseudo_depth"].max()) == float(s["pseudo_depth"].min()) == 60000.0
    assert float(ds[1]["pseudo_depth"][0, 0]) == 3000.0  # target 2: 1000 x (2 + 1), unscaled


def test_frame_index_selects_frames_and_their_pseudo_depths(tmp_path):
    truth = make_dataset(tmp_path, {"a": 7}, pseudo=True)
    (tmp_path / "training" / "a" / "frame_index.txt").write_text("0\n2\n3\n6\n")
    ds = video.VideoSnippetDataset(tmp_path, use_frame_index=True, pseudo_depth="leres_depth")
    assert len(ds) == 2  # filtered list [0, 2, 3, 6]: targets at positions 1 and 2
    got = [(ds[k]["index"], ds[k]["ref_indices"]) for k in range(2)]
    assert got == [(2, [0, 3]), (3, [2, 6])]
    s = ds[1]
    assert float(s["pseudo_depth"][0, 0]) == 4000.0  # frame 3's pseudo-depth
    assert np.abs(s["image"].astype(np.float64) - truth["a"]["frames"][3]).mean() < 2.0
    assert np.abs(s["refs"][1].astype(np.float64) - truth["a"]["frames"][6]).mean() < 2.0
    unfiltered = video.VideoSnippetDataset(tmp_path)
    assert len(unfiltered) == 5
    (tmp_path / "training" / "a" / "frame_index.txt").write_text("0\n7\n")
    with pytest.raises(DataError, match="out of range") as exc:
        video.VideoSnippetDataset(tmp_path, use_frame_index=True)
    assert "frame_index.txt" in str(exc.value)


def test_transform_applied_jointly_and_reproducibly(tmp_path):
    make_dataset(tmp_path, {"a": 5}, pseudo=True)
    chain = Compose([HorizontalFlip(0.5), Resize((12, 16))])
    ds = video.VideoSnippetDataset(tmp_path, pseudo_depth="leres_depth", transform=chain)
    a, b = ds[1], ds[1]
    np.testing.assert_array_equal(a["image"], b["image"])  # same seed, epoch and index
    assert a["image"].shape == (12, 16, 3) and a["pseudo_depth"].shape == (12, 16)
    assert all(r.shape == (12, 16, 3) for r in a["refs"])
    plain = video.VideoSnippetDataset(tmp_path)
    flips = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        s = ds[1]
        flipped = s["K"][0, 2] != pytest.approx(K[0, 2] / 2, rel=1e-5)
        flips.add(bool(flipped))
        ref = Resize((12, 16))(plain[1])
        if flipped:  # every frame mirrored together
            for x, y in zip([s["image"], *s["refs"]], [ref["image"], *ref["refs"]], strict=True):
                np.testing.assert_array_equal(x, y[:, ::-1])
            assert s["K"][0, 2] == pytest.approx(16 - K[0, 2] / 2, rel=1e-5)
    assert flips == {True, False}


# ----------------------------------------------------------------------------- scene lists


def test_scene_list_newlines_and_faithful_chop(tmp_path):
    p = tmp_path / "train.txt"
    video.write_scene_list(p, ["a", "b"])
    assert p.read_bytes() == b"a\nb\n"
    assert video.read_scene_list(p) == ["a", "b"]
    assert video.read_scene_list(p, faithful_chop=True) == ["a", "b"]
    p.write_bytes(b"alpha\nbeta")  # no final newline
    assert video.read_scene_list(p) == ["alpha", "beta"]
    assert video.read_scene_list(p, faithful_chop=True) == ["alpha", "bet"]  # pitfall 18
    p.write_bytes(b"alpha\r\nbeta\r\n")
    with pytest.raises(DataError, match="CRLF") as exc:
        video.read_scene_list(p)
    assert str(p) in str(exc.value)


# ----------------------------------------------------------------------------- bad input


def test_cam_txt_with_six_numbers(tmp_path):
    make_dataset(tmp_path, {"a": 5})
    cam = tmp_path / "training" / "a" / "cam.txt"
    cam.write_text("1 0 2\n0 1 3\n")
    with pytest.raises(DataError, match="found 6") as exc:
        video.VideoSnippetDataset(tmp_path)
    assert str(cam) in str(exc.value)


def test_cam_txt_non_numeric(tmp_path):
    make_dataset(tmp_path, {"a": 5})
    cam = tmp_path / "training" / "a" / "cam.txt"
    cam.write_text("fx 0 2\n0 1 3\n0 0 1\n")
    with pytest.raises(DataError, match="non-numeric") as exc:
        video.VideoScene(tmp_path / "training" / "a")
    assert str(cam) in str(exc.value)


def test_missing_cam_txt(tmp_path):
    make_dataset(tmp_path, {"a": 5})
    cam = tmp_path / "training" / "a" / "cam.txt"
    cam.unlink()
    with pytest.raises(MissingFileError) as exc:
        video.VideoSnippetDataset(tmp_path)
    assert str(cam) in str(exc.value)


def test_scene_list_naming_an_absent_folder(tmp_path):
    make_dataset(tmp_path, {"a": 5}, train=["a", "ghost"])
    with pytest.raises(DataError) as exc:
        video.VideoSnippetDataset(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "training" / "train.txt") in msg
    assert str(tmp_path / "training" / "ghost") in msg
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = video.VideoSnippetDataset(tmp_path, on_error="skip")
    assert len(ds) == 3 and ds.bad.total == 1


def test_empty_scene_list(tmp_path):
    make_dataset(tmp_path, {"a": 5})
    lst = tmp_path / "training" / "train.txt"
    lst.write_text("\n")
    with pytest.raises(DataError, match="empty") as exc:
        video.VideoSnippetDataset(tmp_path)
    assert str(lst) in str(exc.value)


def test_truncated_jpeg_error_and_skip_and_count(tmp_path):
    make_dataset(tmp_path, {"a": 6})
    bad = tmp_path / "training" / "a" / "0000002.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    ds = video.VideoSnippetDataset(tmp_path)
    with pytest.raises(DataError) as exc:
        ds[0]  # target 1 uses frame 2 as a reference
    assert str(bad) in str(exc.value)
    skip = video.VideoSnippetDataset(tmp_path, on_error="skip")
    # snippets (target: refs): 1: 0,2 | 2: 1,3 | 3: 2,4 | 4: 3,5 -> only target 4 is readable
    assert skip[0]["index"] == 4 and skip.bad.total == 3
    assert skip[1]["index"] == 4 and skip.bad.total == 3  # known-bad ones are not re-read
    assert skip[3]["index"] == 4


def test_pseudo_depth_count_mismatch(tmp_path):
    make_dataset(tmp_path, {"a": 5}, pseudo=True)
    folder = tmp_path / "training" / "a" / "leres_depth"
    (folder / "0000004.png").unlink()
    with pytest.raises(DataError, match="found 4 pseudo-depth") as exc:
        video.VideoSnippetDataset(tmp_path, pseudo_depth="leres_depth")
    assert str(folder) in str(exc.value)


def test_eight_bit_pseudo_depth_png(tmp_path):
    make_dataset(tmp_path, {"a": 5}, pseudo=True)
    png = tmp_path / "training" / "a" / "leres_depth" / "0000001.png"
    write_png(png, np.full((H, W), 200, np.uint8))
    ds = video.VideoSnippetDataset(tmp_path, pseudo_depth="leres_depth")
    with pytest.raises(DataError, match="16-bit") as exc:
        ds[0]
    assert str(png) in str(exc.value)


def test_all_zero_depth_png(tmp_path):
    make_dataset(tmp_path, {"a": 5, "v": 4}, train=["a"], val=["v"])
    png = tmp_path / "training" / "v" / "depth" / "0000001.png"
    write_png(png, np.zeros((H, W), np.uint16))
    ds = video.VideoDepthDataset(tmp_path)
    with pytest.raises(DataError, match="zero everywhere") as exc:
        ds[1]
    assert str(png) in str(exc.value)


# ----------------------------------------------------------------------------- testing/


def test_test_folder_collects_jpg_and_png_sorted_together(tmp_path):
    rng = np.random.default_rng(0)
    images = smooth_frames(3, 5)
    depths = rng.uniform(0.2, 9.5, (3, H, W))
    depths[0, :2] = 0.0  # holes stay holes
    video.write_test_folder(tmp_path / "testing", images, depths)
    write_jpeg(tmp_path / "testing" / "color" / "00001.jpg", images[1])
    (tmp_path / "testing" / "color" / "00001.jpg").rename(
        tmp_path / "testing" / "color" / "00001.png"
    )  # content detection: a .png name holding a JPEG still decodes
    ds = video.VideoTestDataset(tmp_path)
    assert len(ds) == 3 and [ds[k]["name"] for k in range(3)] == ["00000", "00001", "00002"]
    for k in range(3):
        s = ds[k]
        err = depths[k] - s["depth"]
        assert err.min() >= -1e-6 and err.max() < 1 / 5000 + 1e-6
        assert np.abs(s["image"].astype(np.float64) - images[k]).mean() < 2.0
    assert (ds[0]["depth"][:2] == 0).all()
    write_png(tmp_path / "testing" / "depth" / "00003.png", np.full((H, W), 9, np.uint16))
    with pytest.raises(DataError, match="found 4 depth") as exc:
        video.VideoTestDataset(tmp_path)
    assert str(tmp_path / "testing" / "depth") in str(exc.value)


# ----------------------------------------------------------------------------- frame_index.txt


def test_grey_conversion_matches_opencv_weights():
    rgb = np.array(
        [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 200, 30], [255, 255, 255]]], np.uint8
    )
    # 0.299 x 255 = 76.2 -> 76; 0.587 x 255 = 149.7 -> 150; 0.114 x 255 = 29.1 -> 29;
    # 2.99 + 117.4 + 3.42 = 123.81 -> 124; white stays 255
    np.testing.assert_array_equal(video.rgb_to_gray_cv(rgb), [[76, 150, 29, 124, 255]])


def test_select_frames_wrap_around_and_ratio():
    g = [np.full((4, 4), v, np.uint8) for v in (5, 6, 6, 30, 31, 25)]
    # faithful: 5 - 6 wraps to 255 > 10 (kept); 6 - 30 -> 232 (kept); 30 - 31 -> 255 (kept);
    # 31 - 25 = 6 (not kept)
    assert video.select_frames(g, faithful_wrap=True) == [0, 1, 3, 4]
    # signed: |5 - 6| = 1, |5 - 6| = 1, |5 - 30| = 25 (kept), |30 - 31| = 1, |30 - 25| = 5
    assert video.select_frames(g, faithful_wrap=False) == [0, 3]
    base = np.zeros((4, 4), np.uint8)
    half = base.copy()
    half.flat[:8] = 20  # 8 / 16 = 0.5 >= 0.5: kept
    less = base.copy()
    less.flat[:7] = 20  # 7 / 16 < 0.5: dropped
    assert video.select_frames([base, less, half], faithful_wrap=False) == [0, 2]
    at_threshold = np.full((4, 4), 10, np.uint8)  # difference exactly 10 is not > 10
    assert video.select_frames([base, at_threshold], faithful_wrap=False) == [0]


def test_generate_frame_index_on_jpeg_frames(tmp_path):
    # Constant grey frames survive JPEG exactly (DC only), so the hand numbers hold.
    levels = (5, 6, 6, 30, 31, 25)
    frames = np.stack([np.full((H, W, 3), v, np.uint8) for v in levels])
    scene = tmp_path / "training" / "s"
    video.write_video_scene(scene, frames, K)
    assert [int(video.VideoScene(scene).frame(i)[0, 0, 0]) for i in range(6)] == list(levels)
    assert video.generate_frame_index(scene, faithful_wrap=False) == [0, 3]
    assert not (scene / "frame_index.txt").exists()
    assert video.generate_frame_index(scene, write=True) == [0, 1, 3, 4]
    assert (scene / "frame_index.txt").read_bytes() == b"0\n1\n3\n4\n"
    assert video.generate_all_frame_indices(tmp_path, faithful_wrap=False) == {"s": [0, 3]}
    ds_scene = video.VideoScene(scene, use_frame_index=True)
    assert ds_scene.frame_ids == [0, 1, 3, 4] and len(ds_scene) == 4
