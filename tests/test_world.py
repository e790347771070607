"""The synthetic world through its files: synthetic -> real formats -> loaders gives the truth back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mesadepth.config import load_config
from mesadepth.data import ibims, lsun, nyu, video
from mesadepth.data.synthetic import nyu_intrinsics
from mesadepth.data.transforms import Crop, Resize
from mesadepth.data.world import PRESETS, SynthConfig, generate_world, render_sequence
from mesadepth.io import decode_rgb, encode_jpeg


def tiny_config(**over: object) -> SynthConfig:
    items = [f"{k.replace('__', '.')}={v}" for k, v in over.items()]
    return load_config(SynthConfig, None, items, base={"preset": "tiny", **PRESETS["tiny"]})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, Path, dict]:
    cfg = tiny_config()
    out = tmp_path_factory.mktemp("world")
    manifest = generate_world(cfg, out, progress=False)
    lsun.close_lmdb_envs()
    return cfg, out, manifest


def test_every_format_is_written(world):
    cfg, out, manifest = world
    train = video.read_scene_list(out / "video" / "training" / "train.txt")
    val = video.read_scene_list(out / "video" / "training" / "val.txt")
    assert len(train) == cfg.video.train_scenes and len(val) == cfg.video.val_scenes
    for scene in train + val:
        d = out / "video" / "training" / scene
        assert len(list(d.glob("*.jpg"))) == cfg.video.frames
        assert (d / "cam.txt").is_file() and len(
            list((d / "depth").glob("*.png"))
        ) == cfg.video.frames
    for cat in cfg.lsun.categories:
        assert sorted(p.name for p in (out / "lsun" / f"{cat}_train_lmdb").iterdir()) == [
            "data.mdb",
            "lock.mdb",
        ]
    assert (out / "nyu" / "nyu_depth_v2_labeled.mat").read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    names = ibims.read_imagelist(out / "ibims" / "imagelist.txt")
    assert len(names) == cfg.ibims.images
    assert all((out / "ibims" / "ibims1_core_mat" / f"{n}.mat").is_file() for n in names)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["counts"] == manifest["counts"]
    assert manifest["counts"]["sync_pairs"] == cfg.video.train_scenes * -(
        -cfg.video.frames // cfg.nyu.sync_step
    )


def test_video_files_give_back_frames_depth_intrinsics_and_poses(world):
    cfg, out, _ = world
    scene_type, truth = render_sequence(cfg, "nyu", "video", 0, cfg.video.frames)
    scene = video.VideoScene(out / "video" / "training" / f"{scene_type}_0000")
    assert len(scene) == cfg.video.frames
    np.testing.assert_allclose(scene.K, nyu_intrinsics(64, 48), rtol=1e-6)
    np.testing.assert_allclose(scene.poses(), np.stack([f["pose"] for f in truth]), atol=1e-9)
    for t in (0, cfg.video.frames - 1):
        # The frame on disk is exactly the JPEG (q95) of the render.
        np.testing.assert_array_equal(scene.frame(t), decode_rgb(encode_jpeg(truth[t]["rgb"], 95)))
        err = truth[t]["depth"].astype(np.float64) - scene.depth(t)
        assert err.min() >= -1e-6 and err.max() < 1 / 5000 + 1e-6  # uint16(m x 5000), truncated


def test_world_geometry_is_exact_through_the_files(world):
    """Reprojection with the files' depth, K and poses lands where the surface point truly is,
    and warping frame t+k into t reproduces frame t's colours on visible pixels."""
    _, _, manifest = world
    c = manifest["world_checks"]
    assert c["pixels"] > 500
    assert c["reproj_px_median"] < 0.02 and c["reproj_px_p95"] < 0.1
    assert c["photo_gl_mean"] < 6.0
    assert c["photo_gl_mean"] < 0.5 * c["photo_static_gl_mean"]


