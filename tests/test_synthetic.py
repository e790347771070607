"""The synthetic world's renderer: exact geometry, view-independent colour, planes, edges, paths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mesadepth.data.synthetic import (
    CLASS_ID,
    Box,
    Material,
    Plane,
    Scene,
    build_scene,
    cast,
    depth_edges,
    hand_held_trajectory,
    nyu_intrinsics,
    render_frame,
    room_size,
    rotation_ypr,
    scene_rng,
    shade,
)


def empty_room(size=(4.0, 3.0, 5.0)) -> Scene:
    """A bare room of known size: floor y = 0, walls x = 0, x = Lx, z = 0, z = Lz."""
    size = np.array(size)
    mats = [Material(1, np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.2, 0.2]), 2.0, 3)]
    planes = [
        Plane("wall", np.array([1.0, 0, 0]), 0.0),
        Plane("wall", np.array([-1.0, 0, 0]), -size[0]),
        Plane("floor", np.array([0, 1.0, 0]), 0.0),
        Plane("wall", np.array([0, 0, 1.0]), 0.0),
        Plane("wall", np.array([0, 0, -1.0]), -size[2]),
    ]
    room = Box(
        np.zeros(3),
        size,
        CLASS_ID["wall"],
        [0] * 6,
        [1, 2, 1, 1, 3, 4],
        [0, 1, 2, -1, 3, 4],
        interior=True,
    )
    table = Box(
        np.array([1.0, 0.7, 1.0]),
        np.array([2.0, 0.75, 2.0]),
        CLASS_ID["table"],
        [0] * 6,
        [1] * 6,
        [-1] * 6,
    )
    return Scene(
        "nyu",
        "office",
        size,
        [room, table],
        mats,
        planes,
        np.array([[2.0, 2.9, 2.5]]),
        np.array([1.0]),
        0.3,
    ).pack()


def level_pose(position, yaw=0.0, pitch=0.0, roll=0.0) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = rotation_ypr(yaw, pitch, roll)
    T[:3, 3] = position
    return T


def test_rotation_convention():
    R = rotation_ypr(0, 0, 0)
    np.testing.assert_allclose(R @ [0, 0, 1], [0, 0, -1])  # optical axis along world -z
    np.testing.assert_allclose(R @ [0, 1, 0], [0, -1, 0])  # image down = world down
    np.testing.assert_allclose(np.linalg.det(R), 1.0)
    # Positive pitch looks up; yaw of +90 deg turns the view from -z to -x.
    assert (rotation_ypr(0, 0.2, 0) @ [0, 0, 1])[1] > 0
    np.testing.assert_allclose(rotation_ypr(math.pi / 2, 0, 0) @ [0, 0, 1], [-1, 0, 0], atol=1e-12)


def test_nyu_intrinsics_scale():
    K = nyu_intrinsics(640, 480)
    np.testing.assert_allclose(
        K[[0, 1, 0, 1], [0, 1, 2, 2]], [518.857901, 519.469611, 325.582449, 253.736166]
    )
    np.testing.assert_allclose(nyu_intrinsics(128, 96), np.diag([0.2, 0.2, 1.0]) @ K)


def test_depth_of_a_fronto_parallel_wall_and_of_the_floor_is_analytic():
    scene = empty_room()
    K = nyu_intrinsics(64, 48)
    # Camera 1.5 m high at x = 2, z = 4.6, level, looking at the wall z = 0: z-depth = 4.6 everywhere
    # on the wall; a floor pixel in row v sees the floor at z = h fy / (v - cy).
    f = render_frame(scene, K, level_pose([2.0, 1.5, 4.6]), 48, 64, supersample=1)
    wall = f["labels"] == CLASS_ID["wall"]
    floor = f["labels"] == CLASS_ID["floor"]
    assert wall.sum() > 100 and floor.sum() > 50
    np.testing.assert_allclose(f["depth"][wall & (f["instances"] == 3)], 4.6, rtol=1e-5)
    v = np.arange(48)[:, None].repeat(64, 1).astype(np.float64)
    expected = 1.5 * K[1, 1] / (v - K[1, 2])
    np.testing.assert_allclose(f["depth"][floor], expected[floor], rtol=1e-4)


def test_plane_parameters_match_the_depth_map():
    rng = scene_rng(3, "nyu", "video", 0)
    size = room_size(rng, "nyu", "dining_room")
    poses = hand_held_trajectory(rng, size, 5, 0.05, 2.0)
    scene = build_scene(rng, "nyu", "dining_room", size, poses[:, :3, 3])
    K = nyu_intrinsics(96, 72)
    f = render_frame(scene, K, poses[2], 72, 96, supersample=1)
    u, v = np.meshgrid(np.arange(96), np.arange(72))
    X = (
        np.stack(
            [(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u, dtype=float)], -1
        )
        * f["depth"][..., None]
    )
    checked = 0
    for cls, plane in f["planes"].items():
        for k, (nx, ny, nz, d) in enumerate(plane["params"], start=1):
            sel = plane["mask"] == k
            assert sel.any(), cls
            np.testing.assert_allclose(np.linalg.norm([nx, ny, nz]), 1.0, rtol=1e-9)
            residual = X[sel] @ np.array([nx, ny, nz]) - d
            assert np.abs(residual).max() < 1e-3 * f["depth"][sel].max(), cls
            checked += 1
    assert checked >= 3  # floor and at least two walls


def test_colour_is_a_property_of_the_surface_point_not_of_the_view():
    scene = empty_room()
    K = nyu_intrinsics(48, 36)
    pose_a = level_pose([2.0, 1.5, 3.5], yaw=0.1)
    pose_b = level_pose([2.6, 1.3, 3.0], yaw=-0.2, pitch=-0.1, roll=0.05)
    # Points seen by camera a ...
    u, v = np.meshgrid(np.arange(48.0), np.arange(36.0))
    cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(
        -1, 3
    )
    dirs_a = cam @ pose_a[:3, :3].T
    hits_a = cast(scene, pose_a[:3, 3], dirs_a)
    X = pose_a[:3, 3] + hits_a.t[:, None].astype(np.float64) * dirs_a
    # ... re-found by casting from camera b towards them.
    to_x = X - pose_b[:3, 3]
    hits_b = cast(scene, pose_b[:3, 3], to_x)
    same = np.abs(hits_b.t - 1.0) < 1e-4  # unoccluded: the first hit is the point itself
    assert same.mean() > 0.8
    Xb = pose_b[:3, 3] + hits_b.t[:, None].astype(np.float64) * to_x
    ca = shade(scene, X.astype(np.float32), hits_a)
    cb = shade(scene, Xb.astype(np.float32), hits_b)
    np.testing.assert_allclose(ca[same], cb[same], atol=2e-3)
    # And the check has teeth: other points have other colours.
    assert (
        np.abs(ca[same] - np.roll(cb[same], 7, 0)).mean() > 10 * np.abs(ca[same] - cb[same]).mean()
    )


def test_depth_edges_mark_the_near_side_of_a_step():
    depth = np.full((6, 8), 4.0, np.float32)
    depth[:, :3] = 2.0
    e = depth_edges(depth)
    assert e[:, 2].all() and e.sum() == 6  # column 2 is the near side
    ramp = np.linspace(1.0, 1.3, 8, dtype=np.float32)[None].repeat(6, 0)
    assert depth_edges(ramp).sum() == 0  # smooth surfaces have no occluding edge


@pytest.mark.parametrize(
    "style,scene_type", [("nyu", "bedroom"), ("ibims", "corridor"), ("aux", "kitchen")]
)
def test_trajectory_is_hand_held_and_clear_of_furniture(style, scene_type):
    rng = scene_rng(11, style, "video", 4)
    size = room_size(rng, style, scene_type)
    poses = hand_held_trajectory(rng, size, 40, 0.05, 2.0)
    scene = build_scene(rng, style, scene_type, size, poses[:, :3, 3])
    steps = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1)
    assert 0.005 < np.median(steps) <= 0.06
    rel = np.einsum("nji,njk->nik", poses[:-1, :3, :3], poses[1:, :3, :3])
    angles = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert 0.3 < np.median(angles) < 5.0  # a few degrees between frames
    p = poses[:, :3, 3]
    assert np.all(p > 0.5) and np.all(p < size - 0.5)
    tb = scene.tables
    for lo, hi, inter in zip(tb["lo"], tb["hi"], tb["interior"], strict=True):
        if not inter and not (hi - lo).min() < 0.03:  # pictures hang on walls
            gap = np.maximum(np.maximum(lo - p, 0), p - hi)
            assert np.sqrt((gap**2).sum(1)).min() > 0.59


def test_rendering_is_deterministic_per_scene():
    def one(seed):
        rng = scene_rng(seed, "nyu", "video", 2)
        size = room_size(rng, "nyu", "kitchen")
        poses = hand_held_trajectory(rng, size, 3, 0.05, 2.0)
        scene = build_scene(rng, "nyu", "kitchen", size, poses[:, :3, 3])
        return render_frame(scene, nyu_intrinsics(32, 24), poses[1], 24, 32)

    a, b, c = one(5), one(5), one(6)
    np.testing.assert_array_equal(a["rgb"], b["rgb"])
    np.testing.assert_array_equal(a["depth"], b["depth"])
    assert not np.array_equal(a["rgb"], c["rgb"])
