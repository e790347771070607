"""NYUv2 labeled .mat, splits.mat, official export and sync layout (spec sections 2 and 3)."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from mesadepth.data.nyu import (
    NYULabeledDataset,
    NYULabeledMat,
    NYUSyncDataset,
    export_official_splits,
    official_border,
    read_pair_list,
    read_splits_mat,
    write_nyu_labeled_mat,
    write_pair_list,
    write_splits_mat,
    write_sync_pair,
)
from mesadepth.errors import DataError, MissingFileError
from mesadepth.io import read_png_uint16, read_rgb, write_png

SHARED_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "splits" / "nyudepthv2"


def _labeled_arrays(n: int = 4, h: int = 48, w: int = 64, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
        "depths": rng.uniform(0.5, 10.0, (n, h, w)).astype(np.float32),
        "raw_depths": np.where(
            rng.random((n, h, w)) < 0.2, 0.0, rng.uniform(0.5, 10.0, (n, h, w))
        ).astype(np.float32),
        "labels": rng.integers(0, 895, (n, h, w), dtype=np.uint16),
        "instances": rng.integers(0, 256, (n, h, w), dtype=np.uint8),
        "scene_types": ["bathroom", "kitchen", "bathroom", "living_room"][:n],
        "scenes": ["bathroom_0001", "kitchen_0028b", "bathroom_0002a", "living_room_0019"][:n],
        "names": ["book", "bottle", "cabinet", "wall"],
        "accel": rng.normal(size=(n, 4)).astype(np.float32),
    }


@pytest.fixture
def labeled(tmp_path: Path) -> tuple[Path, dict]:
    arrays = _labeled_arrays()
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    write_nyu_labeled_mat(path, **arrays)
    return path, arrays


# ---------------------------------------------------------------------------------------------
# labeled .mat
# ---------------------------------------------------------------------------------------------


def test_labeled_mat_round_trip(labeled: tuple[Path, dict]) -> None:
    path, a = labeled
    mat = NYULabeledMat(path)
    assert len(mat) == 4
    for i in range(4):
        np.testing.assert_array_equal(mat.image(i), a["images"][i])
        np.testing.assert_array_equal(mat.depth(i), a["raw_depths"][i])
        np.testing.assert_array_equal(mat.depth(i, raw=False), a["depths"][i])
        np.testing.assert_array_equal(mat.labels(i), a["labels"][i])
        np.testing.assert_array_equal(mat.instances(i), a["instances"][i])
        assert mat.scene_type(i) == a["scene_types"][i]
        assert mat.scene(i) == a["scenes"][i]
        assert mat.image(i).shape == (48, 64, 3) and mat.image(i).dtype == np.uint8
        assert mat.depth(i).dtype == np.float32
    assert mat.scene_types() == a["scene_types"]
    assert mat.names() == a["names"]
    np.testing.assert_array_equal(mat.accel(), a["accel"])
    with pytest.raises(IndexError):
        mat.image(4)
    mat2 = pickle.loads(pickle.dumps(mat))  # handle is dropped, reopened lazily
    np.testing.assert_array_equal(mat2.image(3), a["images"][3])
    mat.close()
    mat2.close()


def test_labeled_mat_on_disk_layout(labeled: tuple[Path, dict]) -> None:
    path, a = labeled
    head = path.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file")
    assert head[124:126] == b"\x00\x02" and head[126:128] == b"IM"
    assert h5py.is_hdf5(path)
    assert scipy.io.matlab.matfile_version(str(path)) == (2, 0)  # scipy's v7.3 detection
    with h5py.File(path, "r") as f:
        assert f.userblock_size == 512
        assert f["images"].shape == (4, 3, 64, 48)
        assert f["rawDepths"].shape == (4, 64, 48)
        assert f["labels"].dtype == np.uint16 and f["instances"].dtype == np.uint8
        assert f["accelData"].shape == (4, 4)
        np.testing.assert_array_equal(f["accelData"][:, 2], a["accel"][2])
        assert f["images"].chunks == (1, 3, 64, 48)
        # pixel (r, c) of frame i is depths[i, c, r] (spec 2.3)
        r, c = 5, 37
        assert f["depths"][1, c, r] == a["depths"][1, r, c]
        assert f["images"][2, 1, c, r] == a["images"][2, r, c, 1]
        assert "#refs#" in f
        ref_ds = f["sceneTypes"]
        assert ref_ds.shape == (1, 4)
        assert h5py.check_dtype(ref=ref_ds.dtype) is h5py.Reference
        target = f[ref_ds[0, 1]]
        assert target.name.startswith("/#refs#/")
        assert target.dtype == np.uint16 and target.shape == (len("kitchen"), 1)
        assert "".join(chr(int(x)) for x in target[()].ravel()) == "kitchen"
        assert f["images"].attrs["MATLAB_class"] == b"uint8"
        assert f["depths"].attrs["MATLAB_class"] == b"single"
        assert ref_ds.attrs["MATLAB_class"] == b"cell"
        assert target.attrs["MATLAB_class"] == b"char"


def test_labeled_reader_ignores_matlab_attributes(tmp_path: Path) -> None:
    """The spec 2.6 fixture: plain h5py, no userblock, no MATLAB_class, no names/labels."""
    path = tmp_path / "plain.mat"
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (2, 3, 8, 6), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f["images"] = img
        f["depths"] = np.ones((2, 8, 6), np.float32)
        f["rawDepths"] = np.zeros((2, 8, 6), np.float32)
        refs = f.create_group("#refs#")
        ds = f.create_dataset("sceneTypes", shape=(1, 2), dtype=h5py.ref_dtype)
        for j, s in enumerate(["office", "study"]):
            refs[f"s{j}"] = np.array([[ord(ch)] for ch in s], dtype=np.uint16)
            ds[0, j] = refs[f"s{j}"].ref
    mat = NYULabeledMat(path)
    assert (mat.height, mat.width) == (6, 8)
    np.testing.assert_array_equal(mat.image(1), img[1].transpose(2, 1, 0))
    assert mat.scene_types() == ["office", "study"]
    with pytest.raises(DataError, match="labels"):
        mat.labels(0)
    # rawDepths all zero -> the dataset refuses the frame
    ds_all = NYULabeledDataset(path, None, split="all")
    with pytest.raises(DataError, match="zero everywhere") as exc:
        ds_all[0]
    assert str(path) in str(exc.value)
    filled = NYULabeledDataset(path, None, split="all", depth="filled")
    assert filled[1]["depth"].shape == (6, 8)


def test_labeled_mat_missing_variable_and_bad_shape(tmp_path: Path) -> None:
    path = tmp_path / "bad.mat"
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros((2, 3, 8, 6), np.uint8)
        f["depths"] = np.zeros((2, 8, 6), np.float32)
    with pytest.raises(DataError, match="rawDepths") as exc:
        NYULabeledMat(path)
    assert str(path) in str(exc.value)
    with h5py.File(path, "a") as f:
        f["rawDepths"] = np.zeros((2, 6, 8), np.float32)  # not reversed
        f["sceneTypes"] = np.zeros((1, 2))
    with pytest.raises(DataError, match=r"rawDepths: expected \(2, 8, 6\)"):
        NYULabeledMat(path)


def test_truncated_mat(labeled: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = labeled
    cut = tmp_path / "cut.mat"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        NYULabeledMat(cut)
    assert str(cut) in str(exc.value)
    with pytest.raises(MissingFileError):
        NYULabeledMat(tmp_path / "absent.mat")


def test_nan_in_raw_depths(tmp_path: Path) -> None:
    a = _labeled_arrays(n=2)
    a["scene_types"], a["scenes"] = a["scene_types"][:2], a["scenes"][:2]
    a["raw_depths"][1, 3, 4] = np.nan
    mat_path = tmp_path / "nan.mat"
    write_nyu_labeled_mat(mat_path, **a)
    splits = tmp_path / "splits.mat"
    write_splits_mat(splits, [1], [2])
    ds = NYULabeledDataset(mat_path, splits, split="test")
    with pytest.raises(DataError, match="NaN") as exc:
        ds[0]
    assert str(mat_path) in str(exc.value) and "frame 1" in str(exc.value)
    with pytest.raises(DataError, match="NaN") as exc:
        export_official_splits(mat_path, splits, tmp_path / "out")
    assert str(mat_path) in str(exc.value)


# ---------------------------------------------------------------------------------------------
# splits.mat
# ---------------------------------------------------------------------------------------------


def test_splits_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "splits.mat"
    train1, test1 = [3, 4, 5, 7], [1, 2, 6, 8]
    write_splits_mat(path, train1, test1)
    raw = scipy.io.loadmat(path)
    assert raw["trainNdxs"].dtype == np.uint16 and raw["trainNdxs"].shape == (4, 1)
    assert raw["testNdxs"].dtype == np.uint16 and raw["testNdxs"].shape == (4, 1)
    np.testing.assert_array_equal(raw["testNdxs"].ravel(), test1)
    train0, test0 = read_splits_mat(path, n_frames=8)
    assert train0.dtype == np.int64 and test0.dtype == np.int64
    np.testing.assert_array_equal(train0, [2, 3, 4, 6])
    np.testing.assert_array_equal(test0, [0, 1, 5, 7])
    with pytest.raises(ValueError, match="1-based"):
        write_splits_mat(path, [0, 1], [2])


@pytest.mark.parametrize(
    ("train", "test", "n", "match"),
    [
        ([1, 2, 3], [3, 4], 4, "overlap"),
        ([1, 2], [3, 9], 4, "beyond"),
        ([1, 2], [3], 4, "cover"),
        ([2, 1], [3, 4], 4, "ascending"),
    ],
)
def test_splits_invalid(tmp_path: Path, train: list, test: list, n: int, match: str) -> None:
    path = tmp_path / "splits.mat"
    scipy.io.savemat(
        path,
        {
            "trainNdxs": np.array(train, np.uint16).reshape(-1, 1),
            "testNdxs": np.array(test, np.uint16).reshape(-1, 1),
        },
    )
    with pytest.raises(DataError, match=match) as exc:
        read_splits_mat(path, n_frames=n)
    assert str(path) in str(exc.value)


def test_splits_zero_and_missing_variable(tmp_path: Path) -> None:
    path = tmp_path / "splits.mat"
    scipy.io.savemat(path, {"trainNdxs": np.array([[1], [2]], np.uint16)})
    with pytest.raises(DataError, match="testNdxs") as exc:
        read_splits_mat(path)
    assert str(path) in str(exc.value)
    scipy.io.savemat(
        path, {"trainNdxs": np.array([[0], [1]], np.uint16), "testNdxs": np.array([[2]], np.uint16)}
    )
    with pytest.raises(DataError, match="1-based"):
        read_splits_mat(path)


# ---------------------------------------------------------------------------------------------
# official export
# ---------------------------------------------------------------------------------------------


def test_official_border_rule() -> None:
    assert official_border(480, 640) == (7, 474, 7, 632)
    assert official_border(240, 320) == (4, 237, 4, 316)  # 3.5 -> 4, 237, 3.5 -> 4, 316
    assert official_border(48, 64) == (1, 47, 1, 63)


def test_export_official_splits_small(labeled: tuple[Path, dict], tmp_path: Path) -> None:
    mat_path, a = labeled
    # 1.2345 m must become 1234 mm (truncation, not rounding); 0 stays 0
    a["raw_depths"][2, 0, 0] = 1.2345
    a["raw_depths"][2, 0, 1] = 0.0
    a["raw_depths"][2, 0, 2] = 2.9999
    write_nyu_labeled_mat(mat_path, **a)
    splits = tmp_path / "splits.mat"
    write_splits_mat(splits, [2], [1, 3, 4])  # test frames are 0, 2, 3 (0-based)
    out = tmp_path / "official_splits"
    pairs = export_official_splits(mat_path, splits, out)
    assert pairs == [
        ("bathroom/rgb_00000.jpg", "bathroom/sync_depth_00000.png"),
        ("bathroom/rgb_00002.jpg", "bathroom/sync_depth_00002.png"),
        ("living_room/rgb_00003.jpg", "living_room/sync_depth_00003.png"),
    ]
    assert (out / "train" / "kitchen" / "rgb_00001.jpg").is_file()
    assert not (out / "test" / "kitchen").exists()
    # file number = global 0-based index, not the rank inside the test split
    d = read_png_uint16(out / "test" / "bathroom" / "sync_depth_00002.png")
    assert d[0, 0] == 1234 and d[0, 1] == 0 and d[0, 2] == 2999
    expected = np.floor(a["raw_depths"][2].astype(np.float32) * np.float32(1000)).astype(np.uint16)
    np.testing.assert_array_equal(d, expected)
    d3 = read_png_uint16(out / "test" / "living_room" / "sync_depth_00003.png")
    np.testing.assert_array_equal(d3, np.floor(a["raw_depths"][3] * np.float32(1000)))


def test_export_border_full_size(tmp_path: Path) -> None:
    h, w = 480, 640
    images = np.full((2, h, w, 3), 230, dtype=np.uint8)
    depth = np.full((2, h, w), 2.0, dtype=np.float32)
    mat_path = tmp_path / "full.mat"
    write_nyu_labeled_mat(
        mat_path,
        images,
        depth,
        depth,
        np.zeros((2, h, w), np.uint16),
        np.zeros((2, h, w), np.uint8),
        ["office", "study"],
        ["office_0001", "study_0002"],
        ["wall"],
    )
    splits = tmp_path / "splits.mat"
    write_splits_mat(splits, [1], [2])
    out = tmp_path / "official_splits"
    pairs = export_official_splits(mat_path, splits, out)
    assert pairs == [("study/rgb_00001.jpg", "study/sync_depth_00001.png")]
    rgb = read_rgb(out / "test" / "study" / "rgb_00001.jpg").astype(int)
    assert rgb.shape == (480, 640, 3)
    inside = rgb[7:474, 7:632]
    # away from the edge JPEG ringing, the kept window is the original colour
    assert np.abs(inside[2:-2, 2:-2] - 230).max() <= 6
    # the border: 7 rows top, 6 bottom, 7 columns left, 8 right, black
    for outside in (rgb[:5], rgb[476:], rgb[:, :5], rgb[:, 634:]):
        assert outside.max() <= 10
    # the exact edge: the last black row/column vs the first kept one
    assert rgb[6, 100:500].mean() < 40 and rgb[7, 100:500].mean() > 190
    assert rgb[473, 100:500].mean() > 190 and rgb[474, 100:500].mean() < 40
    assert rgb[100:400, 6].mean() < 40 and rgb[100:400, 7].mean() > 190
    assert rgb[100:400, 631].mean() > 190 and rgb[100:400, 632].mean() < 40
    d = read_png_uint16(out / "test" / "study" / "sync_depth_00001.png")
    assert d.shape == (480, 640) and np.all(d == 2000)


# ---------------------------------------------------------------------------------------------
# sync layout and list files
# ---------------------------------------------------------------------------------------------


def _smooth_rgb(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3)
    rgb = base + 30 * np.stack([np.sin(xx / 9.0), np.cos(yy / 7.0), np.sin((xx + yy) / 11.0)], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _make_sync(root: Path, h: int = 48, w: int = 64) -> tuple[list, dict]:
    rng = np.random.default_rng(3)
    pairs, truth = [], {}
    for s, scene in enumerate(["kitchen_0028b", "living_room_0019"]):
        for idx in (0, 7):
            rgb = _smooth_rgb(h, w, 10 * s + idx)
            depth = rng.uniform(0.3, 9.0, (h, w))
            depth[rng.random((h, w)) < 0.1] = 0.0
            pair = write_sync_pair(root, scene, idx, rgb, depth)
            pairs.append(pair)
            truth[pair[0]] = (rgb, depth)
    return pairs, truth


@pytest.mark.parametrize("style", ["mim", "bts"])
def test_sync_round_trip(tmp_path: Path, style: str) -> None:
    base = tmp_path / "nyu_depth_v2"
    pairs, truth = _make_sync(base)
    lst = tmp_path / f"train_{style}.txt"
    write_pair_list(lst, [(f"/{a}", f"/{b}") for a, b in pairs], style=style)
    text = lst.read_text()
    assert text.endswith("\n")
    first = text.splitlines()[0]
    if style == "mim":
        assert first == "/kitchen_0028b/rgb_00000.jpg /kitchen_0028b/sync_depth_00000.png"
    else:
        assert first == "/kitchen_0028b/rgb_00000.jpg /kitchen_0028b/sync_depth_00000.png 518.8579"
    assert (base / "kitchen_0028b" / "sync_depth_00007.png").is_file()
    ds = NYUSyncDataset(base, lst)
    assert len(ds) == 4
    for k, (rgb_rel, _) in enumerate(pairs):
        rgb, depth_m = truth[rgb_rel]
        s = ds[k]
        assert s["index"] == k
        assert s["name"] == rgb_rel.split("/")[0] + "_rgb_" + rgb_rel[-9:-4]
        assert s["image"].dtype == np.uint8 and s["depth"].dtype == np.float32
        expected = np.floor(depth_m * 1000).astype(np.uint16).astype(np.float32) / np.float32(1000)
        np.testing.assert_array_equal(s["depth"], expected)
        assert np.abs(s["depth"] - depth_m).max() < 1e-3
        assert np.all(s["depth"][depth_m == 0] == 0)
        assert np.abs(s["image"].astype(int) - rgb).mean() < 3
        assert ("focal" in s) == (style == "bts")
    assert ds[0]["name"] == "kitchen_0028b_rgb_00000"
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2[3]["depth"], ds[3]["depth"])


def test_bts_test_style_tokens_and_transform(tmp_path: Path) -> None:
    base = tmp_path / "official_splits" / "test"
    pairs, _ = _make_sync(base)
    lst = tmp_path / "test_bts.txt"
    write_pair_list(lst, pairs, style="bts", focal=518.8579, final_newline=False)
    assert lst.read_text().splitlines()[0].startswith("kitchen_0028b/rgb_00000.jpg ")
    assert not lst.read_text().endswith("\n")
    ds = NYUSyncDataset(base, lst, transform=lambda s: {**s, "tag": 1})
    s = ds[1]
    assert s["tag"] == 1 and s["focal"] == pytest.approx(518.8579)
    assert s["name"] == "kitchen_0028b_rgb_00007"


def test_mim_test_list_has_no_final_newline(tmp_path: Path) -> None:
    lst = tmp_path / "test_list.txt"
    pairs = [("bathroom/rgb_00000.jpg", "bathroom/sync_depth_00000.png")] * 2
    write_pair_list(lst, pairs, style="mim", final_newline=False)
    assert lst.read_bytes() == (
        b"/bathroom/rgb_00000.jpg /bathroom/sync_depth_00000.png\n"
        b"/bathroom/rgb_00000.jpg /bathroom/sync_depth_00000.png"
    )
    assert len(read_pair_list(lst)) == 2


def test_shared_real_lists(tmp_path: Path) -> None:
    if not SHARED_SPLITS.is_dir():
        pytest.skip("shared NYUv2 split lists not present")
    test_list = SHARED_SPLITS / "test_list.txt"
    train_list = SHARED_SPLITS / "train_list.txt"
    assert not test_list.read_bytes().endswith(b"\n")
    rows = read_pair_list(test_list)
    assert len(rows) == 654
    assert rows[0] == ("/bathroom/rgb_00045.jpg", "/bathroom/sync_depth_00045.png")
    assert rows[-1][1].endswith("sync_depth_00278.png")  # last line, not cut
    train_rows = read_pair_list(train_list)
    assert len(train_rows) == 24231
    assert train_rows[0] == ("/kitchen_0028b/rgb_00045.jpg", "/kitchen_0028b/sync_depth_00045.png")
    # our writer reproduces the real line format byte for byte, both lists
    mine = tmp_path / "train.txt"
    write_pair_list(mine, [(a.lstrip("/"), b.lstrip("/")) for a, b in train_rows[:2]])
    with train_list.open("rb") as fh:
        assert mine.read_bytes() == fh.readline() + fh.readline()
    mine_test = tmp_path / "test.txt"
    write_pair_list(mine_test, rows, style="mim", final_newline=False)
    assert mine_test.read_bytes() == test_list.read_bytes()


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_missing_empty_and_malformed_lists(tmp_path: Path) -> None:
    absent = tmp_path / "absent.txt"
    with pytest.raises(MissingFileError) as exc:
        NYUSyncDataset(tmp_path, absent)
    assert str(absent) in str(exc.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for call in (lambda: read_pair_list(empty), lambda: NYUSyncDataset(tmp_path, empty)):
        with pytest.raises(DataError, match="empty") as exc:
            call()
        assert str(empty) in str(exc.value)
    bad = tmp_path / "bad.txt"
    bad.write_text("/a/rgb_00000.jpg /a/sync_depth_00000.png\n/a/rgb_00001.jpg\n")
    with pytest.raises(DataError, match="line 2") as exc:
        read_pair_list(bad)
    assert str(bad) in str(exc.value)
    focal = tmp_path / "focal.txt"
    focal.write_text("/a/rgb_00000.jpg /a/sync_depth_00000.png abc\n")
    with pytest.raises(DataError, match="focal") as exc:
        NYUSyncDataset(tmp_path, focal, check_files=False)
    assert str(focal) in str(exc.value)


def test_list_naming_absent_files(tmp_path: Path) -> None:
    base = tmp_path / "nyu"
    pairs, _ = _make_sync(base)
    pairs = [*pairs[:2], ("ghost/rgb_00000.jpg", "ghost/sync_depth_00000.png"), *pairs[2:]]
    lst = tmp_path / "list.txt"
    write_pair_list(lst, pairs)
    with pytest.raises(DataError) as exc:
        NYUSyncDataset(base, lst)
    msg = str(exc.value)
    assert str(lst) in msg and "2 listed file(s) missing" in msg
    assert str(base) + "/ghost/rgb_00000.jpg" in msg
    with pytest.warns(UserWarning, match="dropped 2 missing"):
        ds = NYUSyncDataset(base, lst, on_error="skip")
    assert len(ds) == 4 and ds.bad.total == 2
    assert [ds[k]["name"] for k in range(4)] == [
        "kitchen_0028b_rgb_00000",
        "kitchen_0028b_rgb_00007",
        "living_room_0019_rgb_00000",
        "living_room_0019_rgb_00007",
    ]


def test_corrupt_files_at_getitem(tmp_path: Path) -> None:
    base = tmp_path / "nyu"
    pairs, _ = _make_sync(base)
    lst = tmp_path / "list.txt"
    write_pair_list(lst, pairs)
    jpg = base / pairs[0][0]
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])  # truncated JPEG
    zero = base / pairs[1][1]
    write_png(zero, np.zeros((48, 64), np.uint16))  # all-zero depth
    eight = base / pairs[2][1]
    write_png(eight, np.full((48, 64), 100, np.uint8))  # 8-bit where 16-bit is expected
    ds = NYUSyncDataset(base, lst)
    for k, path, match in ((0, jpg, "decode"), (1, zero, "zero everywhere"), (2, eight, "16-bit")):
        with pytest.raises(DataError, match=match) as exc:
            ds[k]
        assert str(path) in str(exc.value)
    skip = NYUSyncDataset(base, lst, on_error="skip")
    for k in range(4):  # every bad row falls through to the next valid one: row 3
        assert skip[k]["index"] == 3
    assert skip.bad.total == 3
    assert skip[0]["name"] == "living_room_0019_rgb_00007"
    assert skip.bad.total == 3  # known-bad rows are not decoded (or counted) twice


def test_check_files_false_defers_missing(tmp_path: Path) -> None:
    base = tmp_path / "nyu"
    pairs, _ = _make_sync(base)
    lst = tmp_path / "list.txt"
    write_pair_list(lst, [*pairs, ("ghost/rgb_00001.jpg", "ghost/sync_depth_00001.png")])
    ds = NYUSyncDataset(base, lst, check_files=False)
    assert len(ds) == 5
    with pytest.raises(MissingFileError) as exc:
        ds[4]
    assert "ghost/rgb_00001.jpg" in str(exc.value)


def test_labeled_dataset_splits_and_names(labeled: tuple[Path, dict], tmp_path: Path) -> None:
    mat_path, a = labeled
    splits = tmp_path / "splits.mat"
    write_splits_mat(splits, [2, 3], [1, 4])
    ds = NYULabeledDataset(mat_path, splits, split="test")
    assert len(ds) == 2
    s = ds[1]
    assert s["index"] == 3 and s["scene_type"] == "living_room"
    assert s["name"] == "living_room_rgb_00003"
    np.testing.assert_array_equal(s["depth"], a["raw_depths"][3])
    np.testing.assert_array_equal(s["image"], a["images"][3])
    train = NYULabeledDataset(mat_path, splits, split="train", depth="filled")
    assert [train[k]["index"] for k in range(2)] == [1, 2]
    np.testing.assert_array_equal(train[0]["depth"], a["depths"][1])
    bordered = NYULabeledDataset(mat_path, splits, split="test", black_border=True)[0]["image"]
    assert bordered[0].max() == 0 and bordered[:, -1].max() == 0
    np.testing.assert_array_equal(bordered[1:47, 1:63], a["images"][0][1:47, 1:63])
    # pickle-safe (DataLoader workers): no open handle travels
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2[0]["image"], a["images"][0])
    bad_splits = tmp_path / "bad_splits.mat"
    write_splits_mat(bad_splits, [2, 3], [1, 4, 5])
    with pytest.raises(DataError, match="beyond") as exc:
        NYULabeledDataset(mat_path, bad_splits)
    assert str(bad_splits) in str(exc.value)


def test_labeled_dataset_in_forked_workers(labeled: tuple[Path, dict], tmp_path: Path) -> None:
    mat_path, a = labeled
    splits = tmp_path / "splits.mat"
    write_splits_mat(splits, [2, 3], [1, 4])
    ds = NYULabeledDataset(mat_path, splits, split="all")
    ds[0]  # the parent now holds a handle; workers must open their own
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [int(i) for b in batches for i in b["index"]] == [0, 1, 2, 3]
    np.testing.assert_array_equal(batches[1]["image"][1].numpy(), a["images"][3])


def test_pil_png_modes_sanity(tmp_path: Path) -> None:
    """write_sync_pair must produce a true 16-bit PNG, not an 8-bit one."""
    rgb_rel, depth_rel = write_sync_pair(
        tmp_path, "s", 3, np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 9.5)
    )
    assert (rgb_rel, depth_rel) == ("s/rgb_00003.jpg", "s/sync_depth_00003.png")
    with Image.open(tmp_path / depth_rel) as img:
        assert img.mode.startswith("I")
    assert read_png_uint16(tmp_path / depth_rel).max() == 9500