def test_sync_pairs_and_labeled_set_round_trip(world):
    cfg, out, manifest = world
    _, truth = render_sequence(cfg, "nyu", "video", 0, cfg.video.frames)
    ds = nyu.NYUSyncDataset(out / "nyu" / "nyu_depth_v2", out / "nyu" / "splits" / "train_list.txt")
    assert len(ds) == manifest["counts"]["sync_pairs"]
    s = ds[1]  # second pair of the first scene = frame sync_step
    raw = truth[cfg.nyu.sync_step]["raw_depth"].astype(np.float64)
    np.testing.assert_allclose(s["depth"], np.floor(raw * 1000) / 1000, atol=1e-6)
    np.testing.assert_array_equal(
        s["image"], decode_rgb(encode_jpeg(truth[cfg.nyu.sync_step]["rgb"], 75))
    )

    mat = nyu.NYULabeledMat(out / "nyu" / "nyu_depth_v2_labeled.mat")
    scene_type, lab = render_sequence(
        cfg, "nyu", "labeled", 0, cfg.nyu.labeled_frames, every=cfg.nyu.frame_gap
    )
    np.testing.assert_array_equal(mat.image(0), lab[0]["rgb"])
    np.testing.assert_array_equal(mat.depth(0, raw=False), lab[0]["depth"])
    np.testing.assert_array_equal(mat.depth(0, raw=True), lab[0]["raw_depth"])
    assert mat.scene_type(0) == scene_type
    train_idx, test_idx = nyu.read_splits_mat(out / "nyu" / "splits.mat", n_frames=len(mat))
    assert len(test_idx) == manifest["counts"]["labeled_test"] > 0 and len(train_idx) > 0
    test = nyu.NYUSyncDataset(
        out / "nyu" / "nyu_depth_v2" / "official_splits" / "test",
        out / "nyu" / "splits" / "test_list.txt",
    )
    assert len(test) == len(test_idx) == len(video.VideoTestDataset(out / "video"))
    # The exported file number is the frame's global 0-based index in the .mat.
    first = nyu.read_pair_list(out / "nyu" / "splits" / "test_list.txt")[0][0]
    assert int(first.split("rgb_")[1][:5]) == test_idx[0]
    assert not (out / "nyu" / "splits" / "test_list.txt").read_bytes().endswith(b"\n")  # as MIM's


def test_lsun_and_image_folder_give_back_the_renders(world):
    cfg, out, _ = world
    ds = lsun.LSUNLmdb(out / "lsun", categories=tuple(cfg.lsun.categories))
    assert len(ds) == cfg.lsun.per_category * len(cfg.lsun.categories)
    folder = lsun.ImageFolderDataset(out / "lsun_images")
    assert len(folder) == len(ds)
    from mesadepth.data.world import _lsun_task, _Task  # the renders the world stored

    first_cat = cfg.lsun.categories[0]
    truth = _lsun_task(
        cfg, out, _Task("lsun", 0, {"category": first_cat, "views": cfg.lsun.views_per_room})
    )["images"]
    got = sorted(
        (np.abs(ds[i]["image"].astype(np.float64) - t).mean(), i)
        for t in truth
        for i in range(len(truth))
    )
    assert got[0][0] < 6.0  # JPEG/WebP q75 of the same render
    values = [ds[i]["image"] for i in range(len(ds))]
    assert all(v.shape == (48, 64, 3) for v in values)


def test_ibims_planes_follow_the_official_back_projection(world):
    """Planes written for IBims-1 are found again the way the official planarity metric looks:
    1-based pixels, (right, forward, up) frame, K from the transposed calib."""
    cfg, out, _ = world
    ds = ibims.IBimsDataset(out / "ibims")
    checked = 0
    for i in range(len(ds)):
        s = ds[i]
        np.testing.assert_allclose(s["K"], nyu_intrinsics(64, 48), rtol=1e-6)
        calib = s["calib"]
        fx, fy, cx, cy = calib[0, 0], calib[1, 1], calib[2, 0], calib[2, 1]
        z = s["depth"]
        r, c = np.mgrid[0 : z.shape[0], 0 : z.shape[1]]
        P = np.stack([(c + 1 - cx) * z / fx, z, -(r + 1 - cy) * z / fy], -1)
        for cls in ("wall", "table", "floor"):
            params = s["planes"][cls]
            for k in range(len(params)):
                sel = (s[f"mask_{cls}"] == k + 1) & (z > 0) & (s["mask_invalid"] > 0)
                if sel.sum() < 30:
                    continue
                pts = P[sel] - P[sel].mean(0)
                normal = np.linalg.svd(pts, full_matrices=False)[2][-1]
                n_gt = params[k, 4:7]
                angle = np.degrees(np.arccos(min(1.0, abs(normal @ n_gt) / np.linalg.norm(n_gt))))
                assert angle < 0.5, (s["name"], cls, k, angle)
                checked += 1
        assert s["edges"].any()
    assert checked >= 2 * len(ds)


