"""IBims-1 in its official ``.mat`` form, the image list, and the prediction files.

Spec: datasets-and-ibims-evaluation.md 5.2 (samples and ``.mat`` format), 5.4 (prediction
contract), 5.13 (fixtures); pitfalls 1, 11 and 12.

Each ``ibims1_core_mat/<name>.mat`` is MATLAB v5 with one 1x1 struct ``data``. It is read with
``scipy.io.loadmat``'s default options and fields are taken as ``data[field][0][0]``: with
``squeeze_me=True`` a one-plane parameter array would turn 1-D and row indexing would break.

Plane parameter arrays (``mask_<class>_paras``) are N x M, M >= 7, row k-1 for label k. Only
0-based columns 4-6 have a documented meaning: the plane normal in the camera frame
(X right, Y forward = depth, Z up) used by the planarity error (spec 5.9). Columns 0-3 are
undocumented in the release; our fixtures write a point on the plane in that frame (columns
0-2, metres) and the plane offset d = n . p (column 3), and the evaluation never reads them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from torch.utils.data import Dataset

from mesadepth.errors import DataError, MissingFileError
from mesadepth.io import PathLike, atomic_path, atomic_write_text, check_depth, read_list_file

__all__ = [
    "IBIMS_FIELDS",
    "IBIMS_PLANE_CLASSES",
    "IBimsDataset",
    "K_from_calib",
    "calib_from_K",
    "find_imagelist",
    "ibims_prediction_path",
    "read_ibims_mat",
    "read_ibims_prediction",
    "read_imagelist",
    "write_ibims_mat",
    "write_ibims_prediction",
    "write_imagelist",
]

#: Fields of the ``data`` struct of every IBims-1 ``.mat`` (spec 5.2).
IBIMS_FIELDS: tuple[str, ...] = (
    "rgb",
    "depth",
    "edges",
    "calib",
    "mask_invalid",
    "mask_transp",
    "mask_wall",
    "mask_table",
    "mask_floor",
    "mask_wall_paras",
    "mask_table_paras",
    "mask_floor_paras",
)
#: Plane classes in the order the evaluation visits them (spec 5.9).
IBIMS_PLANE_CLASSES: tuple[str, ...] = ("wall", "table", "floor")

# Binary maps. mask_invalid and mask_transp are 1 on VALID pixels despite their names (pitfall 1).
_BINARY = ("edges", "mask_invalid", "mask_transp")
_LABELS = ("mask_wall", "mask_table", "mask_floor")  # 0 = not this class, k = k-th plane
_PLANE_COLS = 7  # at least 7 columns: normal in columns 4-6
_IMAGELIST_PLACES = (
    "imagelist.txt",
    "ibims1_core_mat/imagelist.txt",
    "ibims1_core_raw/imagelist.txt",
)


def calib_from_K(K: np.ndarray) -> np.ndarray:
    """IBims ``calib`` from a 0-based intrinsics matrix ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]``.

    ``calib`` is MATLAB's transposed layout with a 1-based principal point (spec 5.2, 5.9):
    ``calib = K.T`` with ``calib[2, 0] = cx + 1`` and ``calib[2, 1] = cy + 1``, because the
    evaluation back-projects pixel (r, c) at u = c + 1, v = r + 1.
    """
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"calib_from_K: expected a 3x3 matrix, got shape {K.shape}")
    calib = K.T.copy()
    calib[2, 0] += 1.0
    calib[2, 1] += 1.0
    return calib


def K_from_calib(calib: np.ndarray) -> np.ndarray:
    """0-based intrinsics (float64) from an IBims ``calib``; inverse of :func:`calib_from_K`.

    fx = ``calib[0, 0]``, fy = ``calib[1, 1]``, cx = ``calib[2, 0] - 1``, cy = ``calib[2, 1] - 1``
    (0-based pixel centres: pixel column c has its centre at x = c, as everywhere in mesadepth).
    Refuses a matrix that is not in the transposed layout (its last column must be (0, 0, 1)).
    """
    calib = np.asarray(calib, dtype=np.float64)
    if calib.shape != (3, 3) or not np.all(np.isfinite(calib)):
        raise ValueError(f"K_from_calib: expected a finite 3x3 matrix, got {calib.tolist()}")
    if not np.allclose(calib[:, 2], [0.0, 0.0, 1.0]) or calib[0, 0] <= 0 or calib[1, 1] <= 0:
        raise ValueError(
            "K_from_calib: expected MATLAB's transposed layout [[fx,0,0],[s,fy,0],[cx,cy,1]] "
            f"with fx, fy > 0, got {calib.tolist()}"
        )
    K = calib.T.copy()
    K[0, 2] -= 1.0
    K[1, 2] -= 1.0
    return K


def _plane_array(params: np.ndarray | None, name: str) -> np.ndarray:
    # Empty -> (0, 0) as MATLAB's [] loads; otherwise always 2-D (a single plane is 1 x M).
    if params is None:
        return np.zeros((0, 0))
    params = np.asarray(params, dtype=np.float64)
    if params.size == 0:
        return np.zeros((0, 0))
    params = np.atleast_2d(params)
    if params.ndim != 2 or params.shape[1] < _PLANE_COLS:
        raise ValueError(f"{name}: expected an N x M array with M >= 7, got shape {params.shape}")
    return params


def _label_dtype(labels: np.ndarray) -> type[np.integer]:
    return np.uint8 if labels.max(initial=0) <= 255 else np.uint16


def write_ibims_mat(
    path: PathLike,
    rgb: np.ndarray,
    depth: np.ndarray,
    edges: np.ndarray,
    calib: np.ndarray,
    mask_invalid: np.ndarray,
    mask_transp: np.ndarray,
    mask_wall: np.ndarray,
    mask_table: np.ndarray,
    mask_floor: np.ndarray,
    mask_wall_paras: np.ndarray | None,
    mask_table_paras: np.ndarray | None,
    mask_floor_paras: np.ndarray | None,
) -> None:
    """Write one IBims-1 sample as MATLAB v5 ``{"data": 1x1 struct}`` (spec 5.2, 5.13), atomically.

    ``rgb`` (H, W, 3) uint8; ``depth`` (H, W) metres (0 = none), stored as double; binary maps
    stored as uint8 (MATLAB logical loads the same way), label maps as uint8/uint16; ``calib`` in
    the transposed 1-based layout (see :func:`calib_from_K`); plane arrays N x M (M >= 7), ``None``
    or empty for a class without planes (stored as MATLAB ``[]``, i.e. (0, 0)). Any H, W is
    accepted; the real data are 480 x 640.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(
            f"write_ibims_mat: rgb must be (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}"
        )
    hw = rgb.shape[:2]
    maps = {
        "depth": depth,
        "edges": edges,
        "mask_invalid": mask_invalid,
        "mask_transp": mask_transp,
        "mask_wall": mask_wall,
        "mask_table": mask_table,
        "mask_floor": mask_floor,
    }
    data: dict[str, np.ndarray] = {"rgb": rgb}
    for name, arr in maps.items():
        arr = np.asarray(arr)
        if arr.shape != hw:
            raise ValueError(f"write_ibims_mat: {name} must have shape {hw}, got {arr.shape}")
        if name == "depth":
            data[name] = arr.astype(np.float64)
        elif name in _BINARY:
            data[name] = (arr > 0).astype(np.uint8)
        else:
            if arr.min(initial=0) < 0 or not np.array_equal(arr, np.round(arr)):
                raise ValueError(f"write_ibims_mat: {name} must hold non-negative integer labels")
            data[name] = arr.astype(_label_dtype(arr))
    calib = np.asarray(calib, dtype=np.float64)
    if calib.shape != (3, 3):
        raise ValueError(f"write_ibims_mat: calib must be 3x3, got {calib.shape}")
    data["calib"] = calib
    planes = {
        "mask_wall_paras": mask_wall_paras,
        "mask_table_paras": mask_table_paras,
        "mask_floor_paras": mask_floor_paras,
    }
    for name, params in planes.items():
        data[name] = _plane_array(params, f"write_ibims_mat: {name}")
    _savemat(path, {"data": {f: data[f] for f in IBIMS_FIELDS}})


