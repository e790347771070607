"""IBims-1 .mat samples, image list and prediction files (spec 5.2-5.4, 5.13; pitfalls 1, 12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from mesadepth.data.ibims import (
    IBIMS_FIELDS,
    IBimsDataset,
    K_from_calib,
    calib_from_K,
    ibims_prediction_path,
    read_ibims_prediction,
    read_imagelist,
    write_ibims_mat,
    write_ibims_prediction,
    write_imagelist,
)
from mesadepth.errors import DataError, MissingFileError

H, W = 24, 32
K0 = np.array([[500.5, 0.0, 15.5], [0.0, 501.25, 11.5], [0.0, 0.0, 1.0]])


def make_fields(seed: int = 0) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.5, 8.0, size=(H, W))
    depth[:3] = 0.0  # no laser return on the top rows
    wall = np.zeros((H, W), np.uint8)
    wall[:, :10] = 1
    wall[:, 10:16] = 2
    table = np.zeros((H, W), np.uint8)
    table[15:, 20:] = 1
    mask_invalid = np.ones((H, W), np.uint8)
    mask_invalid[:3] = 0  # 1 = valid (pitfall 1)
    mask_transp = np.ones((H, W), np.uint8)
    mask_transp[5:8, 5:8] = 0
    wall_paras = np.array(
        [[0.0, 3.0, 0.0, 3.0, 0.0, 1.0, 0.0], [1.0, 2.0, 0.5, 2.0, 0.0, 1.0, 0.0]]
    )  # columns 0-2 point on the plane, 3 offset, 4-6 normal (right, forward, up)
    table_paras = np.array([[0.0, 1.5, -0.5, -0.5, 0.0, 0.0, 1.0]])  # a single plane: 1 x 7
    return {
        "rgb": rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8),
        "depth": depth,
        "edges": (rng.random((H, W)) > 0.9).astype(np.uint8),
        "calib": calib_from_K(K0),
        "mask_invalid": mask_invalid,
        "mask_transp": mask_transp,
        "mask_wall": wall,
        "mask_table": table,
        "mask_floor": np.zeros((H, W), np.uint8),
        "mask_wall_paras": wall_paras,
        "mask_table_paras": table_paras,
        "mask_floor_paras": None,  # no floor plane in this image
    }


def make_dataset(root: Path, names=("office_04",), list_place: str = "imagelist.txt") -> dict:
    fields = make_fields()
    for name in names:
        write_ibims_mat(root / "ibims1_core_mat" / f"{name}.mat", **fields)
    write_imagelist(root / list_place, list(names))
    return fields


def test_fields_round_trip(tmp_path: Path) -> None:
    src = make_dataset(tmp_path)
    ds = IBimsDataset(tmp_path)
    assert len(ds) == 1 and ds.names == ["office_04"]
    s = ds[0]
    assert s["name"] == "office_04" and s["index"] == 0
    assert s["image"].dtype == np.uint8
    np.testing.assert_array_equal(s["image"], src["rgb"])
    assert s["depth"].dtype == np.float32 and s["depth"].shape == (H, W)
    np.testing.assert_array_equal(s["depth"], src["depth"].astype(np.float32))
    for key in ("edges", "mask_invalid", "mask_transp", "mask_wall", "mask_table", "mask_floor"):
        assert np.issubdtype(s[key].dtype, np.integer), key
        np.testing.assert_array_equal(s[key], src[key], err_msg=key)
    assert s["mask_invalid"][0].sum() == 0 and s["mask_invalid"][5].all()  # not inverted
    assert set(s["planes"]) == {"wall", "table", "floor"}
    np.testing.assert_array_equal(s["planes"]["wall"], src["mask_wall_paras"])
    assert s["planes"]["table"].shape == (1, 7)  # one plane stays 2-D
    np.testing.assert_array_equal(s["planes"]["table"][0, 4:7], [0.0, 0.0, 1.0])
    assert s["planes"]["floor"].size == 0 and s["planes"]["floor"].ndim == 2
    np.testing.assert_array_equal(s["calib"], src["calib"])
    assert s["K"].dtype == np.float32
    np.testing.assert_array_equal(s["K"], K0.astype(np.float32))


def test_file_is_a_matlab_1x1_struct_readable_with_defaults(tmp_path: Path) -> None:
    src = make_fields()
    path = tmp_path / "x.mat"
    write_ibims_mat(path, **src)
    mat = scipy.io.loadmat(path)  # default options, as the official driver reads it
    data = mat["data"]
    assert data.shape == (1, 1) and set(data.dtype.names) == set(IBIMS_FIELDS)
    assert data["rgb"][0][0].shape == (H, W, 3)
    assert data["mask_table_paras"][0][0].shape == (1, 7)
    assert data["mask_floor_paras"][0][0].shape == (0, 0)  # MATLAB [] for "no plane"
    assert data["calib"][0][0][2, 0] == K0[0, 2] + 1  # transposed, 1-based cx
    # squeeze_me is what breaks third-party loaders (pitfall 12): the single plane goes 1-D.
    squeezed = scipy.io.loadmat(path, squeeze_me=True)["data"]
    assert np.asarray(squeezed["mask_table_paras"].item()).ndim == 1


def test_calib_transposed_one_based_round_trip() -> None:
    calib = calib_from_K(K0)
    assert calib[0, 0] == K0[0, 0] and calib[1, 1] == K0[1, 1]
    assert K0[0, 2] == calib[2, 0] - 1 and K0[1, 2] == calib[2, 1] - 1
    np.testing.assert_array_equal(calib[:, 2], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(K_from_calib(calib), K0)  # exact
    with pytest.raises(ValueError, match="transposed"):
        K_from_calib(K0)  # a non-transposed matrix is refused, not silently misread


@pytest.mark.parametrize(
    "place", ["imagelist.txt", "ibims1_core_mat/imagelist.txt", "ibims1_core_raw/imagelist.txt"]
)
def test_imagelist_lookup(tmp_path: Path, place: str) -> None:
    make_dataset(tmp_path, names=("livingroom_14", "office_04"), list_place=place)
    ds = IBimsDataset(tmp_path)
    assert ds.imagelist == tmp_path / place
    assert ds.names == ["livingroom_14", "office_04"]
    assert ds[1]["name"] == "office_04"


def test_imagelist_explicit_path_and_whitespace(tmp_path: Path) -> None:
    make_dataset(tmp_path, names=("a_01", "b_02"))
    other = tmp_path / "lists" / "mine.txt"
    other.parent.mkdir()
    other.write_text("  b_02 \r\n\n a_01")
    assert read_imagelist(other) == ["b_02", "a_01"]
    ds = IBimsDataset(tmp_path, imagelist=other)
    assert ds.names == ["b_02", "a_01"] and ds[0]["name"] == "b_02"


def test_prediction_round_trip_with_nan(tmp_path: Path) -> None:
    pred = np.random.default_rng(1).uniform(0.1, 9.0, size=(H, W)).astype(np.float32)
    pred[2, 3] = np.nan
    path = ibims_prediction_path(tmp_path, "office_04")
    assert path.name == "office_04_results.mat"
    write_ibims_prediction(path, pred)
    raw = scipy.io.loadmat(path)["pred_depths"]
    assert raw.dtype == np.float32 and raw.shape == (H, W)
    back = read_ibims_prediction(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, pred)  # NaN compares equal at the same place
    assert np.isnan(back[2, 3])
    with pytest.raises(DataError, match="480"):
        read_ibims_prediction(path, shape=(480, 640))


def test_missing_mat(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    write_imagelist(tmp_path / "imagelist.txt", ["office_04", "kitchen_01"])
    with pytest.raises(MissingFileError, match=r"kitchen_01\.mat"):
        IBimsDataset(tmp_path)


def test_truncated_mat(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    path = tmp_path / "ibims1_core_mat" / "office_04.mat"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="office_04.mat") as info:
        IBimsDataset(tmp_path)[0]
    assert not isinstance(info.value, MissingFileError)


def test_missing_field(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    fields = make_fields()
    fields["mask_floor_paras"] = np.zeros((0, 0))
    del fields["edges"]
    path = tmp_path / "ibims1_core_mat" / "office_04.mat"
    scipy.io.savemat(path, {"data": fields})
    with pytest.raises(DataError, match=r"office_04\.mat.*'edges'"):
        IBimsDataset(tmp_path)[0]


@pytest.mark.parametrize("bad", ["zeros", "nan"])
def test_bad_depth(tmp_path: Path, bad: str) -> None:
    fields = make_fields()
    fields["depth"] = np.zeros((H, W))
    if bad == "nan":
        fields["depth"][4, 4] = np.nan
        fields["depth"][5, 5] = 2.0
    write_ibims_mat(tmp_path / "ibims1_core_mat" / "x.mat", **fields)
    write_imagelist(tmp_path / "imagelist.txt", ["x"])
    with pytest.raises(DataError, match=r"x\.mat.*(zero everywhere|NaN)"):
        IBimsDataset(tmp_path)[0]


def test_missing_imagelist(tmp_path: Path) -> None:
    (tmp_path / "ibims1_core_mat").mkdir()
    with pytest.raises(MissingFileError, match="imagelist.txt") as info:
        IBimsDataset(tmp_path)
    assert str(tmp_path) in str(info.value) and "ibims1_core_raw" in str(info.value)


def test_empty_imagelist(tmp_path: Path) -> None:
    (tmp_path / "imagelist.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="empty") as info:
        IBimsDataset(tmp_path)
    assert str(tmp_path / "imagelist.txt") in str(info.value)