def test_same_seed_same_world_whatever_the_worker_count(world, tmp_path):
    cfg, out, _ = world
    again = tmp_path / "again"
    small = tiny_config(
        workers=1,
        lsun__per_category=0,
        ibims__images=0,
        aux__scenes=0,
        nyu__labeled_scenes=0,
        checks=False,
    )
    generate_world(small, again, progress=False)
    scene = video.read_scene_list(out / "video" / "training" / "train.txt")[1]
    for rel in (
        f"{scene}/0000003.jpg",
        f"{scene}/depth/0000003.png",
        f"{scene}/cam.txt",
        f"{scene}/poses.txt",
    ):
        assert (again / "video" / "training" / rel).read_bytes() == (
            out / "video" / "training" / rel
        ).read_bytes()
    other = tmp_path / "other"
    generate_world(
        tiny_config(
            seed=1,
            workers=1,
            lsun__per_category=0,
            ibims__images=0,
            aux__scenes=0,
            nyu__labeled_scenes=0,
            checks=False,
        ),
        other,
        progress=False,
    )
    names = video.read_scene_list(other / "video" / "training" / "train.txt")
    frames = sorted((other / "video" / "training" / names[1]).glob("*.jpg"))
    assert (
        frames[3].read_bytes() != (out / "video" / "training" / f"{scene}/0000003.jpg").read_bytes()
    )


def test_loaded_intrinsics_follow_resize_and_crop(world):
    cfg, out, _ = world
    ds = video.VideoSnippetDataset(out / "video", split="train")
    s = ds[0]
    K0 = np.asarray(s["K"], np.float64)
    np.testing.assert_allclose(K0, nyu_intrinsics(64, 48), rtol=1e-6)
    rng = np.random.default_rng(0)
    s = Crop(top=4, left=8, height=16, width=20)(Resize((24, 32))(s, rng), rng)
    # Resize 48x64 -> 24x32 halves both rows of K; the crop then moves the principal point.
    expected = np.array(
        [[K0[0, 0] / 2, 0, K0[0, 2] / 2 - 8], [0, K0[1, 1] / 2, K0[1, 2] / 2 - 4], [0, 0, 1]]
    )
    np.testing.assert_allclose(np.asarray(s["K"], np.float64), expected, rtol=1e-6)


def test_refuses_to_overwrite_a_world_silently(world):
    cfg, out, _ = world
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_world(cfg, out, progress=False)


def test_reprojection_check_has_teeth(world, tmp_path):
    """The renderer-based cycle error is ~0 for the files as written and clearly not when the
    files' intrinsics disagree with the images by half a pixel (the classic pixel-centre slip;
    for small motions most of that slip cancels between the two views, leaving ~0.04 px)."""
    import shutil

    from mesadepth.data.world import check_scene_files, render_scene
    from mesadepth.io import read_cam_txt, write_cam_txt

    cfg, out, _ = world
    scene_type, scene, truth = render_scene(cfg, "nyu", "video", 0, cfg.video.frames)
    scene_dir = out / "video" / "training" / f"{scene_type}_0000"
    good = check_scene_files(scene_dir, truth, k=2, scene=scene)
    assert good["reproj_px_median"] < 0.002
    broken = tmp_path / "broken"
    shutil.copytree(scene_dir, broken)
    K = read_cam_txt(broken / "cam.txt").astype(np.float64)
    K[0, 2] += 0.5
    K[1, 2] += 0.5
    write_cam_txt(broken / "cam.txt", K)
    bad = check_scene_files(broken, truth, k=2, scene=scene)
    assert bad["reproj_px_median"] > 10 * 0.002
