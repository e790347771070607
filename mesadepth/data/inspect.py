"""``mesadepth inspect``: read datasets with the training loaders and summarise what they hold.

Each row is one loader over one dataset: how many samples it indexes and what a few evenly
spaced samples look like (image size, depth range, valid-depth share, intrinsics). The same
code reads a synthetic world and the real NYUv2 / SC-Depth / LSUN / IBims-1 folders.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mesadepth.errors import DataError

PathLike = str | os.PathLike[str]


@dataclass
class DatasetPaths:
    """Where each dataset lives; ``None`` = not inspected."""

    video: Path | None = None
    video_aux: Path | None = None
    nyu: Path | None = None
    nyu_train_list: Path | None = None
    nyu_test_list: Path | None = None
    nyu_mat: Path | None = None
    nyu_splits: Path | None = None
    lsun: Path | None = None
    lsun_images: Path | None = None
    ibims: Path | None = None

    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


def world_paths(world: PathLike) -> DatasetPaths:
    """The dataset folders of a world written by ``mesadepth synth``."""
    w = Path(world)

    def opt(p: Path) -> Path | None:
        return p if p.exists() else None

    return DatasetPaths(
        video=opt(w / "video"),
        video_aux=opt(w / "video_aux"),
        nyu=opt(w / "nyu"),
        lsun=opt(w / "lsun"),
        lsun_images=opt(w / "lsun_images"),
        ibims=opt(w / "ibims"),
    )


def _probe(dataset: Any, n: int = 8) -> list[dict]:
    """Up to ``n`` evenly spaced samples of a dataset."""
    size = len(dataset)
    if size == 0:
        return []
    idx = np.unique(np.linspace(0, size - 1, min(n, size)).round().astype(int))
    return [dataset[int(i)] for i in idx]


def _describe(
    name: str, loader: str, dataset: Any, extra: Callable[[list[dict]], str] | None = None
) -> dict:
    samples = _probe(dataset)
    row: dict[str, Any] = {"dataset": name, "loader": loader, "samples": len(dataset)}
    if samples:
        img = samples[0].get("image")
        if img is not None:
            row["image"] = "x".join(str(s) for s in np.asarray(img).shape)
        depths = [np.asarray(s["depth"], np.float64) for s in samples if "depth" in s]
        if depths:
            valid = np.concatenate([d[d > 0] for d in depths])
            row["depth_m"] = f"{valid.min():.2f}-{valid.max():.2f}" if valid.size else "none"
            row["valid"] = f"{np.mean([np.mean(d > 0) for d in depths]):.0%}"
        if "K" in samples[0]:
            K = np.asarray(samples[0]["K"], np.float64)
            row["K"] = f"f=({K[0, 0]:.1f},{K[1, 1]:.1f}) c=({K[0, 2]:.1f},{K[1, 2]:.1f})"
        if extra is not None:
            row["notes"] = extra(samples)
    return row


def _safe(rows: list[dict], name: str, fn: Callable[[], dict]) -> None:
    try:
        rows.append(fn())
    except (DataError, FileNotFoundError, OSError, ValueError) as exc:
        rows.append({"dataset": name, "loader": "-", "samples": 0, "notes": f"ERROR: {exc}"})


def inspect_paths(paths: DatasetPaths) -> list[dict]:
    """One summary row per (dataset, loader); a loader's error becomes the row's note."""
    from mesadepth.data import ibims, lsun, nyu, video

    rows: list[dict] = []
    for label, root in (("video", paths.video), ("video_aux", paths.video_aux)):
        if root is None:
            continue
        _safe(
            rows,
            f"{label} train",
            lambda root=root, label=label: _describe(
                f"{label} train",
                "VideoSnippetDataset",
                video.VideoSnippetDataset(root, split="train"),
                lambda s: f"{len(s[0]['refs'])} refs per target",
            ),
        )
        if (Path(root) / "training" / "val.txt").exists():
            _safe(
                rows,
                f"{label} val",
                lambda root=root, label=label: _describe(
                    f"{label} val", "VideoDepthDataset", video.VideoDepthDataset(root, split="val")
                ),
            )
        if (Path(root) / "testing").exists():
            _safe(
                rows,
                f"{label} test",
                lambda root=root, label=label: _describe(
                    f"{label} test", "VideoTestDataset", video.VideoTestDataset(root)
                ),
            )
    if paths.nyu is not None:
        base = Path(paths.nyu)
        train_list = paths.nyu_train_list or base / "splits" / "train_list.txt"
        test_list = paths.nyu_test_list or base / "splits" / "test_list.txt"
        mat = paths.nyu_mat or base / "nyu_depth_v2_labeled.mat"
        splits = paths.nyu_splits or Path(mat).with_name("splits.mat")
        _safe(
            rows,
            "nyu sync train",
            lambda: _describe(
                "nyu sync train",
                "NYUSyncDataset",
                nyu.NYUSyncDataset(base / "nyu_depth_v2", train_list),
            ),
        )
        _safe(
            rows,
            "nyu official test",
            lambda: _describe(
                "nyu official test",
                "NYUSyncDataset",
                nyu.NYUSyncDataset(base / "nyu_depth_v2" / "official_splits" / "test", test_list),
            ),
        )
        if Path(mat).exists():
            _safe(
                rows,
                "nyu labeled test",
                lambda: _describe(
                    "nyu labeled test",
                    "NYULabeledDataset",
                    nyu.NYULabeledDataset(mat, splits, split="test"),
                    lambda s: (
                        f"{len(nyu.NYULabeledMat(mat))} frames in .mat, scene types e.g. {s[0]['scene_type']}"
                    ),
                ),
            )
    if paths.lsun is not None:
        cats = sorted(p.name[: -len("_train_lmdb")] for p in Path(paths.lsun).glob("*_train_lmdb"))

        def lsun_row() -> dict:
            ds = lsun.LSUNLmdb(paths.lsun, categories=tuple(cats))
            return _describe(
                "lsun",
                "LSUNLmdb",
                ds,
                lambda s: "categories: " + ", ".join(f"{c} {len(ds.keys(c))}" for c in cats),
            )

        _safe(rows, "lsun", lsun_row)
    if paths.lsun_images is not None:
        _safe(
            rows,
            "lsun images",
            lambda: _describe(
                "lsun images", "ImageFolderDataset", lsun.ImageFolderDataset(paths.lsun_images)
            ),
        )
    if paths.ibims is not None:

        def planes(samples: list[dict]) -> str:
            n = sum(len(s["planes"][c]) for s in samples for c in s["planes"])
            return f"{n / len(samples):.1f} planes, {np.mean([s['edges'].mean() for s in samples]):.1%} edge px per image"

        _safe(
            rows,
            "ibims",
            lambda: _describe("ibims", "IBimsDataset", ibims.IBimsDataset(paths.ibims), planes),
        )
    return rows


def inspect_world(world: PathLike) -> list[dict]:
    """Rows of :func:`inspect_paths` for every dataset of a synthetic world."""
    paths = world_paths(world)
    if paths.empty():
        raise DataError(
            world, "no dataset folder found (expected video/, nyu/, lsun/, lsun_images/ or ibims/)"
        )
    return inspect_paths(paths)


def format_table(rows: list[dict]) -> str:
    """A plain-text table of summary rows."""
    cols = ["dataset", "loader", "samples", "image", "depth_m", "valid", "K", "notes"]
    cols = [c for c in cols if any(c in r for r in rows)]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(s.rstrip() for s in out)
