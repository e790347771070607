"""Known camera poses in the video stages (``pose.source: poses``): the augmented motion, learning
against the PoseNet, pose-file errors, and what the run builds, exports and hands to SP."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import threads_for_tests, tiny_video_recipe
from safetensors.torch import load_file

from mesadepth.data.transforms import (
    Compose,
    HorizontalFlip,
    Normalize,
    RandomScaleCrop,
    ToTensor,
)
from mesadepth.data.video import (
    OPENGL_TO_OPENCV,
    VideoScene,
    VideoSnippetDataset,
    poses_from_arkit,
    poses_from_scannet,
    poses_from_tum,
    quaternion_to_rotation,
    read_scene_list,
    write_poses,
    write_video_scene,
)
from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.geometry import euler_to_rotation, inverse_warp, invert_pose, rotation_warp
from mesadepth.io import read_depth_png, write_png
from mesadepth.losses.photometric import photo_and_geometry_loss
from mesadepth.stages.video import (
    VideoDataModule,
    VideoPretraining,
    VideoRecipe,
    export_model,
    run_video,
    train_transforms,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # As in test_video_stage.py: one OpenMP thread keeps CPU runs short on a shared machine.
    # MESADEPTH_TEST_THREADS overrides.
    before = torch.get_num_threads()
    torch.set_num_threads(threads_for_tests(1))
    yield
    torch.set_num_threads(before)


def _recipe(root: Path, run: Path, *overrides: str) -> VideoRecipe:
    """test_video_stage.py's tiny recipe (64x64, narrow decoder and pose nets) with known poses."""
    return tiny_video_recipe(root, run, "v2", "pose.source=poses", *overrides)


def _copy_video(tiny_world: Path, tmp_path: Path) -> Path:
    root = tmp_path / "video"
    shutil.copytree(tiny_world / "video", root)
    return root


# ----------------------------------------------------------------------------- augmentations


def _photo_at_truth(
    ds: VideoSnippetDataset, k: int, chain: Compose, seed: int, convention: str, motion: str
) -> float:
    """L_photo of snippet ``k`` after ``chain`` (one seed for the target and its references,
    so all get the same draws), with the ground-truth depths and the motion of ``motion``:
    ``augmented`` (what the chain made of it), ``raw`` (the motion before augmentation) or
    ``zero``."""
    s, target, refs = ds.samples[k]
    scene = ds.scenes[s]
    sample = {**ds[k], "depth": scene.depth(target)}
    out = chain(sample, np.random.default_rng(seed))
    # Reference depths take the same draws through a sample of their own.
    views = [
        chain(
            {"image": scene.frame(r), "depth": scene.depth(r), "K": scene.K.copy()},
            np.random.default_rng(seed),
        )
        for r in refs
    ]
    moves = {
        "augmented": out["motion"],
        "raw": torch.from_numpy(sample["motion"]),
        "zero": torch.eye(4).expand(len(refs), 4, 4),
    }[motion].double()
    poses = [moves[j][None] for j in range(len(refs))]
    pg = photo_and_geometry_loss(
        out["image"][None].double(),
        [v["image"][None].double() for v in views],
        out["depth"][None].double(),
        [v["depth"][None].double() for v in views],
        torch.as_tensor(out["K"]).double(),
        poses,
        [invert_pose(p) for p in poses],
        convention=convention,
    )
    return float(pg.photo)