def _savemat(path: PathLike, variables: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # oned_as="row" never triggers (everything is 2-D already); compression as MATLAB's -v7.
        scipy.io.savemat(fh, variables, format="5", do_compression=True, oned_as="row")


def _loadmat(path: PathLike, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, what)
    try:
        # Default options on purpose: no squeeze_me (pitfall 12), no struct_as_record changes.
        return scipy.io.loadmat(io.BytesIO(path.read_bytes()))
    except Exception as exc:  # scipy raises MatReadError, OSError, ValueError, IndexError, ...
        raise DataError(
            path, f"expected a complete MATLAB v5 {what}, cannot read it: {exc}"
        ) from exc


def _binary(arr: np.ndarray) -> np.ndarray:
    # Stored as MATLAB logical (uint8) or double: treat as binary (spec 5.2).
    return (np.nan_to_num(arr.astype(np.float64), nan=0.0) > 0).astype(np.uint8)


def read_ibims_mat(path: PathLike) -> dict[str, Any]:
    """Read and validate one IBims-1 ``.mat``; return the sample dict of :class:`IBimsDataset`.

    Keys: ``image`` (H, W, 3) uint8, ``depth`` (H, W) float32 metres (0 = none), ``edges``,
    ``mask_invalid``, ``mask_transp`` (uint8 0/1; the masks are 1 = valid), ``mask_wall``,
    ``mask_table``, ``mask_floor`` (int32 plane labels), ``planes`` {class: (N, M) float64, (0, 7)
    when empty}, ``calib`` (3, 3) float64 as stored, ``K`` (3, 3) float32 0-based, ``name``.
    """
    path = Path(path)
    mat = _loadmat(path, "IBims-1 sample (.mat with a 1x1 struct 'data')")
    if "data" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(path, f"expected a variable 'data' (1x1 struct), found {found}")
    data = mat["data"]
    names = data.dtype.names if isinstance(data, np.ndarray) else None
    if names is None or data.shape != (1, 1):
        shape = getattr(data, "shape", None)
        raise DataError(path, f"expected 'data' to be a 1x1 MATLAB struct, found shape {shape}")
    for field in IBIMS_FIELDS:
        if field not in names:
            raise DataError(path, f"missing field '{field}' in struct 'data' (found {list(names)})")
    fields = {f: np.asarray(data[f][0][0]) for f in IBIMS_FIELDS}

    rgb = fields["rgb"]
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(path, f"field 'rgb': expected (H, W, 3), found {rgb.shape}")
    if rgb.dtype != np.uint8:
        if rgb.min(initial=0) < 0 or rgb.max(initial=0) > 255:
            raise DataError(path, f"field 'rgb': expected uint8 values, found {rgb.dtype}")
        rgb = rgb.astype(np.uint8)
    hw = rgb.shape[:2]
    for field in ("depth", *_BINARY, *_LABELS):
        if fields[field].shape != hw:
            raise DataError(
                path, f"field '{field}': expected shape {hw}, found {fields[field].shape}"
            )

    depth = fields["depth"].astype(np.float32)
    check_depth(depth, path, "field 'depth'")

    sample: dict[str, Any] = {"image": rgb, "depth": depth}
    for field in _BINARY:
        sample[field] = _binary(fields[field])
    for field in _LABELS:
        labels = fields[field]
        if not np.all(np.isfinite(labels)) or labels.min(initial=0) < 0:
            raise DataError(path, f"field '{field}': expected non-negative integer labels")
        if not np.array_equal(labels, np.round(labels)):
            raise DataError(path, f"field '{field}': expected integer labels, found fractions")
        sample[field] = labels.astype(np.int32)

    planes: dict[str, np.ndarray] = {}
    for cls in IBIMS_PLANE_CLASSES:
        field = f"mask_{cls}_paras"
        params = fields[field]
        if params.size == 0:
            planes[cls] = np.zeros((0, _PLANE_COLS))  # no plane of this class: skip it (5.9)
        elif params.ndim != 2 or params.shape[1] < _PLANE_COLS:
            raise DataError(
                path, f"field '{field}': expected N x M with M >= 7, found {params.shape}"
            )
        else:
            planes[cls] = params.astype(np.float64)
    sample["planes"] = planes

    calib = fields["calib"].astype(np.float64)
    try:
        K = K_from_calib(calib)
    except ValueError as exc:
        raise DataError(path, f"field 'calib': {exc}") from exc
    sample["calib"] = calib
    sample["K"] = K.astype(np.float32)
    sample["name"] = path.stem
    return sample


def write_imagelist(path: PathLike, names: Sequence[str]) -> None:
    """Write ``imagelist.txt``: one image name per line, no extension (spec 5.2)."""
    names = list(names)
    if not names:
        raise ValueError("write_imagelist: no names given")
    for name in names:
        if not name or name != name.strip() or any(c.isspace() for c in name):
            raise ValueError(f"write_imagelist: bad image name {name!r}")
    atomic_write_text(path, "\n".join(names) + "\n")


def read_imagelist(path: PathLike) -> list[str]:
    """Read ``imagelist.txt`` (whitespace stripped, blank lines ignored); refuse an empty list."""
    rows = read_list_file(path, what="IBims-1 imagelist.txt (one image name per line)")
    bad = [row for row in rows if len(row) != 1]
    if bad:
        raise DataError(path, f"expected one image name per line, found {' '.join(bad[0])!r}")
    return [row[0] for row in rows]


def find_imagelist(root: PathLike) -> Path:
    """``imagelist.txt`` at the root, in ``ibims1_core_mat/`` or in ``ibims1_core_raw/`` (5.2)."""
    root = Path(root)
    for rel in _IMAGELIST_PLACES:
        if (root / rel).is_file():
            return root / rel
    raise MissingFileError(
        root / _IMAGELIST_PLACES[0],
        "IBims-1 imagelist.txt",
        hint="also searched " + ", ".join(str(root / rel) for rel in _IMAGELIST_PLACES[1:]),
    )


class IBimsDataset(Dataset):
    """IBims-1 test set from ``<root>/ibims1_core_mat/<name>.mat`` (spec 5.2).

    ``imagelist`` is a path; when omitted it is searched with :func:`find_imagelist`. Every listed
    ``.mat`` must exist (checked up front). Items are the dicts of :func:`read_ibims_mat` plus
    ``index``; ``transform`` (if any) is applied to the dict.
    """

    def __init__(
        self,
        root: PathLike,
        imagelist: PathLike | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.imagelist = Path(imagelist) if imagelist is not None else find_imagelist(self.root)
        self.names = read_imagelist(self.imagelist)
        self.transform = transform
        self.mat_dir = self.root / "ibims1_core_mat"
        missing = [n for n in self.names if not self.mat_path(n).is_file()]
        if missing:
            raise MissingFileError(
                self.mat_path(missing[0]),
                "IBims-1 sample .mat",
                hint=f"{len(missing)} of {len(self.names)} listed in {self.imagelist} missing",
            )

    def mat_path(self, name: str) -> Path:
        return self.mat_dir / f"{name}.mat"

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Any:
        sample = read_ibims_mat(self.mat_path(self.names[index]))
        sample["index"] = index if index >= 0 else index + len(self.names)
        return self.transform(sample) if self.transform is not None else sample


def ibims_prediction_path(out_dir: PathLike, name: str) -> Path:
    """``<out_dir>/<name>_results.mat``, the file the official driver reads (spec 5.4)."""
    return Path(out_dir) / f"{name}_results.mat"


def write_ibims_prediction(path: PathLike, pred: np.ndarray) -> None:
    """Write ``pred_depths`` (H x W float32 metres, NaN = no prediction) as MATLAB v5 (5.4)."""
    pred = np.asarray(pred)
    if pred.ndim != 2 or not np.issubdtype(pred.dtype, np.floating):
        raise ValueError(
            f"write_ibims_prediction: expected an H x W float map, got {pred.dtype} {pred.shape}"
        )
    _savemat(path, {"pred_depths": pred.astype(np.float32)})


def read_ibims_prediction(path: PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read ``pred_depths`` from ``<name>_results.mat`` as (H, W) float32; NaN kept (spec 5.4).

    ``shape``, if given, is enforced (the official evaluation expects 480 x 640).
    """
    mat = _loadmat(path, "IBims-1 prediction file with variable 'pred_depths'")
    if "pred_depths" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(path, f"expected a variable 'pred_depths', found {found}")
    pred = np.asarray(mat["pred_depths"])
    if pred.ndim != 2 or not (
        np.issubdtype(pred.dtype, np.floating) or np.issubdtype(pred.dtype, np.integer)
    ):
        raise DataError(
            path, f"'pred_depths': expected an H x W float matrix, found {pred.dtype} {pred.shape}"
        )
    if shape is not None and pred.shape != tuple(shape):
        raise DataError(path, f"'pred_depths': expected shape {tuple(shape)}, found {pred.shape}")
    return pred.astype(np.float32)