def test_augmented_known_motion_warps_the_pair_as_well_as_the_raw_one(tiny_world):
    """A rendered snippet of the tiny world with its true depth and poses.txt motion: after a
    flip (motion conjugated by diag(-1, 1, 1, 1), cx mirrored), a scale-crop (K only) and the
    recipe's own training chain, L_photo at the true motion is as low as without augmentation;
    the flipped frames with the un-flipped motion, or the scale-cropped ones with no motion, are
    far off (so the transform of the motion is what keeps it low)."""
    ds = VideoSnippetDataset(tiny_world / "video", "train", poses=True)
    tail = [ToTensor(), Normalize()]
    recipe = _recipe(tiny_world / "video", Path("unused"))
    for k in (0, 7):
        for seed in (0, 1):

            def photo(chain, convention="reference", motion="augmented", k=k, seed=seed):
                return _photo_at_truth(ds, k, Compose(chain), seed, convention, motion)

            # With the exact flip rule and the exact warp the flipped snippet is the exact
            # mirror of the raw one: the same loss up to float summation order.
            exact = photo(tail, "exact")
            flipped = photo([HorizontalFlip(1.0, cx_rule="exact"), *tail], "exact")
            assert flipped == pytest.approx(exact, rel=1e-9), (k, seed)
            # Defaults (reference flip cx = w - cx, reference warp): within 1 % (measured 0.99-
            # 1.01 on all 12 snippets, seeds 0-2).
            raw = photo(tail)
            flip = [HorizontalFlip(1.0, cx_rule="reference"), *tail]
            assert photo(flip) == pytest.approx(raw, rel=0.02), (k, seed)
            assert photo(flip, motion="raw") > 2 * raw, (k, seed)  # measured >= 2.8x
            # Scale-crop upsamples (blurs) the frames: never higher than without (0.86x at most).
            scale = [RandomScaleCrop(1.15), *tail]
            assert photo(scale) < 1.02 * raw, (k, seed)
            assert photo(scale, motion="zero") > 2 * raw, (k, seed)
            # The recipe's chain: random flip, scale-crop, resize to 64 x 64 (tiny frames: 48 rows).
            assert photo(list(train_transforms(recipe).transforms)) < 1.05 * raw, (k, seed)


def test_flip_conjugates_the_motion_and_scale_crop_leaves_it(tiny_world):
    """The exact values: M T M with M = diag(-1, 1, 1, 1) after a flip, T itself after a
    scale-crop, as float32 tensors after ToTensor."""
    ds = VideoSnippetDataset(tiny_world / "video", "train", poses=True)
    sample = ds[3]
    motion = sample["motion"]
    assert motion.shape == (2, 4, 4) and motion.dtype == np.float64
    s, target, refs = ds.samples[3]
    cams = ds.scenes[s].poses()
    np.testing.assert_allclose(motion[1], np.linalg.inv(cams[refs[1]]) @ cams[target])
    mirror = np.diag([-1.0, 1, 1, 1])
    flipped = Compose([HorizontalFlip(1.0), ToTensor()])(sample, 0)["motion"]
    assert flipped.dtype == torch.float32
    torch.testing.assert_close(flipped, torch.from_numpy(mirror @ motion @ mirror).float())
    scaled = Compose([RandomScaleCrop(1.15), ToTensor()])(sample, 0)["motion"]
    torch.testing.assert_close(scaled, torch.from_numpy(motion).float())
    # The rotation angle is kept, its axis mirrored: (a, b, c) -> (a, -b, -c).
    m = torch.from_numpy(motion[0])
    f = torch.from_numpy(mirror @ motion[0] @ mirror)
    assert torch.trace(f[:3, :3]).item() == pytest.approx(torch.trace(m[:3, :3]).item())
    assert f[0, 3].item() == pytest.approx(-m[0, 3].item())


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
@pytest.mark.learning(seed=0)
def test_known_poses_learn_depth_where_the_posenet_gp_of_the_same_steps_does_not(
    tiny_world, tmp_path, learning_seed, learning_record
):
    """A learning check on the tiny world (2 training scenes, validated on the held-out one):
    48 GP steps with the true motion lower the held-out AbsRel well below that of the
    reference GP (PoseNet + ARN, from scratch) of the same 48 steps, which learns no motion in
    such a budget (README, "GP on CPU") and stays at the constant map's error.

    Measured (lr 1e-4, decoder.padding=zeros; seeds 0, 1, 2 as trainer.seed = data.seed):
    known poses 0.1835, 0.1716, 0.2336 at torch threads 1 and 2 alike; PoseNet 0.2813, 0.2827,
    0.2793 (1 thread) and 0.2815, 0.2820, 0.2731 (2 threads); constant map 0.2822. The smallest
    gap is 0.040, the largest posed AbsRel 83 % of the constant map's.
    """
    common = (
        "optim.lr=1e-4",
        "optim.epochs=2",
        "optim.epoch_size=24",
        "decoder.padding=zeros",
        f"trainer.seed={learning_seed}",
        f"data.seed={learning_seed}",
    )
    posed = run_video(_recipe(tiny_world / "video", tmp_path / "posed", *common))
    posenet = run_video(
        _recipe(
            tiny_world / "video",
            tmp_path / "posenet",
            *common,
            "pose.source=posenet",
            "validation.before_training=false",
        )
    )
    assert posed["steps"] == posenet["steps"] == 48
    assert (posed["pose_source"], posenet["pose_source"]) == ("poses", "posenet")
    assert not posed["rectify"] and posenet["rectify"]
    ours, theirs = posed["validation"]["abs_rel"], posenet["validation"]["abs_rel"]
    constant = posed["baseline_constant_depth"]["abs_rel"]
    learning_record.update(
        {
            "PoseNet - posed AbsRel (> 0.025)": theirs - ours,
            "posed AbsRel / constant map (< 0.9)": ours / constant,
            "posed AbsRel end/start (< 0.9)": ours / posed["validation_start"]["abs_rel"],
        }
    )
    assert ours < theirs - 0.025, (ours, theirs)
    assert ours < 0.9 * constant, (ours, constant)
    assert ours < 0.9 * posed["validation_start"]["abs_rel"]


# ----------------------------------------------------------------------------- pose files


def _rewrite(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: lines[:6], r"6 pose line\(s\) for 8 \*\.jpg frame\(s\): line 7 \(the "),
        (lambda lines: [*lines[:2], " ".join(lines[2].split()[:11]), *lines[3:]], r"line 3: .*12"),
        (
            lambda lines: [*lines[:3], lines[3].replace(lines[3].split()[5], "abc"), *lines[4:]],
            r"line 4: non-numeric",
        ),
        (lambda lines: [*lines[:4], "", " ".join(["nan"] * 12), *lines[5:]], r"line 6: NaN"),
        (lambda lines: [*lines, lines[-1]], r"line 9: pose 9, but the scene has 8"),
        (lambda lines: [" ".join(["2"] * 12), *lines[1:]], r"line 1: .*not a rotation"),
    ],
    ids=["short", "count", "non-number", "nan-after-blank", "long", "not-rotation"],
)
def test_a_bad_pose_file_names_the_scene_and_line(tiny_world, tmp_path, edit, message):
    root = _copy_video(tiny_world, tmp_path)
    scene = read_scene_list(root / "training" / "train.txt")[1]
    path = root / "training" / scene / "poses.txt"
    _rewrite(path, edit)
    with pytest.raises(DataError, match=message) as err:
        VideoDataModule(_recipe(root, tmp_path / "run"))
    assert err.value.path == str(path)


def test_a_scene_without_poses_is_refused_or_skipped_and_counted(tiny_world, tmp_path):
    root = _copy_video(tiny_world, tmp_path)
    scenes = read_scene_list(root / "training" / "train.txt")
    (root / "training" / scenes[0] / "poses.txt").unlink()
    with pytest.raises(MissingFileError, match=r"poses.txt.*camera-to-world.*pose.source") as err:
        VideoDataModule(_recipe(root, tmp_path / "run"))
    assert scenes[0] in err.value.path
    dm = VideoDataModule(_recipe(root, tmp_path / "run", "data.on_error=skip"))
    assert [s.name for s in dm.base.scenes] == scenes[1:]
    assert dm.base.bad.total == 1 and scenes[0] in dm.base.bad.summary()
    assert len(dm.train_set) == 6  # the other scene's 8 frames give 6 snippets
    # The PoseNet recipe never reads poses.txt: the same data trains without it.
    posenet = _recipe(root, tmp_path / "b", "pose.source=posenet")
    dm = VideoDataModule(posenet)
    batch = next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=2)))
    assert "motion" not in batch and len(dm.base.scenes) == 2
    terms = VideoPretraining(posenet).step_terms(batch)
    assert {"rot_c", "rot_t"} <= set(terms) and torch.isfinite(terms["total"])


# ----------------------------------------------------------------------------- the module


def test_known_poses_build_no_posenet_and_train_only_the_depthnet(tiny_world, tmp_path):
    recipe = _recipe(tiny_world / "video", tmp_path / "run")
    module = VideoPretraining(recipe)
    assert module.pose_net is None and module.rectify_net is None
    names = {n.split(".")[0] for n, _ in module.named_parameters()}
    assert names == {"depth_net"}
    groups = module.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["depth_net"]
    batch = next(iter(torch.utils.data.DataLoader(VideoDataModule(recipe).train_set, batch_size=2)))
    assert batch["motion"].shape == (2, 2, 4, 4) and batch["motion"].dtype == torch.float32
    terms = module.step_terms(batch)
    # The reference's terms minus the ARN's; the warp takes the batch's motion as it is.
    assert set(terms) == {"photo", "geometry", "smooth", "total"}
    terms["total"].backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    path = export_model(module, tmp_path / "gp.safetensors")
    assert {k.split(".")[0] for k in load_file(path)} == {"encoder", "depth_decoder"}
    # pose.translation_scale scales the known translations only (depth then comes out in
    # metres x scale), leaving the batch as it was.
    before = batch["motion"].clone()
    tenth = VideoPretraining(
        _recipe(tiny_world / "video", tmp_path / "t", "pose.translation_scale=0.1")
    )
    fwd, inv = tenth.motions(batch["image"], batch["refs"], batch["motion"])
    assert torch.equal(batch["motion"], before)
    torch.testing.assert_close(fwd[1][:, :3, :3], before[:, 1, :3, :3])
    torch.testing.assert_close(fwd[1][:, :3, 3], 0.1 * before[:, 1, :3, 3])
    torch.testing.assert_close(inv[1] @ fwd[1], torch.eye(4).expand(2, 4, 4), atol=1e-6, rtol=0)
    # Photo-mode validation warps with the val snippets' true motion; no PoseNet to score.
    photo = _recipe(tiny_world / "video", tmp_path / "p", "validation.mode=photo")
    dm = VideoDataModule(photo)
    assert dm.pose_set is None
    val = next(iter(torch.utils.data.DataLoader(dm.val_set, batch_size=2)))
    module = VideoPretraining(photo)
    with torch.no_grad():  # as in validation
        values, n, _ = module.val_batch(val)
        still, _, _ = module.val_batch({**val, "motion": torch.eye(4).expand_as(val["motion"])})
    assert n == 2 and set(values) == {"val_loss", "photo"}
    assert abs(values["photo"] - still["photo"]) > 1e-3  # the warp used the batch's motion
    # pose.rectify=on (YAML: true) keeps the ARN (its rotation is composed into the known motion).
    arn = VideoPretraining(_recipe(tiny_world / "video", tmp_path / "a", "pose.rectify=on"))
    assert arn.pose_net is None and arn.rectify_net is not None
    assert {"rot_c", "rot_t"} <= set(arn.step_terms(batch))
    with pytest.raises(ConfigError, match="rectify=true: .*v3.*no auto-rectify"):
        VideoPretraining(
            _recipe(tiny_world / "video", tmp_path / "c", "version=v3", "pose.rectify=on")
        )


def test_rectified_known_motion_is_the_raw_motion_turned_back(tiny_world, tmp_path):
    """With the ARN on, a reference rotated by R(r1) is seen with motion R(r1)^T T: warping the
    rectified reference with it matches warping the raw one with T (inner pixels of a smooth
    image, exact convention); R(r1) T, the wrong way round, does not."""
    module = VideoPretraining(_recipe(tiny_world / "video", tmp_path / "run", "pose.rectify=on"))
    h = w = 32
    v, u = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    ref = torch.stack([torch.sin(u / 5), torch.cos(v / 4), torch.sin((u + v) / 7)])[None].double()
    K = torch.tensor([[30.0, 0, 15.5], [0, 30, 15.5], [0, 0, 1]], dtype=torch.float64)
    depth = torch.full((1, 1, h, w), 2.0, dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, 3] = torch.tensor([0.05, -0.02, 0.04])
    r1 = torch.tensor([[0.01, 0.04, -0.02]], dtype=torch.float64)
    turn = euler_to_rotation(r1)
    rect = rotation_warp(ref, r1, K, convention="exact")
    fwd, inv = module.motions(ref, [rect], T[None, None], [turn])
    assert fwd[0].dtype == torch.float64
    torch.testing.assert_close(inv[0] @ fwd[0], torch.eye(4, dtype=torch.float64)[None])

    def warp(img, pose):
        return inverse_warp(img, depth, depth, pose, K, convention="exact").image[..., 6:-6, 6:-6]

    truth = warp(ref, T[None])
    assert (warp(rect, fwd[0]) - truth).abs().max() < 0.02
    wrong = torch.cat([turn @ T[None, :3], T[None, 3:]], 1)
    assert (warp(rect, wrong) - truth).abs().max() > 0.2


def test_a_posed_geometric_run_continues_into_a_posed_supervised_run(tiny_world, tmp_path):
    root = _copy_video(tiny_world, tmp_path)
    training = root / "training"
    for name in read_scene_list(training / "train.txt") + read_scene_list(training / "val.txt"):
        for png in sorted((training / name / "depth").glob("*.png")):
            d = read_depth_png(png, 5000.0)
            write_png(
                training / name / "leres_depth" / png.name, (d / d.max() * 6e4).astype(np.uint16)
            )
    gp = VideoPretraining(_recipe(root, tmp_path / "gp"))
    path = export_model(gp, tmp_path / "gp.safetensors")
    common = ("optim.epochs=1", "optim.epoch_size=2", "validation.before_training=false")
    sp = _recipe(
        root, tmp_path / "sp", "version=v3", f"init={path}", "encoder.preset=null", *common
    )
    metrics = run_video(sp)
    assert metrics["steps"] == 2 and metrics["pose_source"] == "poses"
    assert metrics["init"]["loaded"] == ["encoder", "depth_decoder"]
    assert set(metrics["loss_end"]) == {
        "photo",
        "geometry",
        "normal_matching",
        "mask_rank",
        "normal_rank",
        "total",
    }
    keys = load_file(tmp_path / "sp" / "model.safetensors")
    assert {k.split(".")[0] for k in keys} == {"encoder", "depth_decoder"}
    # A PoseNet SP may start from the posed GP too: its PoseNet starts fresh.
    fresh = VideoPretraining(
        _recipe(
            root,
            tmp_path / "sp2",
            "version=v3",
            f"init={path}",
            "encoder.preset=null",
            "pose.source=posenet",
        )
    )
    assert fresh.pose_net is not None and fresh.init_info["loaded"] == ["encoder", "depth_decoder"]


# ----------------------------------------------------------------------------- converters


def test_converters_give_opencv_camera_to_world(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    R = quaternion_to_rotation(q)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.tile(np.eye(3), (5, 1, 1)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0)
    # Hand case: 90 degrees about z (qz = qw = 1/sqrt 2) maps x to y.
    rz = quaternion_to_rotation(np.array([0, 0, 1, 1]) / np.sqrt(2))
    np.testing.assert_allclose(rz @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    cams = np.tile(np.eye(4), (5, 1, 1))
    cams[:, :3, :3], cams[:, :3, 3] = R, rng.normal(size=(5, 3))
    # ScanNet: 4x4 files, copied as they are.
    files = []
    for i, c in enumerate(cams):
        files.append(tmp_path / f"{i}.txt")
        np.savetxt(files[-1], c)
    np.testing.assert_allclose(poses_from_scannet(files), cams)
    files[2].write_text("-inf " * 4 + "\n" + "-inf " * 4 + "\n" + "-inf " * 4 + "\n0 0 0 1\n")
    with pytest.raises(DataError, match=r"2.txt: NaN/inf"):
        poses_from_scannet(files)
    # ARKit: the same camera with y and z turned back: a point ahead of the OpenGL camera
    # (z < 0) is ahead of the converted OpenCV camera (z > 0), at the same world position.
    gl = cams @ OPENGL_TO_OPENCV
    cv = poses_from_arkit(gl)
    np.testing.assert_allclose(cv, cams)
    ahead_gl = np.array([0.1, 0.2, -2.0, 1.0])
    ahead_cv = np.array([0.1, -0.2, 2.0, 1.0])
    np.testing.assert_allclose(gl[1] @ ahead_gl, cv[1] @ ahead_cv)
    # TUM: nearest timestamp within max_dt, comments skipped; qx qy qz qw order.
    lines = ["# timestamp tx ty tz qx qy qz qw"]
    for i in range(5):
        lines.append(" ".join(str(v) for v in [10 + 0.01 * i, *cams[i, :3, 3], *q[i]]))
    (tmp_path / "gt.txt").write_text("\n".join(lines) + "\n")
    out = poses_from_tum(tmp_path / "gt.txt", [10.031, 10.0, 10.004])
    np.testing.assert_allclose(out, cams[[3, 0, 0]], atol=1e-12)
    with pytest.raises(DataError, match=r"frame 1 \(time 10.5"):
        poses_from_tum(tmp_path / "gt.txt", [10.0, 10.5])
    # write_poses -> poses.txt reads back through the scene reader bit-exactly.
    write_video_scene(tmp_path / "scene", np.zeros((3, 8, 8, 3), np.uint8), np.eye(3))
    write_poses(tmp_path / "scene" / "poses.txt", out)
    np.testing.assert_array_equal(VideoScene(tmp_path / "scene").poses(), out)
